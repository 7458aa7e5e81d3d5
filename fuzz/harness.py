"""Run one fuzz target under atheris (libFuzzer), or replay files through it.

    python -m fuzz.harness TARGET [libFuzzer flags] [corpus dirs]     fuzz (flags as libFuzzer's)
    python -m fuzz.harness TARGET --replay FILE...                    replay, no atheris needed

``fuzz.run`` is the campaign driver (flags, corpora, limits and the summary); this is
the process it starts per target.  kvzip's modules are instrumented for coverage as
the target's setup imports them.  ``KVZIP_FUZZ_PACKAGE_DIR``, when set, is put first
on the path: ``fuzz.run --native`` points it at a copy of kvzip whose C extension was
built with clang for coverage (and ASan + UBSan).
"""

from __future__ import annotations

import os
import sys
import traceback
import zlib


def _package_dir_first() -> None:
    where = os.environ.get("KVZIP_FUZZ_PACKAGE_DIR")
    if where:
        sys.path.insert(0, where)


def _say_which_kvzip() -> None:
    if os.environ.get("KVZIP_FUZZ_PACKAGE_DIR"):
        from kvzip.codecs import _rans

        print(f"INFO: kvzip's C coder from {_rans.__file__}", file=sys.stderr)


def replay(name: str, files: list[str]) -> int:
    from fuzz.targets import TARGETS

    one = TARGETS[name].setup()
    _say_which_kvzip()
    failed = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            one(data)
        except Exception:  # the finding: report it and go on with the next file
            failed += 1
            print(f"FAIL {path}", file=sys.stderr)
            traceback.print_exc()
    print(f"replayed {len(files)} file(s) through {name}: {failed} failed", file=sys.stderr)
    return 1 if failed else 0


OUTCOME_FEATURES = 4096


def _outcome_features(atheris):
    """``fuzz.targets.feedback`` for libFuzzer: each distinct outcome key bumps one of a
    pool of extra coverage counters (reserved here, before fuzzing starts)."""
    pool = [atheris._reserve_counter() for _ in range(OUTCOME_FEATURES)]

    def feedback(key: str) -> None:
        # looked up per call: atheris binds its real _trace_branch only in Setup()
        atheris._trace_branch(pool[zlib.crc32(key.encode("utf-8", "replace")) % OUTCOME_FEATURES])

    return feedback


def fuzz(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    from fuzz import targets

    target = targets.TARGETS[name]
    if "kvzip" in sys.modules:
        raise SystemExit("kvzip was imported before the harness could instrument it")
    with atheris.instrument_imports(include=["kvzip"]):
        one = target.setup()
    targets.feedback = _outcome_features(atheris)
    _say_which_kvzip()
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    _package_dir_first()
    name, rest = argv[1], argv[2:]
    if rest[:1] == ["--replay"]:
        return replay(name, rest[1:])
    fuzz(name, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
