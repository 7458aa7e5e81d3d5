"""A plain ``transformers`` model (and, optionally, its tokenizer) as a :class:`KVModel`.

This is what :mod:`kvzip.hf` (``kvzip.save`` / ``kvzip.load``) stands on: a Hugging Face
user holds a model object, not a kvzip wrapper.  Two things differ from a model the CLI
loads:

- The tokenizer is optional.  The file's model identity is the one the CLI writes for the
  same model and tokenizer (:meth:`KVModel.identity`: config, weights and tokenizer
  hashes); without a tokenizer it records ``"none"`` for the tokenizer.  The K/V depend
  only on the config, the weights and the token ids, so when either side knows no
  tokenizer, the check compares config and weights only; when both do, everything.
- Fingerprinting hashes every weight (about a second per GB), so it is remembered per
  model object while its tensors are unchanged (see :func:`_weights_stamp`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from kvzip.errors import InputError
from kvzip.model.loading import check_architecture
from kvzip.model.session import KVModel

NO_TOKENIZER = "none"  # what KVModel.identity records for a model without a tokenizer


class PlainKVModel(KVModel):
    """A :class:`KVModel` whose identity check leaves out the tokenizer when either the
    file or this model has none (the K/V do not depend on it)."""

    def check_identity(self, stored: dict[str, Any]) -> None:
        mine = self.identity()
        unknown = NO_TOKENIZER in (mine["tokenizer_fingerprint"], stored.get("tokenizer_fingerprint"))
        if unknown and any(all(stored.get(k) == ident()[k] for k in ("config_sha256", "weights_sha256"))
                           for ident in (lambda: mine, self.legacy_identity)):  # legacy only if needed
            return
        super().check_identity(stored)


# model -> {id(tokenizer): (stamp, weak tokenizer, identity)}; weak on the model, and holding no tensor
# or model reference, so a cached fingerprint never keeps a model's memory alive.
_IDENTITIES: weakref.WeakKeyDictionary[Any, dict[Any, tuple[Any, Any, dict[str, str]]]] = (
    weakref.WeakKeyDictionary()
)
_PROBES = 8  # elements read per tensor by the stamp


def _weights_stamp(model: Any) -> tuple[Any, ...]:
    """A cheap summary that changes when the weights do: per tensor its storage address,
    autograd version counter (bumped by every in-place write outside ``.data``), dtype,
    shape and device, and a few of its values (which catch storage that was swapped and
    happened to land at the same address, e.g. after ``model.half().float()``).
    An in-place edit through ``.data`` of values the probe does not read goes unseen."""
    parts: list[Any] = []
    probes: list[torch.Tensor] = []
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            parts.append((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device)))
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // _PROBES)
                probes.append(flat[::step][:_PROBES].to(torch.float64).cpu())
        values = torch.cat(probes).numpy().tobytes() if probes else b""
    return (tuple(parts), values)


def as_kv_model(model: Any, tokenizer: Any = None) -> KVModel:
    """``model`` (a ``transformers`` causal LM, or a :class:`KVModel` taken as it is) ready
    for kvzip, with its fingerprint computed once per model object and tokenizer."""
    if isinstance(model, KVModel):
        if tokenizer is None:
            return model
        model = model.model
    config = getattr(model, "config", None)
    if config is None or not callable(model) or not hasattr(model, "state_dict"):
        raise InputError(
            "model= must be a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
            f"got {type(model).__name__}"
        )
    check_architecture(config)
    try:
        known = _IDENTITIES.setdefault(model, {})
        tok_ref = None if tokenizer is None else weakref.ref(tokenizer)
    except TypeError:  # not weak-referenceable: fingerprinted on every call
        return PlainKVModel(model, tokenizer)
    stamp = (_weights_stamp(model), _tokenizer_stamp(tokenizer))
    cached = known.get(id(tokenizer))
    if cached is not None and cached[0] == stamp and (cached[1] is None or cached[1]() is tokenizer):
        return PlainKVModel(model, tokenizer, _identity=dict(cached[2]))
    km = PlainKVModel(model, tokenizer)
    known[id(tokenizer)] = (stamp, tok_ref, dict(km.identity()))
    return km


def _tokenizer_stamp(tokenizer: Any) -> Any:
    """What changes when a tokenizer is edited in place (added tokens, a new chat template)."""
    if tokenizer is None:
        return None
    return (len(tokenizer), getattr(tokenizer, "chat_template", None),
            repr(getattr(tokenizer, "special_tokens_map", None)))
