#!/usr/bin/env bash
# One command: convflow against what users run today (Keras ImageDataGenerator,
# tf.data, a plain Python loop, Keras's dense head), on the same data and the
# same machine, in one run. Prints a table and writes it as OUT/compare.md and
# OUT/compare.json (default OUT: bench-results/, gitignored).
#
#   benches/compare.sh [OUT] [-- compare.py options, e.g. --repeats 5 --only images]
#
# Needs the book's data (../shared/data/cats_and_dogs_small beside the
# checkout, or COMPARE_DATA=...), Python 3.11 and PyPI access the first time.
# Steps: models/setup.sh (ONNX Runtime, VGG16, the .venv the Python loop
# uses); .bench-venv/ with the pinned peers of benches/peer/requirements*.txt
# (tensorflow-cpu is optional: when it does not install, the table says so);
# cargo build --release and the bench binaries; then benches/compare.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="bench-results"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then OUT="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
DATA="${COMPARE_DATA:-$ROOT/../shared/data/cats_and_dogs_small}"
VENV="$ROOT/.bench-venv"
PY="$VENV/bin/python"
log() { echo "compare.sh: $*" >&2; }

models/setup.sh >&2

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
pip() { PIP_NO_INPUT=1 "$PY" -m pip --disable-pip-version-check -q "$@"; }
stamp="$VENV/.installed-$(cat benches/peer/requirements.txt benches/peer/requirements-tf.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the pinned peers into $VENV (first time: a few minutes)"
  pip install -r benches/peer/requirements.txt
  if pip install -r benches/peer/requirements-tf.txt; then echo yes > "$VENV/.tf"; else
    log "tensorflow-cpu did not install: the tf.data and Keras head rows say so"; echo no > "$VENV/.tf"; fi
  touch "$stamp"
fi
TF="$(cat "$VENV/.tf" 2>/dev/null || echo no)"
if [ "$TF" = yes ] && ! "$PY" -c 'import tensorflow' 2>/dev/null; then TF=no; fi

log "building convflow and the benches (release)"
cargo build --release >&2
cargo bench --no-run --bench extraction --bench head --bench decode >&2 2>&1 | tail -n 2 >&2

exec "$PY" benches/compare.py --out "$OUT" --data "$DATA" --python "$PY" --tf "$TF" "$@"
