#!/usr/bin/env bash
# Remakes the section 5.4 pictures in docs/visualize.md: the activations of
# VGG16 for one test cat, and the filter patterns of five VGG16 layers,
# each made by `convflow visualize` and then scaled down (Pillow, from the
# project's .venv) so that the docs stay small.
#
#   docs/img/make_visualize_pictures.sh [DATA_DIR [CONVNET_DIR]]
#
# DATA_DIR defaults to ../shared/data/cats_and_dogs_small. CONVNET_DIR, the
# out_dir of pipelines/convnet_augmented.yaml (about 1 h 20 min to train),
# adds the activations of the book's own augmented convnet.
#
# About 40 minutes on the 2-core development machine, nearly all of it the
# filter patterns (the deeper the layer, the longer).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${1:-../shared/data/cats_and_dogs_small}"
CONVNET="${2:-}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
BIN=target/release/convflow
cargo build --release --quiet
PY=.venv/bin/python

"$BIN" visualize activations "$DATA/test/cats/cat.1700.jpg" --out "$WORK/act"
for l in block1_conv1 block2_conv1 block3_conv1 block4_conv1 block5_conv1; do
  "$BIN" visualize filters --layer "$l" --out "$WORK/filters/$l.png"
done

# shrink SRC DST SCALE [KEEP_ROWS_PX]: scale by SCALE, optionally keeping only
# the top KEEP_ROWS_PX first; JPEG, as noise-like tiles do not compress in PNG.
shrink() {
  "$PY" - "$@" <<'PYEOF'
import sys
from PIL import Image
src, dst, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
img = Image.open(src).convert("RGB")
if len(sys.argv) > 4:
    img = img.crop((0, 0, img.width, int(sys.argv[4])))
img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
img.save(dst, quality=85, optimize=True)
PYEOF
}
# block1_conv1: the title and the first two rows of 16 channels (150 px tiles, 1 px apart).
shrink "$WORK/act/00_block1_conv1.png" docs/img/activations_block1_conv1.jpg 0.5 $((28 + 2 * 151 + 1))
shrink "$WORK/act/06_block3_conv1.png" docs/img/activations_block3_conv1.jpg 0.75
cp "$WORK/act/16_block5_conv3.png" docs/img/activations_block5_conv3.png
for l in block1_conv1 block2_conv1 block3_conv1 block4_conv1 block5_conv1; do
  shrink "$WORK/filters/$l.png" "docs/img/filters_$l.jpg" 0.5
done
if [ -n "$CONVNET" ]; then
  "$BIN" visualize activations "$DATA/test/cats/cat.1700.jpg" --model "$CONVNET" --layers 8 --out "$WORK/convnet"
  shrink "$WORK/convnet/00_conv2d.png" docs/img/activations_convnet_conv2d.jpg 0.5
  shrink "$WORK/convnet/04_conv2d_2.png" docs/img/activations_convnet_conv2d_2.jpg 1
  cp "$WORK/convnet/06_conv2d_3.png" docs/img/activations_convnet_conv2d_3.png
fi
ls -l docs/img/activations_* docs/img/filters_*
