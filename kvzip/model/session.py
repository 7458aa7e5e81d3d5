"""A loaded model plus what kvzip needs from it: geometry, identity, prefill, attach, generate."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvzip.errors import (
    ContextTooLongError,
    EmptyTextError,
    InputError,
    ModelMismatchError,
    UnsupportedModelError,
)
from kvzip.formats import ChatInfo, KvzHeader, LayeredKV, PositionLayout
from kvzip.formats.limits import map_large_blocks, release_free_memory
from kvzip.formats.spec import MAX_TOKEN_COUNT
from kvzip.model.cache import close_cache, new_cache
from kvzip.model.device import pinned, resolve_device, resolve_model_dtype
from kvzip.model.loading import ModelSource, load_pretrained, resolve_model
from kvzip.model.pruned import captured, inserting, pruned_attention, pruned_layer

Progress = Callable[[int, int], None]  # (done, total)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config fields that decide what the KV cache holds; a change in any of them
# makes a stored cache meaningless for the model.
_CONFIG_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters", "rope_theta",
    "rope_scaling", "sliding_window", "layer_types", "max_position_embeddings",
    "rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "tie_word_embeddings",
)


def _canonical_weights(t: torch.Tensor) -> torch.Tensor:
    """A weight as the fingerprint hashes it: floating point rounded to bfloat16 (what a
    float32, bfloat16 or float16 load of the same checkpoint agree on), the rest as is."""
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def _sha256_json(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass(frozen=True)
class ChatTemplate:
    """The model's chat template split around a user turn that opens with the document.

    ``prefix`` + document + ``separator`` + question + ``suffix`` renders exactly
    as the template would render one user turn holding "document<sep>question",
    followed by the opening of the assistant's turn.
    """

    prefix: str
    separator: str
    suffix: str

    def to_json(self) -> dict[str, str]:
        return {"prefix": self.prefix, "separator": self.separator, "suffix": self.suffix}

    @classmethod
    def from_info(cls, chat: ChatInfo | None) -> ChatTemplate | None:
        """The template a header's (validated) ``chat`` field stores, if any."""
        return None if chat is None else cls(chat.prefix, chat.separator, chat.suffix)


