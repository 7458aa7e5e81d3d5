"""kvzip's coverage-guided fuzz harnesses (atheris / libFuzzer).

One rule is checked everywhere: any input may be refused, but only with a
:class:`kvzip.errors.KvzipError` (the C entry points: with ``ValueError``, which
their Python callers turn into a ``CodecError``) -- never another exception, a
crash, a hang or unbounded memory.

    python -m fuzz.run --target all --runs 100000     # a campaign (docs/reliability.md)
    python -m fuzz.harness container -runs=1000        # one target, libFuzzer flags
    python -m fuzz.make_corpus                         # re-derive fuzz/corpus/ from the golden files

``fuzz.targets`` holds the targets and imports kvzip only when a target is set up,
so the harness can instrument kvzip's modules as they are imported.
"""
