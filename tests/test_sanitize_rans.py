"""``tests/sanitize_rans.sh`` inside ``make test``: the entropy-coder and codec tests
against an AddressSanitizer + UndefinedBehaviorSanitizer build of ``_rans.c``
(about 30 s on the 2-core reference VM).  Skipped, with the reason, where gcc cannot
build with both sanitizers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # fuzz/ lives at the repository root
    sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "tests" / "sanitize_rans.sh"


def _sanitizers_missing() -> str | None:
    """Why gcc cannot run the script here, or None."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "no gcc on PATH"
    lib = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        return "gcc has no AddressSanitizer runtime (libasan); install libasan for gcc"
    probe = subprocess.run([gcc, "-x", "c", "-shared", "-fPIC", "-fsanitize=address,undefined", "-o", os.devnull, "-"],
                           input="int f(int x) { return x + 1; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        return f"gcc cannot build with -fsanitize=address,undefined: {probe.stderr.strip()[:200]}"
    return None


def test_rans_tests_pass_under_asan_and_ubsan():
    reason = _sanitizers_missing()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=600)
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, report
    assert "runtime error:" not in proc.stderr and "ERROR: AddressSanitizer" not in proc.stderr, report


# Targets whose inputs reach the C coder: their regression files and seeds are replayed
# against the sanitised build too (the plain build may survive an out-of-bounds access
# that the sanitisers report).
C_TARGETS = ["rans-c", "entropy-rans", "payload-lossy-rans", "payload-profile-rans"]


def test_fuzz_inputs_of_the_c_coder_under_asan_and_ubsan(tmp_path: Path):
    reason = _sanitizers_missing()
    if reason:
        pytest.skip(reason)
    import sysconfig

    from fuzz.run import REGRESSIONS
    from fuzz.targets import CORPUS, environment

    shutil.copytree(ROOT / "kvzip", tmp_path / "kvzip", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    so = tmp_path / "kvzip" / "codecs" / f"_rans{sysconfig.get_config_var('EXT_SUFFIX')}"
    # the flags of tests/sanitize_rans.sh
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-std=c99", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                    f"-I{sysconfig.get_paths()['include']}", str(ROOT / "kvzip" / "codecs" / "_rans.c"), "-o", str(so)],
                   check=True)
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, **environment(), "KVZIP_FUZZ_PACKAGE_DIR": str(tmp_path), "LD_PRELOAD": libasan,
           "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0:allocator_may_return_null=1",
           "UBSAN_OPTIONS": "print_stacktrace=1"}
    for target in C_TARGETS:
        files = [p for d in (REGRESSIONS / target, CORPUS / target) if d.is_dir() for p in sorted(d.iterdir())]
        proc = subprocess.run([sys.executable, "-m", "fuzz.harness", target, "--replay", *map(str, files)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "runtime error:" not in proc.stderr, f"{target}:\n{proc.stderr[-6000:]}"
        assert f"C coder from {so}" in proc.stderr, proc.stderr[-2000:]  # the sanitised build, not the checkout's