@dataclass
class KVModel:
    """A causal LM ready for capture and generation."""

    model: Any
    tokenizer: Any
    source: ModelSource | None = None
    _identity: dict[str, str] | None = field(default=None, repr=False)
    _legacy_identity: dict[str, str] | None = field(default=None, repr=False)
    _tokenizer_sha: str | None = field(default=None, repr=False)
    _prefill_rate: float | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, spec: str | None = None, *, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> KVModel:
        """The model ``spec`` names on ``device`` (default ``auto``: an accelerator when torch
        sees one) with its weights in ``dtype`` (default: float32 on the CPU, bfloat16 on an
        accelerator)."""
        where = resolve_device(device)
        weights = resolve_model_dtype(dtype, where)
        source = resolve_model(spec)
        model, tokenizer = load_pretrained(source, weights)
        if where.type != "cpu":
            model = model.to(where)
        return cls(model, tokenizer, source)

    # ---------------------------------------------------------------- geometry
    @property
    def text_config(self) -> Any:
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def kv_heads(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        """Where the model runs (its first parameter's device for a model without a
        ``device``); captured caches come back to the CPU, attached ones go here."""
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            return device
        first = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return first.device if first is not None else torch.device("cpu")

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Token ids as the model's [1, n] input, on its device."""
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    @property
    def max_context(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 0) or 2**31)

    @functools.cached_property
    def max_text_bytes(self) -> int:
        """More bytes of text than this cannot fit the context: the context's tokens times the
        longest token's UTF-8 spelling (an over-estimate of the bytes it stands for: byte-level
        vocabularies spell a byte with up to two), doubled for normalisers that shrink text."""
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        longest = max((len(token.encode("utf-8", "replace")) for token in vocab), default=64)
        return min(self.max_context, MAX_TOKEN_COUNT) * max(longest, 16) * 2

    def check_text_size(self, size: int, what: str = "the text", unit: str = "bytes") -> None:
        """Refuse a text too large to fit the context before it is read or tokenized
        (``size`` in bytes, or in characters, of which each takes at least one byte)."""
        if size > self.max_text_bytes:
            raise ContextTooLongError(
                f"{what} has {size} {unit}; {self.name}'s context of {self.max_context} tokens "
                f"holds at most {self.max_text_bytes} bytes of text"
            )

    @property
    def sliding_window(self) -> int | None:
        """The smallest attention window of any layer, or None if every layer sees everything."""
        windows = [w for w in self.layer_windows() if w is not None]
        return min(windows) if windows else None

    @functools.cached_property
    def _layer_windows(self) -> tuple[int | None, ...]:
        windows = []
        for layer in self.new_cache().layers:
            window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            windows.append(None if window is None else int(window))
        return tuple(windows)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (a token sees itself and ``window - 1`` before it),
        None for a layer that sees the whole context; as the model's own cache classes say."""
        return self._layer_windows

    def layer_types(self) -> list[str]:
        return ["full_attention" if w is None else "sliding_attention" for w in self.layer_windows()]

    def kept_positions(self, n_tokens: int) -> list[int]:
        """How many of the last positions of an ``n_tokens`` context each layer's cache keeps."""
        return [n_tokens if w is None else min(n_tokens, w - 1) for w in self.layer_windows()]

    def attention_info(self) -> dict[str, Any] | None:
        """What the layers attend to, for a file's header (None when every layer is full)."""
        windows = self.layer_windows()
        if all(w is None for w in windows):
            return None
        return {"layer_types": self.layer_types(), "windows": [w for w in windows]}

    @property
    def name(self) -> str:
        if self.source is not None:
            return self.source.describe()
        return str(getattr(self.model.config, "_name_or_path", "") or self.text_config.model_type)

    def rope_inv_freq(self) -> tuple[float, ...] | None:
        """RoPE inverse frequencies if every layer shares one plain rotation, else None."""
        tables, _ = self.rope_tables()
        return tables[0] if tables is not None and len(tables) == 1 else None

    def rope_tables(self) -> tuple[tuple[tuple[float, ...], ...] | None, tuple[int, ...] | None]:
        """Each layer's RoPE inverse frequencies: ``(tables, layer_table)``, the distinct
        tables and each layer's index into them; ``(None, None)`` when the model has no
        plain rotation (none, partial, or with attention scaling such as YaRN's).

        Codecs use them to un-rotate keys to pre-RoPE, RAG to re-rotate keys to new
        positions.  One module-wide ``inv_freq`` serves every layer (Llama, Qwen,
        Mistral); a rotary module with one ``<layer_type>_inv_freq`` per layer type
        (Gemma 3's local and global bases) serves each layer its type's.
        """
        return self._rope_tables

    @functools.cached_property
    def _rope_tables(self) -> tuple[tuple[tuple[float, ...], ...] | None, tuple[int, ...] | None]:
        single = self._single_rope()
        if single is not None:
            return (single,), (0,) * self.num_layers
        types = self.layer_types()
        for module in self.model.modules():
            found = {}
            for kind in set(types):
                inv = getattr(module, f"{kind}_inv_freq", None)
                if not isinstance(inv, torch.Tensor) or inv.ndim != 1:
                    break
                if float(getattr(module, f"{kind}_attention_scaling", 1.0)) != 1.0:
                    return None, None
                if inv.numel() * 2 != self.head_dim:
                    return None, None
                found[kind] = tuple(float(x) for x in inv.detach().to(torch.float64))
            else:
                tables = list(dict.fromkeys(found[t] for t in types))
                return tuple(tables), tuple(tables.index(found[t]) for t in types)
        return None, None

    def _single_rope(self) -> tuple[float, ...] | None:
        freqs = []
        for module in self.model.modules():
            inv = getattr(module, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.ndim == 1:
                if float(getattr(module, "attention_scaling", 1.0)) != 1.0:
                    return None
                freqs.append(inv.detach().to(torch.float64))
        if not freqs or any(not torch.equal(f, freqs[0]) for f in freqs[1:]):
            return None
        if freqs[0].numel() * 2 != self.head_dim:
            return None  # partial rotary embedding: not handled by the transforms
        return tuple(float(x) for x in freqs[0])

    # ---------------------------------------------------------------- identity
    def identity(self) -> dict[str, str]:
        """Fingerprints of architecture config, tokenizer and weights (cached).  The weights
        are hashed rounded to bfloat16, so the fingerprint is the same whatever dtype the
        weights were loaded in (float32, bfloat16, float16) and on whatever device."""
        if self._identity is None:
            self._identity = self._fingerprint(_canonical_weights)
        return self._identity

    def legacy_identity(self) -> dict[str, str]:
        """The identity kvzip 0.x wrote (weights hashed in the dtype they were loaded in):
        files written before the fingerprint became dtype-free still attach."""
        if self._legacy_identity is None:
            self._legacy_identity = self._fingerprint(lambda t: t)
        return self._legacy_identity

    def _fingerprint(self, canonical: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, str]:
        cfg = self.text_config.to_dict()
        config_sha = _sha256_json({k: cfg.get(k) for k in _CONFIG_FIELDS})
        weights = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            weights.update(name.encode())
            flat = canonical(tensor.detach()).contiguous().reshape(-1).cpu()  # the same bytes from any device
            weights.update(flat.view(torch.uint8).numpy().tobytes())
        tokenizer_sha = self.tokenizer_fingerprint()
        weights_sha = weights.hexdigest()
        fingerprint = hashlib.sha256(f"{config_sha}:{weights_sha}:{tokenizer_sha}".encode()).hexdigest()
        return {
            "fingerprint": fingerprint,
            "config_sha256": config_sha,
            "weights_sha256": weights_sha,
            "tokenizer_fingerprint": tokenizer_sha,
            "architecture": str(self.text_config.model_type),
            "name": self.name,
        }

    def tokenizer_fingerprint(self) -> str:
        """The tokenizer's vocabulary, special tokens and chat template, hashed (cached:
        Gemma 3's 262 K-token vocabulary takes a second)."""
        if self._tokenizer_sha is None:
            self._tokenizer_sha = self._hash_tokenizer()
        return self._tokenizer_sha

    def _hash_tokenizer(self) -> str:
        tok = self.tokenizer
        if tok is None:
            return "none"
        return _sha256_json(
            {
                "vocab": sorted(tok.get_vocab().items()),
                "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
                "chat_template": getattr(tok, "chat_template", None),
            }
        )

    def check_identity(self, stored: dict[str, Any]) -> None:
        """Raise ModelMismatchError unless ``stored`` (a file's ``model`` header) is this model."""
        mine = self.identity()
        # the legacy fingerprint hashes every weight again: only for a file that needs it
        if stored.get("fingerprint") == mine["fingerprint"]:
            return
        if stored.get("fingerprint") == self.legacy_identity()["fingerprint"]:
            return
        parts = [
            label
            for key, label in (
                ("config_sha256", "architecture config"),
                ("weights_sha256", "weights"),
                ("tokenizer_fingerprint", "tokenizer"),
            )
            if stored.get(key) != mine[key]
        ]
        raise ModelMismatchError(
            f"this .kvz was written by {stored.get('name') or 'another model'!s} "
            f"and does not match {mine['name']} ({', '.join(parts) or 'fingerprint'} differ)"
        )

    def check_stored_cache(self, header: KvzHeader) -> None:
        """Refuse a file that is not this model's, or whose declared geometry is not this
        model's cache (a copied fingerprint on forged dimensions, a position layout this
        model's cache cannot hold), before anything of it is decoded or allocated."""
        self.check_identity(header.model.to_json())
        mine = (self.num_layers, self.kv_heads, self.head_dim)
        stored = (header.num_layers, header.kv_heads, header.head_dim)
        if stored != mine:
            raise ModelMismatchError(
                f"this .kvz declares {stored[0]} layers x {stored[1]} kv heads x head_dim "
                f"{stored[2]}, but {self.name}'s cache is {mine[0]} x {mine[1]} x {mine[2]}"
            )
        if header.token_count > self.max_context:
            raise ModelMismatchError(
                f"this .kvz declares {header.token_count} tokens, more than {self.name}'s "
                f"context of {self.max_context}"
            )
        if not header.is_dense:
            self.check_layout(header.layout)

    def check_layout(self, layout: PositionLayout) -> None:
        """Refuse positions this model's cache cannot hold.  A *windowed* layout (every layer
        a run of the last positions, its heads alike) must be the model's own: a
        full-attention layer holds every position, a sliding layer its last ``window - 1``
        (or every one; attaching keeps the window).  Any other layout is a *pruned* one
        (:meth:`is_pruned_layout`): each head any subset of what its layer holds."""
        t = layout.token_count
        kept = self.kept_positions(t)
        pruned = self.is_pruned_layout(layout)
        for i, (window, heads) in enumerate(zip(self.layer_windows(), layout.positions)):
            kind = "full-attention" if window is None else f"sliding (window {window})"
            if pruned:
                oldest = min((int(p[0]) for p in heads if p.size), default=t)
                if window is not None and oldest < t - kept[i]:
                    raise ModelMismatchError(
                        f"layer {i} of this cache holds position {oldest} of {t}; this model's "
                        f"{kind} layer keeps only the last {kept[i]}")
                continue
            p, want = heads[0], kept[i]
            if not (p.size == want or (window is not None and p.size >= want)):
                raise ModelMismatchError(
                    f"layer {i} of this cache holds {p.size} positions of {t}; this model's "
                    f"{kind} layer keeps the last {want}")

    @staticmethod
    def is_pruned_layout(layout: PositionLayout) -> bool:
        """Whether some layer holds positions that are not one run ending at the context's
        last, or holds different ones per head: a cache pruned by importance, attached as
        a pruned cache (:mod:`kvzip.model.pruned`)."""
        t = layout.token_count
        for i, heads in enumerate(layout.positions):
            p = heads[0]
            if not layout.heads_share(i):
                return True
            if p.size and (int(p[-1]) != t - 1 or int(p[-1]) - int(p[0]) + 1 != p.size):
                return True
        return False

    # -------------------------------------------------------------- tokenizing
    def chat_template(self) -> ChatTemplate | None:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return None
        doc_mark, q_mark = "\x00KVZIPDOC\x00", "\x00KVZIPQ\x00"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": doc_mark + "\n\n" + q_mark}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if rendered.count(doc_mark) != 1 or rendered.count(q_mark) != 1:
            return None
        prefix, rest = rendered.split(doc_mark)
        separator, suffix = rest.split(q_mark)
        return ChatTemplate(prefix, separator, suffix)

    def encode_text(self, text: str, *, special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens) and each token's character span in it."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise InputError(f"{self.name}'s tokenizer gives no character offsets") from None
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def document_ids(self, text: str, chat: ChatTemplate | None) -> list[int]:
        """Token ids of the document as cached: plain text, or opening a chat user turn."""
        if not text.strip():
            raise EmptyTextError("the text is empty: nothing to encode")
        if chat is None:
            ids = self.encode_text(text, special_tokens=True)
        else:
            ids = self.encode_text(chat.prefix + text, special_tokens=False)
        if not ids:
            raise EmptyTextError("the text has no tokens: nothing to encode")
        return ids

    def prompt_ids(self, prompt: str, chat: ChatTemplate | None) -> list[int]:
        """Ids that follow the cached document: the prompt (closing the user turn in chat mode)."""
        if chat is not None:
            prompt = chat.separator + prompt + chat.suffix
        return self.encode_text(prompt, special_tokens=False)

    def check_length(self, n_tokens: int, what: str = "the text") -> None:
        """Refuse more tokens than the model takes."""
        if n_tokens > self.max_context:
            raise ContextTooLongError(
                f"{what} has {n_tokens} tokens, more than the model's context of "
                f"{self.max_context}"
            )

    # ----------------------------------------------------------------- capture
    def prefill(
        self, ids: Sequence[int], *, step: int = 512, progress: Progress | None = None
    ) -> LayeredKV:
        """Run the model over ``ids`` and return its cache: every layer's K/V as the model
        keeps them (a sliding layer its last ``window - 1`` positions); for a model whose
        layers all see everything, one [2, layers, kv_heads, T, head_dim] tensor."""
        return self.extend(None, ids, step=step, progress=progress)

    @torch.inference_mode()
    def extend(
        self,
        kv: torch.Tensor | LayeredKV | None,
        ids: Sequence[int],
        *,
        step: int = 512,
        progress: Progress | None = None,
    ) -> LayeredKV:
        """The cache of ``kv``'s context followed by ``ids`` (T + len(ids) tokens).

        The model reads ``ids`` in ``step``-token pieces so progress can be reported
        and the attention's working memory stays bounded; the cache is the same one
        a single forward pass would build (up to float rounding).  Streaming
        recomputes a chunk this way, and RAG recomputes passage boundaries.
        """
        kv = as_layered(kv)
        cached = 0 if kv is None else kv.token_count
        self.check_length(cached + len(ids))
        cache = self.new_cache(capacity=len(ids)) if kv is None else self.build_cache(kv, room=len(ids))
        input_ids = self._ids(ids)
        total = input_ids.shape[1]
        for start in range(0, total, step):
            piece = input_ids[:, start : start + step]
            self.model(input_ids=piece, cache=cache, use_cache=True)
            if progress is not None:
                progress(min(start + step, total), total)
        return self.capture(cache, cached + total)

    @torch.inference_mode()
    def prefill_chunks(
        self, ids: Sequence[int], chunk_tokens: int, *, step: int = 512, progress: Progress | None = None,
        offload: str | os.PathLike[str] | None = None,
    ) -> Iterator[list[tuple[int, int, list[torch.Tensor]]]]:
        """Prefill ``ids`` and hand over the cache chunk by chunk as it is produced: after
        each forward, the chunks it completed, ``(start, count, layers)`` for each
        ``chunk_tokens``-token chunk, ``layers[i]`` the
        ``[2, kv_heads, n, head_dim]`` (on the CPU) of the positions layer ``i`` keeps there
        once the whole context is read (a sliding layer: those inside its last window).

        The model reads whole chunks in pieces of about ``step`` tokens, and nothing of the
        cache is copied off the model's device but the chunk being handed over, so the
        host memory this takes is a few chunks, not the whole cache.  With ``offload`` (a
        directory), the full-attention layers' cache lives in unlinked files there while the
        model reads (:func:`kvzip.model.cache.disk_layer`): on the CPU, where the model's
        cache is host memory, the process then holds about one layer's K/V, not the cache;
        the cache, and so every byte handed over, is the same."""
        total = len(ids)
        self.check_length(total)
        if chunk_tokens <= 0:
            raise InputError(f"chunk tokens must be positive, got {chunk_tokens}")
        final = self.kept_positions(total)
        step = max(chunk_tokens, step // chunk_tokens * chunk_tokens)
        if offload is not None:
            map_large_blocks()  # memory is what matters: keep the allocator from hoarding
        cache = self.new_cache(total, offload)
        input_ids = self._ids(ids)
        try:
            for s0 in range(0, total, step):
                s1 = min(s0 + step, total)
                self.model(input_ids=input_ids[:, s0:s1], cache=cache, use_cache=True, logits_to_keep=1)
                release_free_memory()  # the forward's garbage, before the chunks are copied out
                if progress is not None:
                    progress(s1, total)
                held = self.kept_positions(s1)
                layers = self._cache_layers(cache)
                pairs = [self._layer_kv(layer, i, held[i]) for i, layer in enumerate(layers)]
                done = []
                for a in range(s0, s1, chunk_tokens):
                    b = min(a + chunk_tokens, s1)
                    parts = []
                    for i, (k, v) in enumerate(pairs):
                        first = s1 - held[i]  # the position of the layer's first held entry
                        lo = max(a, total - final[i])
                        lo, hi = min(lo, b) - first, b - first
                        if hasattr(layers[i], "read"):  # kept in a file: read just this chunk
                            k, v = layers[i].read(lo, hi)
                            lo, hi = 0, hi - lo
                        parts.append(torch.stack([k[0, :, lo:hi], v[0, :, lo:hi]]).cpu())
                    done.append((a, b - a, parts))
                yield done
        finally:
            close_cache(cache)

    @torch.inference_mode()
    def prefill_rate(self, tokens: int = 256) -> float:
        """Tokens per second this model prefills on its device, measured once (a warm-up
        forward, then one of ``tokens`` tokens): what recomputing a chunk costs here."""
        if self._prefill_rate is None:
            ids = self._ids([0] * min(tokens, self.max_context))
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
            self.model(input_ids=ids[:, :8], use_cache=False, logits_to_keep=1)
            sync()
            started = time.perf_counter()
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync()
            self._prefill_rate = ids.shape[1] / max(time.perf_counter() - started, 1e-9)
        return self._prefill_rate

    @torch.inference_mode()
    def read_pieces_after(self, kv: torch.Tensor | LayeredKV, pieces: Sequence[Sequence[int]], *,
                          before_each: Callable[[], None] | None = None) -> None:
        """Read each of ``pieces`` after the cached context, each on its own: the cache is
        put back to the context before the next one, so a piece attends to the context and
        itself only.  Keeps nothing (for what the forwards observe); only the last
        position's logits are computed.  ``before_each()`` runs before each piece."""
        if not pieces:
            return
        cache = self.build_cache(as_layered(kv), room=max(len(p) for p in pieces))
        saved = [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache.layers]
        for piece in pieces:
            if before_each is not None:
                before_each()
            self.model(input_ids=self._ids(piece), cache=cache, use_cache=True, logits_to_keep=1)
            for layer, (keys, values, seen) in zip(cache.layers, saved):
                layer.keys, layer.values = keys, values  # a reserved layer's buffer keeps its start
                if seen is not None:
                    layer.cumulative_length = seen

    @torch.inference_mode()
    def extend_at(
        self,
        kv: torch.Tensor | LayeredKV,
        ids: Sequence[int],
        positions: Sequence[int],
        *,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The caches of ``ids`` read at ``positions`` after the context cached in ``kv``,
        in one forward pass: [2, L, H, len(ids), D].

        Token i sees the cached positions before its own whose ``visible`` flag ([T] bool
        indexed by position, default all) is set, and the tokens of ``ids`` at or before
        its position; in a sliding layer, only those inside its window.  So tokens spread
        over the context can be recomputed together, each with what precedes it (the
        positions they will replace being hidden), and a layer that keeps only a window
        is read with just that window.  With ``ids`` at positions T, T+1, ... and nothing
        hidden this is :meth:`extend` in one piece.
        """
        kv = as_layered(kv)
        n, cached = len(ids), kv.token_count
        if n == 0:
            return torch.zeros((2, self.num_layers, self.kv_heads, 0, self.head_dim))
        self.check_length(cached + n)
        pos = torch.tensor(list(positions), dtype=torch.long)
        if pos.shape != (n,) or int(pos.min()) < 0:
            raise InputError(f"extend_at needs one position >= 0 per token, got {len(positions)} for {n}")
        if kv.head_dim != self.head_dim or kv.num_layers != self.num_layers or kv.kv_heads != self.kv_heads:
            raise UnsupportedModelError("the cache does not fit this model")
        dtype = self.model.dtype
        windows = self.layer_windows()
        masks: dict[str, torch.Tensor] = {}
        slot_positions: dict[str, np.ndarray] = {}
        for i, (window, kind) in enumerate(zip(windows, self.layer_types())):
            if not kv.layout.heads_share(i):
                raise UnsupportedModelError(f"layer {i} keeps different positions per head")
            slots = kv.layout.positions[i][0]
            if kind in slot_positions:
                if not np.array_equal(slot_positions[kind], slots):
                    raise UnsupportedModelError(f"the {kind} layers of this cache hold different positions")
                continue
            slot_positions[kind] = slots
            held = torch.from_numpy(slots)
            sees = held[None, :] < pos[:, None]
            if visible is not None:
                sees &= visible.to(torch.bool)[held][None, :]
            new = pos[None, :] <= pos[:, None]
            if window is not None:
                sees &= held[None, :] > pos[:, None] - window
                new &= pos[None, :] > pos[:, None] - window
            allowed = torch.cat([sees, new], dim=1)
            masks[kind] = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(
                ~allowed, torch.finfo(dtype).min)[None, None]
        from transformers import DynamicCache

        device = self.device
        cache = DynamicCache()  # plain layers: each holds exactly the positions it is given
        for i, layer in enumerate(kv.layers):
            cache.update(layer[0].unsqueeze(0).to(device, dtype), layer[1].unsqueeze(0).to(device, dtype), i)
        masks = {kind: m.to(device) for kind, m in masks.items()}
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        self.model(
            input_ids=self._ids(ids),
            position_ids=pos[None, :].to(device),
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
        return torch.stack([
            torch.stack([layer.keys[0, :, -n:] for layer in cache.layers]),
            torch.stack([layer.values[0, :, -n:] for layer in cache.layers]),
        ]).cpu()

    @torch.inference_mode()
    def insert_at(self, kv: LayeredKV, ids: Sequence[int], positions: Sequence[int]) -> LayeredKV:
        """``kv`` with the entries of ``ids`` read at ``positions`` added to every (layer, kv
        head), in one forward pass: token i sees what ``kv`` holds before its position (in a
        sliding layer, inside its window) and the tokens of ``ids`` at or before it.  What
        :meth:`extend_at` does for a cache whose heads hold different positions (a pruned
        one); ``kv`` holds none of ``positions``, all of them inside its context.  The result
        is a CPU cache in the model's dtype."""
        pos = np.asarray(list(positions), np.int64)
        if pos.shape != (len(ids),) or np.unique(pos).size != pos.size:
            raise InputError(f"insert_at needs one distinct position per token, got {len(positions)} for {len(ids)}")
        if kv.head_dim != self.head_dim or kv.num_layers != self.num_layers or kv.kv_heads != self.kv_heads:
            raise UnsupportedModelError("the cache does not fit this model")
        if not len(ids):
            return kv
        if int(pos.min()) < 0 or int(pos.max()) >= kv.token_count:
            raise InputError(f"insert_at positions must lie inside the context of {kv.token_count} tokens")
        for i, heads in enumerate(kv.layout.positions):
            if any(np.isin(pos, p).any() for p in heads):
                raise InputError(f"layer {i} of the cache already holds some of the positions to insert")
        cache = self._filled_pruned_cache(kv, len(ids), self.device)
        at = torch.from_numpy(pos)
        with pruned_attention(self.model, cache), inserting(cache, at):
            self.model(input_ids=self._ids(ids), position_ids=at[None].to(self.device), cache=cache,
                       use_cache=True, logits_to_keep=1)
        return captured(cache, kv.token_count)

    def new_cache(self, capacity: int | None = None, offload: str | os.PathLike[str] | None = None) -> Any:
        """An empty DynamicCache for the model; with ``capacity``, its full-attention layers
        reserve room for that many positions up front, with ``offload`` (a directory) they
        live in unlinked files there (:mod:`kvzip.model.cache`)."""
        return new_cache(self.model.config, capacity, None if offload is None else os.fspath(offload))

    def capture(self, cache: Any, n_tokens: int) -> LayeredKV:
        """A DynamicCache of ``n_tokens`` as kvzip's :class:`LayeredKV`, refusing caches that
        are not plain K/V: each layer as its cache keeps it (a full-attention layer every
        position, a sliding one its last ``window - 1``), one dense tensor when every layer
        holds every position."""
        layers = self._cache_layers(cache)
        kept = self.kept_positions(n_tokens)
        if all(n == n_tokens for n in kept):
            return LayeredKV.from_dense(self.cache_to_tensor(cache, n_tokens))
        out = []
        for i, layer in enumerate(layers):
            k, v = self._layer_kv(layer, i, kept[i])
            seen = getattr(layer, "cumulative_length", n_tokens)
            if int(seen) != n_tokens:
                raise UnsupportedModelError(
                    f"layer {i} has seen {int(seen)} tokens, the context has {n_tokens}")
            out.append(torch.stack([k[0], v[0]]).cpu())
        return LayeredKV(out, PositionLayout.from_counts(kept, self.kv_heads, n_tokens))

    def _cache_layers(self, cache: Any) -> list[Any]:
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise UnsupportedModelError(
                f"{self.text_config.model_type}: its cache is not one K/V pair per layer"
            )
        return layers

    def _layer_kv(self, layer: Any, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise UnsupportedModelError(
                f"{self.text_config.model_type}: layer {i} keeps no key/value tensors "
                "(recurrent or hybrid state); kvzip cannot store this cache"
            )
        expected = (1, self.kv_heads, n, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise UnsupportedModelError(
                f"{self.text_config.model_type}: layer {i} caches keys {tuple(k.shape)} "
                f"and values {tuple(v.shape)}, not {expected}; kvzip stores plain "
                "per-layer K/V only"
            )
        return k, v

    def cache_to_tensor(self, cache: Any, n_tokens: int) -> torch.Tensor:
        """Stack a DynamicCache whose layers all hold ``n_tokens`` into one tensor on the CPU,
        filled layer by layer (no second copy of the whole cache on the model's device)."""
        pairs = [self._layer_kv(layer, i, n_tokens) for i, layer in enumerate(self._cache_layers(cache))]
        if not pairs:
            return torch.zeros((2, 0, self.kv_heads, n_tokens, self.head_dim))
        k0 = pairs[0][0]
        out = torch.empty((2, len(pairs), *k0.shape[1:]), dtype=k0.dtype)
        for i, (k, v) in enumerate(pairs):
            out[0, i].copy_(k[0])
            out[1, i].copy_(v[0])
        return out

    def build_cache(self, kv: torch.Tensor | LayeredKV, room: int = 0,
                    device: str | torch.device | None = None) -> Any:
        """A fresh DynamicCache holding ``kv`` in the model's dtype, each layer's position
        counter at the context's true length (a sliding layer given every position keeps
        its last ``window - 1``, as after a prefill); full-attention layers reserve ``room``
        more positions, for what will be read after it.  ``device``: where the cache goes
        (default: the model's)."""
        kv = as_layered(kv)
        self._check_fits(kv.layout, kv.head_dim)
        model_dtype, device = self.model.dtype, self.device if device is None else torch.device(device)
        if not kv.is_dense and self.is_pruned_layout(kv.layout):
            return self._filled_pruned_cache(kv, room, device)
        cache = self.new_cache(capacity=kv.token_count + room)
        for i, layer in enumerate(kv.layers):
            cache.update(layer[0].unsqueeze(0).to(device, model_dtype), layer[1].unsqueeze(0).to(device, model_dtype), i)
            if hasattr(cache.layers[i], "cumulative_length"):
                cache.layers[i].cumulative_length = kv.token_count
        return cache

    def _check_fits(self, layout: PositionLayout, head_dim: int) -> None:
        """Refuse a cache (its position layout and head_dim) this model's cache cannot hold."""
        if (layout.num_layers, layout.kv_heads, head_dim) != (self.num_layers, self.kv_heads, self.head_dim):
            raise UnsupportedModelError(
                f"a cache of {layout.num_layers} layers x {layout.kv_heads} kv heads x head_dim {head_dim} "
                f"does not fit this model ({self.num_layers} layers, {self.kv_heads} kv heads, "
                f"head_dim {self.head_dim})"
            )
        self.check_length(layout.token_count, "the cached context")
        if not layout.is_dense():
            self.check_layout(layout)

    def empty_cache(self, layout: PositionLayout, room: int = 0) -> Any:
        """A DynamicCache on the model's device, in its dtype, holding what ``layout`` holds
        (zeros) and each sliding layer's position counter at the context's length, its
        full-attention layers with ``room`` more positions reserved (for the prompt and the
        new tokens): :meth:`fill_cache` writes a stored cache into it piece by piece, so
        attaching never holds a second copy of the whole cache."""
        self._check_fits(layout, self.head_dim)
        if not layout.is_dense() and self.is_pruned_layout(layout):
            return self._pruned_cache(layout, room, self.device)
        cache = self.new_cache(capacity=layout.token_count + room)
        layers = self._cache_layers(cache)
        dtype, device = self.model.dtype, self.device
        for i, layer in enumerate(layers):
            width = layout.layer_width(i)
            reserved = hasattr(layer, "adopt")
            shape = (1, self.kv_heads, width + (room if reserved else 0), self.head_dim)
            keys = torch.zeros(shape, dtype=dtype, device=device)
            values = torch.zeros(shape, dtype=dtype, device=device)
            if reserved:
                layer.adopt(keys, values, width)
            else:
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = layout.token_count
        return cache

    def fill_cache(self, cache: Any, layer: int, heads: slice | int, slots: slice, kv: torch.Tensor) -> None:
        """Write ``kv`` (``[2, heads, n, head_dim]`` on the CPU or the cache's device, any float dtype) into
        ``heads`` and ``slots`` of layer ``layer`` of a cache from :meth:`empty_cache`
        (through pinned host memory when the model is on a CUDA device)."""
        target = cache.layers[layer]
        device = target.device if hasattr(target, "write") else target.keys.device
        if device.type == "cuda" and kv.device.type == "cpu":
            kv = pinned(kv)
        if hasattr(target, "write"):  # a pruned layer: each head holds its own entries
            if isinstance(heads, int):
                target.write(heads, slots, kv[0], kv[1])
            else:
                for h in range(kv.shape[1]):
                    target.write(h, slots, kv[0, h], kv[1, h])
            return
        target.keys[0, heads, slots].copy_(kv[0], non_blocking=False)
        target.values[0, heads, slots].copy_(kv[1], non_blocking=False)

    def _pruned_cache(self, layout: PositionLayout, room: int, device: torch.device) -> Any:
        """A cache of :mod:`kvzip.model.pruned` layers on ``device`` holding what ``layout``
        holds (zeros until :meth:`fill_cache`), ``room`` more entries per head for new tokens."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, window in enumerate(self.layer_windows()):
            cache.layers[i] = pruned_layer(layout.positions[i], layout.token_count, window, self.head_dim,
                                           room, self.model.dtype, device)
        return cache

    def _filled_pruned_cache(self, kv: LayeredKV, room: int, device: torch.device) -> Any:
        """A cache of :mod:`kvzip.model.pruned` layers on ``device`` holding ``kv``'s entries."""
        cache = self._pruned_cache(kv.layout, room, device)
        for i, layer in enumerate(kv.layers):
            for h, p in enumerate(kv.layout.positions[i]):
                self.fill_cache(cache, i, h, slice(0, p.size), layer[:, h, : p.size])
        return cache

    def crop_last(self, kv: LayeredKV) -> LayeredKV:
        """The cache of the context without its last token, so that token can be read again
        to produce the next one's logits.  A sliding layer that keeps only its window lacks
        the position before it, so such a cache cannot be cropped (``InputError``)."""
        t = kv.token_count
        if kv.is_dense:
            return LayeredKV.from_dense(kv.dense[:, :, :, : t - 1])
        if self.is_pruned_layout(kv.layout):
            return self._crop_pruned(kv)
        layers = []
        kept = self.kept_positions(t - 1)
        for i, (layer, window) in enumerate(zip(kv.layers, self.layer_windows())):
            if layer.shape[2] - 1 < kept[i]:
                raise InputError(
                    f"the cached context fills layer {i}'s attention window of {window} tokens, which "
                    "keeps only what the next new token needs: give a prompt to continue after it")
            layers.append(layer[:, :, :-1])
        return LayeredKV(layers, PositionLayout.from_counts([x.shape[2] for x in layers], kv.kv_heads, t - 1))

    def _crop_pruned(self, kv: LayeredKV) -> LayeredKV:
        """A pruned cache without the context's last position (which ``--keep`` always keeps)."""
        last = kv.token_count - 1
        masks = []
        for i, heads in enumerate(kv.layout.positions):
            width = kv.layout.layer_width(i)
            m = np.zeros((len(heads), width), bool)
            for h, p in enumerate(heads):
                m[h, : p.size] = p != last
            masks.append(m)
        return kv.subset(masks, token_count=last)

    @torch.inference_mode()
    def teacher_force(self, kv: torch.Tensor | LayeredKV, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] (float32) for ``ids`` read after the cached context ``kv``."""
        cache = self.build_cache(kv, room=len(ids))
        with pruned_attention(self.model, cache):
            out = self.model(input_ids=self._ids(ids), cache=cache, use_cache=True)
        return out.logits[0].float().cpu()

    # --------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        *,
        kv: torch.Tensor | LayeredKV | None = None,
        max_new_tokens: int = 64,
        on_token: Callable[[], None] | None = None,
        cache: Any = None,
    ) -> list[int]:
        """Greedy continuation of ``ids``; with ``kv``, its first tokens come from that cache.

        The cache must cover a prefix of ``ids`` and leave at least one token
        uncached (the model needs one input to produce logits), so a cache that
        covers everything is cropped by one token.  ``cache``: a model cache already
        built (:meth:`empty_cache` + :meth:`fill_cache`) of fewer tokens than ``ids``,
        used as it is (and extended).
        """
        ids = list(ids)
        self.check_length(len(ids) + max_new_tokens, "the prompt plus new tokens")
        input_ids = self._ids(ids)
        kwargs: dict[str, Any] = {}
        if cache is not None:
            if kv is not None:
                raise ValueError("give kv or cache, not both")
            if cache.get_seq_length() >= len(ids):
                raise InputError(f"the cache holds {cache.get_seq_length()} tokens; the prompt must add some")
            kwargs["cache"] = cache
        elif kv is not None:
            kv = as_layered(kv)
            if kv.token_count > len(ids) and kv.is_dense:
                kv = LayeredKV.from_dense(kv.dense[:, :, :, : len(ids)])
            if kv.token_count > len(ids):
                raise InputError(f"the cache holds {kv.token_count} tokens, the prompt only {len(ids)}")
            if kv.token_count == len(ids):
                kv = self.crop_last(kv)
            kwargs["cache"] = self.build_cache(kv, room=len(ids) - kv.token_count + max_new_tokens)
        with pruned_attention(self.model, kwargs.get("cache")):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self._pad_id(),
                streamer=_TokenClock(on_token) if on_token is not None else None,
                **kwargs,
            )
        return out[0, len(ids) :].cpu().tolist()

    def generate_timed(
        self, ids: Sequence[int], *, kv: torch.Tensor | LayeredKV | None = None, max_new_tokens: int = 64,
        cache: Any = None,
    ) -> TimedGeneration:
        """:meth:`generate`, timing the first new token and the whole run from this call."""
        started = time.perf_counter()
        first: list[float] = []

        def stamp() -> None:
            if not first:
                first.append(time.perf_counter())

        new_ids = self.generate(ids, kv=kv, max_new_tokens=max_new_tokens, on_token=stamp, cache=cache)
        done = time.perf_counter()
        return TimedGeneration(new_ids, (first[0] if first else done) - started, done - started)

    def _pad_id(self) -> int | None:
        cfg = self.model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        return pad

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def as_layered(kv: torch.Tensor | LayeredKV | None) -> LayeredKV | None:
    """A cache as :class:`LayeredKV` (a [2, L, H, T, D] tensor is a dense one)."""
    if kv is None or isinstance(kv, LayeredKV):
        return kv
    return LayeredKV.from_dense(kv)


@dataclass(frozen=True)
class TimedGeneration:
    new_ids: list[int]
    first_token_seconds: float
    total_seconds: float


class _TokenClock:
    """A generate() streamer that only reports each new token (for time to first token)."""

    def __init__(self, on_token: Callable[[], None]):
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        self._on_token()

    def end(self) -> None:
        pass
