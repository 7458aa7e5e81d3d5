"""kvzip: prefill once, store the KV cache small, attach it later."""

__version__ = "0.1.0"
