"""kvzip: prefill once, store the KV cache small, attach it later.

For a ``transformers`` model and its cache: :func:`kvzip.save`, :func:`kvzip.load` and
:func:`kvzip.open` (defined in :mod:`kvzip.hf`; :func:`kvzip.pruned_attention` to generate
from a loaded cache with dropped entries); for text in and text out: :mod:`kvzip.api`.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "open", "pruned_attention", "save"]

# save/load/open are imported on first use, so `import kvzip` (which every kvzip module
# does, for __version__) stays free of torch.  importlib rather than an import statement:
# the root package then declares no import of kvzip.hf, which imports kvzip modules that
# import the root package (import-linter would see a cycle).
_LAZY = frozenset({"save", "load", "open", "pruned_attention"})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module("kvzip.hf"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvzip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
