"""Run a fuzz campaign: each chosen target in turn, for N inputs and/or S seconds.

    python -m fuzz.run --target all --runs 100000           # 10^5 inputs per target
    python -m fuzz.run --target all --seconds 600           # ten minutes per target
    python -m fuzz.run --target 'payload-*,rans-c' --seconds 60 --native asan
    python -m fuzz.run --list

(``make fuzz FUZZ_SECONDS=600`` runs the second line.)  Targets run one after another,
never in parallel.  Each is one libFuzzer process (``fuzz.harness``) over

* ``fuzz/work/<target>/``: the campaign's own corpus, kept between runs (``--fresh``
  starts again from the seeds); libFuzzer writes what it finds interesting here;
* ``fuzz/corpus/<target>/``: the seeds, derived from the golden files, never written;
* ``tests/fixtures/attacks/fuzz/<target>/``: every finding kept as a regression file.

A finding (an exception other than a ``KvzipError``, a crash, a sanitizer report, an
input slower than ``--timeout`` s, a process over ``--rss-limit-mb``) stops that target:
the input goes to ``fuzz/crashes/<target>/`` with the log; the next target still runs.
Replay one with ``python -m fuzz.harness TARGET --replay FILE``.  The exit status is 1
when anything was found.

``--native asan`` (or ``ubsan``) fuzzes against a copy of kvzip whose C extension is
built with clang's ``-fsanitize=fuzzer-no-link`` (libFuzzer then sees the C code's
coverage and comparisons) plus AddressSanitizer and UndefinedBehaviorSanitizer (or UBSan
alone, faster); it needs clang (``apt-get install clang``).  Without it, the C code is
fuzzed through what its calls return (``fuzz.targets.feedback``) and only crashes show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz.targets import ROOT, TARGETS, Target, environment, select

FUZZ_DIR = ROOT / "fuzz"
WORK = FUZZ_DIR / "work"
CRASHES = FUZZ_DIR / "crashes"
REGRESSIONS = ROOT / "tests" / "fixtures" / "attacks" / "fuzz"
RANS_C = ROOT / "kvzip" / "codecs" / "_rans.c"

NATIVE_FLAGS = {
    "asan": ["-fsanitize=fuzzer-no-link,address,undefined", "-fno-sanitize-recover=undefined"],
    "ubsan": ["-fsanitize=fuzzer-no-link,undefined", "-fno-sanitize-recover=undefined"],
}
NATIVE_PRELOAD = {"asan": "asan_with_fuzzer.so", "ubsan": "ubsan_with_fuzzer.so"}


@dataclass
class Result:
    target: str
    runs: int = 0
    seconds: float = 0.0
    status: str = "ok"  # ok | crash | timeout | oom | error
    finding: str = ""  # what libFuzzer / atheris said about it
    artifact: str = ""  # the input that shows it
    log: str = ""
    corpus_files: int = 0
    coverage: int = 0  # libFuzzer's "cov" (edges + outcome features) at the end
    command: list[str] = field(default_factory=list)


def native_build(mode: str, dest: Path) -> Path:
    """A copy of kvzip under ``dest`` with ``_rans`` built by clang for ``mode``; reused
    while it is newer than ``_rans.c`` and the Python sources."""
    pkg = dest / "kvzip"
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    so = pkg / "codecs" / f"_rans{ext}"
    newest = max(p.stat().st_mtime for p in (ROOT / "kvzip").rglob("*") if p.suffix in (".py", ".c"))
    if so.is_file() and so.stat().st_mtime > newest:
        return dest
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("--native needs clang (apt-get install clang)")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "kvzip", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    include = sysconfig.get_paths()["include"]
    cmd = [clang, "-shared", "-fPIC", "-O1", "-g", "-std=c99", "-fno-omit-frame-pointer", *NATIVE_FLAGS[mode],
           f"-I{include}", str(RANS_C), "-o", str(so)]
    print("building:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return dest


def native_env(mode: str, package_dir: Path) -> dict[str, str]:
    import atheris

    preload = Path(atheris.path()) / NATIVE_PRELOAD[mode]
    if not preload.is_file():
        raise SystemExit(f"this atheris has no {preload.name}; --native {mode} needs it")
    return {
        "KVZIP_FUZZ_PACKAGE_DIR": str(package_dir),
        "LD_PRELOAD": str(preload),
        # Python's allocations leak by design; a failed huge malloc must return NULL
        # (kvzip's C code checks it) rather than abort
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:handle_abort=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+)", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_FINDINGS = [
    ("timeout", re.compile(r"ERROR: libFuzzer: timeout")),
    ("oom", re.compile(r"ERROR: libFuzzer: (out-of-memory|malloc)")),
    ("crash", re.compile(r"Uncaught Python exception|ERROR: libFuzzer: deadly signal|ERROR: AddressSanitizer|"
                         r"runtime error:|ERROR: libFuzzer: fuzz target exited")),
]


def _finding_text(log: str) -> str:
    """The few lines that say what was found (exception and its last frames, or the report)."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line or "runtime error:" in line or "ERROR: AddressSanitizer" in line \
                or "ERROR: libFuzzer" in line:
            start = i + 1 if "Uncaught" in line else i
            end = next((j for j in range(start, len(lines)) if lines[j].startswith(("MS:", "==", "stat::"))
                        and j > start), len(lines))
            return "\n".join(lines[start : min(end, start + 16)]).strip()
    return ""


