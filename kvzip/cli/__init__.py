"""The ``kvzip`` command line: the only package that imports typer and rich."""

import os

# tqdm reads TQDM_DISABLE when it is first imported, and transformers' GGUF loader
# draws its own de-quantization bar with it: set before anything imports tqdm so
# the CLI's stderr carries only kvzip's bars.  (The library leaves it to callers.)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
