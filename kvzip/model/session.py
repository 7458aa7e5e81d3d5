"""A loaded model plus what kvzip needs from it: geometry, identity, prefill, attach, generate."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvzip.errors import (
    ContextTooLongError,
    EmptyTextError,
    InputError,
    ModelMismatchError,
    UnsupportedModelError,
)
from kvzip.formats import ChatInfo, KvzHeader
from kvzip.formats.spec import MAX_TOKEN_COUNT
from kvzip.model.loading import ModelSource, load_pretrained, resolve_model

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

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, spec: str | None = None) -> KVModel:
        source = resolve_model(spec)
        model, tokenizer = load_pretrained(source)
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
        cfg = self.text_config
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if not window:
            return None
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return int(window)

    @property
    def name(self) -> str:
        if self.source is not None:
            return self.source.describe()
        return str(getattr(self.model.config, "_name_or_path", "") or self.text_config.model_type)

    def rope_inv_freq(self) -> tuple[float, ...] | None:
        """RoPE inverse frequencies if every layer shares one plain rotation, else None.

        Codecs use this to un-rotate keys to pre-RoPE; a model with per-layer RoPE
        (Gemma 3's local/global) or attention scaling (YaRN) gets None and codecs
        fall back to coding post-RoPE keys.
        """
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
        """Fingerprints of architecture config, tokenizer and weights (cached)."""
        if self._identity is None:
            cfg = self.text_config.to_dict()
            config_sha = _sha256_json({k: cfg.get(k) for k in _CONFIG_FIELDS})
            weights = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                weights.update(name.encode())
                flat = tensor.detach().contiguous().reshape(-1).cpu()  # the same bytes from any device
                weights.update(flat.view(torch.uint8).numpy().tobytes())
            tokenizer_sha = self.tokenizer_fingerprint()
            weights_sha = weights.hexdigest()
            fingerprint = hashlib.sha256(
                f"{config_sha}:{weights_sha}:{tokenizer_sha}".encode()
            ).hexdigest()
            self._identity = {
                "fingerprint": fingerprint,
                "config_sha256": config_sha,
                "weights_sha256": weights_sha,
                "tokenizer_fingerprint": tokenizer_sha,
                "architecture": str(self.text_config.model_type),
                "name": self.name,
            }
        return self._identity

    def tokenizer_fingerprint(self) -> str:
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
        if stored.get("fingerprint") == mine["fingerprint"]:
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
        model's cache (a copied fingerprint on forged dimensions), before anything of it
        is decoded or allocated."""
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

    def check_length(self, n_tokens: int, what: str = "the text", *, cached: bool = True) -> None:
        """Refuse more tokens than the model takes; ``cached`` tokens must also fit every
        layer's attention window (a sliding layer's cache keeps only ``window - 1``)."""
        if n_tokens > self.max_context:
            raise ContextTooLongError(
                f"{what} has {n_tokens} tokens, more than the model's context of "
                f"{self.max_context}"
            )
        window = self.sliding_window
        if cached and window is not None and n_tokens > window - 1:
            raise ContextTooLongError(
                f"{what} has {n_tokens} tokens; the model's sliding-window layers keep only "
                f"{window - 1}, and kvzip v1 stores only contexts that fit the window"
            )

    # ----------------------------------------------------------------- capture
    def prefill(
        self, ids: Sequence[int], *, step: int = 512, progress: Progress | None = None
    ) -> torch.Tensor:
        """Run the model over ``ids`` and return its cache as [2, layers, kv_heads, T, head_dim]."""
        return self.extend(None, ids, step=step, progress=progress)

    @torch.inference_mode()
    def extend(
        self,
        kv: torch.Tensor | None,
        ids: Sequence[int],
        *,
        step: int = 512,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """The cache of ``kv``'s context followed by ``ids``: [2, L, H, T + len(ids), D].

        The model reads ``ids`` in ``step``-token pieces so progress can be reported
        and the attention's working memory stays bounded; the cache is the same one
        a single forward pass would build (up to float rounding).  Streaming
        recomputes a chunk this way, and RAG recomputes passage boundaries.
        """
        cached = 0 if kv is None else kv.shape[3]
        self.check_length(cached + len(ids))
        cache = self.new_cache() if kv is None else self.build_cache(kv)
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        total = input_ids.shape[1]
        for start in range(0, total, step):
            piece = input_ids[:, start : start + step]
            self.model(input_ids=piece, cache=cache, use_cache=True)
            if progress is not None:
                progress(min(start + step, total), total)
        return self.cache_to_tensor(cache, cached + total)

    @torch.inference_mode()
    def extend_at(
        self,
        kv: torch.Tensor,
        ids: Sequence[int],
        positions: Sequence[int],
        *,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The caches of ``ids`` read at ``positions`` after the context cached in ``kv``,
        in one forward pass: [2, L, H, len(ids), D].

        ``kv`` ([2, L, H, T, D]) holds the token at position t in slot t.  Token i sees
        the cached tokens before its position whose ``visible`` flag ([T] bool, default
        all) is set, and the tokens of ``ids`` at or before its position; so tokens
        spread over the context can be recomputed together, each with what precedes it
        (the slots they will replace being hidden).  With ``ids`` at positions
        T, T+1, ... and nothing hidden this is :meth:`extend` in one piece.
        """
        n, cached = len(ids), kv.shape[3]
        if n == 0:
            return kv[:, :, :, :0]
        self.check_length(cached + n)
        pos = torch.tensor(list(positions), dtype=torch.long)
        if pos.shape != (n,) or int(pos.min()) < 0:
            raise InputError(f"extend_at needs one position >= 0 per token, got {len(positions)} for {n}")
        slots = torch.arange(cached)
        sees_cached = slots[None, :] < pos[:, None]
        if visible is not None:
            sees_cached &= visible.to(torch.bool)[None, :]
        allowed = torch.cat([sees_cached, pos[None, :] <= pos[:, None]], dim=1)
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        cache = self.build_cache(kv)
        self.model(
            input_ids=torch.tensor([list(ids)], dtype=torch.long),
            position_ids=pos[None, :],
            attention_mask=mask[None, None],
            cache=cache,
            use_cache=True,
        )
        layers = cache.layers
        return torch.stack([
            torch.stack([layer.keys[0, :, cached:] for layer in layers]),
            torch.stack([layer.values[0, :, cached:] for layer in layers]),
        ])

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_to_tensor(self, cache: Any, n_tokens: int) -> torch.Tensor:
        """Stack a DynamicCache into one tensor, refusing caches that are not plain K/V."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise UnsupportedModelError(
                f"{self.text_config.model_type}: its cache is not one K/V pair per layer"
            )
        expected = (1, self.kv_heads, n_tokens, self.head_dim)
        keys, values = [], []
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise UnsupportedModelError(
                    f"{self.text_config.model_type}: layer {i} keeps no key/value tensors "
                    "(recurrent or hybrid state); kvzip cannot store this cache"
                )
            if tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise UnsupportedModelError(
                    f"{self.text_config.model_type}: layer {i} caches keys {tuple(k.shape)} "
                    f"and values {tuple(v.shape)}, not {expected}; kvzip stores plain "
                    "per-layer K/V only"
                )
            keys.append(k[0])
            values.append(v[0])
        return torch.stack([torch.stack(keys), torch.stack(values)])

    def build_cache(self, kv: torch.Tensor) -> Any:
        """A fresh DynamicCache holding ``kv`` ([2, L, H, T, D]) in the model's dtype."""
        if kv.shape[:3] != (2, self.num_layers, self.kv_heads) or kv.shape[4] != self.head_dim:
            raise UnsupportedModelError(
                f"cache of shape {tuple(kv.shape)} does not fit this model "
                f"({self.num_layers} layers, {self.kv_heads} kv heads, head_dim {self.head_dim})"
            )
        self.check_length(kv.shape[3], "the cached context")
        cache = self.new_cache()
        model_dtype = self.model.dtype
        for i in range(self.num_layers):
            cache.update(
                kv[0, i].unsqueeze(0).to(model_dtype), kv[1, i].unsqueeze(0).to(model_dtype), i
            )
        return cache

    @torch.inference_mode()
    def teacher_force(self, kv: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] (float32) for ``ids`` read after the cached context ``kv``."""
        cache = self.build_cache(kv)
        out = self.model(
            input_ids=torch.tensor([list(ids)], dtype=torch.long),
            cache=cache,
            use_cache=True,
        )
        return out.logits[0].float()

    # --------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        *,
        kv: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        on_token: Callable[[], None] | None = None,
    ) -> list[int]:
        """Greedy continuation of ``ids``; with ``kv``, its first tokens come from that cache.

        The cache must cover a prefix of ``ids`` and leave at least one token
        uncached (the model needs one input to produce logits), so a cache that
        covers everything is cropped by one token.
        """
        ids = list(ids)
        self.check_length(len(ids) + max_new_tokens, "the prompt plus new tokens", cached=False)
        input_ids = torch.tensor([ids], dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if kv is not None:
            if kv.shape[3] >= len(ids):
                kv = kv[:, :, :, : len(ids) - 1]
            kwargs["cache"] = self.build_cache(kv)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self._pad_id(),
            streamer=_TokenClock(on_token) if on_token is not None else None,
            **kwargs,
        )
        return out[0, len(ids) :].tolist()

    def generate_timed(
        self, ids: Sequence[int], *, kv: torch.Tensor | None = None, max_new_tokens: int = 64
    ) -> TimedGeneration:
        """:meth:`generate`, timing the first new token and the whole run from this call."""
        started = time.perf_counter()
        first: list[float] = []

        def stamp() -> None:
            if not first:
                first.append(time.perf_counter())

        new_ids = self.generate(ids, kv=kv, max_new_tokens=max_new_tokens, on_token=stamp)
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
