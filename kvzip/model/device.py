"""Where a model runs and in what dtype: ``--device`` and ``--model-dtype``.

``auto`` picks an accelerator when torch sees one (CUDA, then Apple's MPS), else the
CPU.  The weights' dtype defaults to float32 on the CPU (the embedded default's figures
are measured there) and bfloat16 on an accelerator (what 7-8B models are run in).  Both
are independent of the dtype a ``.kvz`` stores (``--dtype``), and neither changes the
model's fingerprint (:meth:`KVModel.identity`).
"""

from __future__ import annotations

import re

import torch

from kvzip.errors import InputError

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|meta|mps|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch device ``spec`` names (None or ``auto``: CUDA, else MPS, else the CPU);
    an accelerator torch cannot use here is refused with one line."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not _DEVICE.match(spec):
        raise InputError(f"--device must be {DEVICE_CHOICES}, got {spec!r}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: torch sees no CUDA device on this machine "
                             "(this torch build may be CPU-only); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise InputError(f"--device {spec}: torch sees no MPS device on this machine; use --device cpu")
    return device


def resolve_model_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``spec`` (float32, bfloat16, float16), else float32 on the CPU
    and bfloat16 on an accelerator."""
    if isinstance(spec, torch.dtype):
        if spec not in MODEL_DTYPES.values():
            raise InputError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got {spec}")
        return spec
    if spec is None or spec == "auto":
        return torch.float32 if device.type in ("cpu", "meta") else torch.bfloat16
    if spec not in MODEL_DTYPES:
        raise InputError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)} or auto, got {spec!r}")
    return MODEL_DTYPES[spec]


def is_accelerator(device: torch.device) -> bool:
    return device.type in ("cuda", "mps")


def pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` (on the CPU) in page-locked memory, so its copy to a CUDA device is one DMA
    transfer."""
    if t.is_pinned():
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
