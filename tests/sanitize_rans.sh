#!/usr/bin/env bash
# Run the entropy-coder tests against an AddressSanitizer + UndefinedBehaviorSanitizer
# build of kvzip/codecs/_rans.c (a development check, not part of `make test`):
#     bash tests/sanitize_rans.sh            (after `make venv`)
# It copies the package to a temporary directory, builds the sanitised extension
# there, and runs the tests with that copy first on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PY:-$root/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r kvzip "$tmp/kvzip"
rm -f "$tmp"/kvzip/codecs/_rans*.so
inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ext=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
gcc -shared -fPIC -O1 -g -std=c99 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer -I"$inc" kvzip/codecs/_rans.c -o "$tmp/kvzip/codecs/_rans$ext"
# Run from the copy: the working directory comes first on the path, ahead of the
# checkout's own kvzip/.  -s: a sanitizer reports on stderr as the process ends,
# which pytest's capture would hide.
cd "$tmp"
export ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 UBSAN_OPTIONS=print_stacktrace=1
export LD_PRELOAD="$(gcc -print-file-name=libasan.so)" PYTHONPATH="$tmp:$root/tests"
"$PY" -c "import kvzip.codecs._rans as r, sys; sys.exit(0 if r.__file__.startswith('$tmp') else 'not the sanitised build')"
"$PY" -m pytest -q -s -p no:cacheprovider -o addopts="" --rootdir="$root" \
    "$root"/tests/test_rans.py "$root"/tests/test_entropy_fast.py "$root"/tests/test_golden.py \
    "$root"/tests/test_format_fuzz.py "$root"/tests/test_codecs_lossy.py
