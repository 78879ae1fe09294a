#!/usr/bin/env bash
# Packs what the GPU machine needs for benches/gpu/device_check.sh into parts
# small enough for the device tool's 64 MiB per call (the tree travels too):
#   .device/part.NN   one xz tar, split; each call carries one part
# The tar holds the release binaries (convflow, the gpu bench), the
# onnxruntime-gpu 1.31.1 libraries (CUDA 13; from PyPI, sha256-checked), the
# VGG16 conv base, its half-precision copy (models/make_fp16.py) and 400 of
# the book's test photos. Nothing here is committed.
#
#   benches/gpu/pack.sh          then, on the device, in call order:
#   carry [.device/part.00] ... and last: bash benches/gpu/device_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
WHEEL_SHA=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
DL=models/.downloads
PART_MB=${PART_MB:-52}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

if [ ! -f "$DL/$WHEEL" ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1 -d "$DL"
fi
[ "$(sha256sum "$DL/$WHEEL" | cut -d' ' -f1)" = "$WHEEL_SHA" ] || { echo "sha256 mismatch: $DL/$WHEEL" >&2; exit 1; }

mkdir -p "$STAGE/cf/ort" "$STAGE/cf/bin" "$STAGE/cf/photos"
.venv/bin/python - "$DL/$WHEEL" "$STAGE/cf/ort" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in ["libonnxruntime.so.1.31.1", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so"]:
    open(f"{sys.argv[2]}/{n}", "wb").write(z.read(f"onnxruntime/capi/{n}"))
PY

cargo build --release --bin convflow
bench=$(cargo bench --bench gpu --no-run --message-format=json 2>/dev/null \
  | .venv/bin/python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
cp target/release/convflow "$STAGE/cf/bin/convflow"
cp "$bench" "$STAGE/cf/bin/gpu_bench"
strip "$STAGE/cf/bin/"*
# libjpeg-turbo is linked dynamically; the GPU machine's image may lack it.
ldd target/release/convflow | awk '/libjpeg|libturbojpeg/ {print $3}' | xargs -r -I{} cp -L {} "$STAGE/cf/bin/"
cp models/vgg16_notop.onnx "$STAGE/cf/"
.venv/bin/python models/make_fp16.py models/vgg16_notop.onnx "$STAGE/cf/vgg16_notop.fp16.onnx"
for c in cats dogs; do
  mkdir -p "$STAGE/cf/photos/$c"
  ls ../shared/data/cats_and_dogs_small/test/$c | sort | sed -n 1,200p \
    | xargs -I{} cp ../shared/data/cats_and_dogs_small/test/$c/{} "$STAGE/cf/photos/$c/"
done
rm -rf .device && mkdir -p .device
tar -C "$STAGE" -cf - cf | xz -T2 -6 | split -b "${PART_MB}m" -d - .device/part.
ls -la .device
(cd .device && sha256sum part.* > SHA256SUMS)