def run_target(target: Target, *, runs: int | None = None, seconds: int | None = None, seed: int = 0,
               work: Path | None = None, crashes: Path | None = None, native: str | None = None,
               timeout: int = 20, rss_limit_mb: int = 2048, extra_corpora: tuple[Path, ...] = (),
               quiet: bool = False) -> Result:
    """Fuzz one target in a subprocess; the seeds and regression files are read, never written."""
    work = work or WORK / target.name
    crashes = crashes or CRASHES / target.name
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **environment()}
    if native:
        env.update(native_env(native, native_build(native, WORK / f"native-{native}")))
    flags = [f"-seed={seed}", f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}",
             f"-max_len={target.max_len}", f"-artifact_prefix={crashes}{os.sep}", "-print_final_stats=1"]
    if runs is not None:
        flags.append(f"-runs={runs}")
    if seconds is not None:
        flags.append(f"-max_total_time={seconds}")
    if target.dictionary is not None:
        flags.append(f"-dict={target.dictionary}")
    corpora = [work, target.corpus, *[d for d in (REGRESSIONS / target.name, *extra_corpora) if d.is_dir()]]
    cmd = [sys.executable, "-m", "fuzz.harness", target.name, *flags, *map(str, corpora)]
    log_path = crashes / "last.log"
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    log = log_path.read_text(encoding="utf-8", errors="replace")
    result = Result(target.name, seconds=round(elapsed, 1), log=str(log_path), command=cmd,
                    corpus_files=sum(1 for p in work.iterdir() if p.is_file()))
    progress = _PROGRESS.findall(log)
    if progress:
        result.runs, result.coverage = int(progress[-1][0]), int(progress[-1][1])
    stat = re.search(r"stat::number_of_executed_units: (\d+)", log)
    if stat:
        result.runs = int(stat.group(1))
    if proc.returncode != 0:
        result.status = next((kind for kind, pat in _FINDINGS if pat.search(log)), "error")
        result.finding = _finding_text(log) or log[-2000:]
        artifact = _ARTIFACT.search(log)
        if artifact:
            result.artifact = artifact.group(1)
    if not quiet:
        print(summary_line(result), file=sys.stderr)
        if result.status != "ok":
            print(f"  {result.finding}\n  input: {result.artifact or '-'}\n  log: {log_path}", file=sys.stderr)
    return result


def summary_line(r: Result) -> str:
    rate = r.runs / r.seconds if r.seconds else 0.0
    return (f"{r.target:24} {r.status:8} {r.runs:>10,} inputs {r.seconds:>8.1f} s ({rate:>7,.0f}/s)  "
            f"cov {r.coverage:>5}  corpus {r.corpus_files}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="all", help="'all' or names, comma-separated ('payload-*' matches a prefix)")
    ap.add_argument("--runs", type=int, help="inputs per target")
    ap.add_argument("--seconds", type=int, help="seconds per target")
    ap.add_argument("--seed", type=int, default=0, help="libFuzzer's -seed (0: a random one, printed in the log)")
    ap.add_argument("--native", choices=sorted(NATIVE_FLAGS), help="fuzz a clang build of the C extension")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take")
    ap.add_argument("--rss-limit-mb", type=int, default=2048, help="memory one target's process may use")
    ap.add_argument("--fresh", action="store_true", help="forget fuzz/work/<target>/ and start from the seeds")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--list", action="store_true", help="list the targets")
    args = ap.parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:24} {t.doc}")
        return 0
    if args.runs is None and args.seconds is None:
        ap.error("give --runs and/or --seconds (per target)")
    results = []
    started = time.monotonic()
    for target in select(args.target):
        if args.fresh:
            shutil.rmtree(WORK / target.name, ignore_errors=True)
        results.append(run_target(target, runs=args.runs, seconds=args.seconds, seed=args.seed,
                                  native=args.native, timeout=args.timeout, rss_limit_mb=args.rss_limit_mb))
    total = time.monotonic() - started
    print("\n".join(["", "summary:", *map(summary_line, results),
                     f"{len(results)} target(s), {sum(r.runs for r in results):,} inputs, {total:.0f} s, "
                     f"{sum(r.status != 'ok' for r in results)} with findings"]), file=sys.stderr)
    if args.json:
        meta = {"native": args.native, "runs": args.runs, "seconds": args.seconds, "seed": args.seed,
                "total_seconds": round(total, 1), "cpus": os.cpu_count(), "machine": os.uname().machine,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    return 1 if any(r.status != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
