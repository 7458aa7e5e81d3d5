import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # fuzz/ lives at the repository root
    sys.path.insert(1, str(ROOT))

# Calibration profiles go to one directory per test session, never ~/.cache:
# the first lossy encode for a model calibrates it once, later ones reuse it.
if "KVZIP_PROFILE_DIR" not in os.environ:
    import tempfile

    os.environ["KVZIP_PROFILE_DIR"] = tempfile.mkdtemp(prefix="kvzip-test-profiles-")

from tiny import save_tiny_model, tiny_model  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Sphinx of black quartz, judge my vow. "
) * 2


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a local Hugging Face directory (the --model DIR path)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def real_model_load():
    """The embedded default model, loaded once for the whole session, and the paths of the
    ``gguf.GGUFReader`` objects its load built (one per parse of its .gguf)."""
    import gguf

    from kvzip.model import KVModel

    real, made = gguf.GGUFReader, []

    def counting(path, *args, **kwargs):
        made.append(str(path))
        return real(path, *args, **kwargs)

    gguf.GGUFReader = counting
    try:
        km = KVModel.load(None)
    finally:
        gguf.GGUFReader = real
    return km, made


@pytest.fixture(scope="session")
def real_model(real_model_load):
    """The embedded default model, loaded once for the whole session."""
    return real_model_load[0]
