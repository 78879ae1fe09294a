#!/usr/bin/env bash
# The whole GPU check of docs/gpu.md in one go, on the device machine (one
# H200, 16 cores, CUDA 13 in the image's Python packages, no network).
# Earlier calls left the parts of benches/gpu/pack.sh in /tmp/cf-parts (each
# call: mkdir -p /tmp/cf-parts && cp .device/part.* /tmp/cf-parts/); this
# joins them, installs the onnxruntime-gpu libraries where the wheel would
# put them (beside the nvidia-* packages, so convflow finds CUDA unaided),
# then writes every figure under $OUT:
#   env.txt         GPU, driver, libraries, what the provider links
#   check.txt       extract_features.yaml on cpu / cuda / cuda+tf32 / cuda+fp16: providers, feature differences
#   gpu_fp16.json   benches/gpu.rs again on the half-precision model (models/make_fp16.py), in the same call
#                   as gpu.json's float32 baseline
#   extract.log     those runs' output
#   gpu.json        benches/gpu.rs: bare model, decode ceiling, end to end
#   bench.log       its progress lines;  dmon.log  nvidia-smi dmon during it
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

mkdir -p /tmp/cf-parts && cp -n .device/part.* /tmp/cf-parts/ 2>/dev/null
REPO=$PWD
if [ -f .device/SHA256SUMS ]; then
  (cd /tmp/cf-parts && sha256sum -c --quiet "$REPO/.device/SHA256SUMS") || { say "the parts do not match SHA256SUMS"; exit 1; }
fi
say "parts: $(ls /tmp/cf-parts | tr '\n' ' ')"
if [ ! -x /tmp/cf/bin/convflow ]; then
  cat /tmp/cf-parts/part.* | python3 -c '
import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode="r|").extractall("/tmp", filter="fully_trusted")' \
    || { say "cannot unpack the parts"; exit 1; }
fi
CF=/tmp/cf
SP=$(python3 -c 'import onnxruntime, os; print(os.path.dirname(os.path.dirname(onnxruntime.__file__)))' 2>/dev/null \
     || python3 -c 'import site; print(site.getsitepackages()[0])')
CAPI=$SP/onnxruntime/capi
mkdir -p "$CAPI" && cp -f $CF/ort/*.so* "$CAPI/"
export ORT_DYLIB_PATH=$CAPI/libonnxruntime.so.1.31.1
export LD_LIBRARY_PATH=$CF/bin   # libjpeg only: CUDA is found by convflow itself
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; python3 --version; echo "site-packages: $SP"; ls "$SP/nvidia" "$SP"/nvidia/*/lib 2>&1 | head -60
  echo "--- what the CUDA provider links (with the nvidia-* folders on the path, for this listing only)"
  LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':') ldd "$CAPI/libonnxruntime_providers_cuda.so" | grep -E "cu|not found"
  ldd $CF/bin/convflow | grep -E "not found|jpeg"
} > "$OUT/env.txt" 2>&1
say "env: $(head -2 "$OUT/env.txt" | tail -1)"

# 1. extract_features.yaml on real photos: CPU, CUDA, CUDA + TF32, CUDA with 2 sessions and batch 64.
D=/tmp/data; rm -rf $D; mkdir -p $D
for s in train validation test; do for c in cats dogs; do mkdir -p $D/$s/$c; done; done
for c in cats dogs; do
  ls $CF/photos/$c | sort | awk -v d=$D -v c=$c -v src=$CF/photos/$c \
    '{ s = (NR <= 100) ? "train" : (NR <= 150) ? "validation" : "test"; system("ln -s " src "/" $0 " " d "/" s "/" c "/" $0) }'
done
run() {  # name, --set args...
  local name=$1; shift
  say "extract_features $name"
  timeout 120 $CF/bin/convflow run pipelines/extract_features.yaml --set data_dir=$D --set preprocess=caffe \
    --set base=$CF/vgg16_notop.onnx --set cache_dir= --set out_dir=/tmp/o/$name "$@" > /tmp/extract-$name.log 2>&1
  echo "$name exit $?" >> "$OUT/check.txt"
  { echo "=== $name: $*"; cat /tmp/extract-$name.log; } >> "$OUT/extract.log"
}
: > "$OUT/check.txt"
run cpu --set device=cpu
run cuda --set device=cuda
if ! grep -q "^cuda exit 0" "$OUT/check.txt"; then
  # Say why, then find out whether the libraries or their discovery failed:
  # the same run with every nvidia-* folder on LD_LIBRARY_PATH.
  tail -5 /tmp/extract-cuda.log
  python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$CAPI/libonnxruntime_providers_cuda.so" 2>&1 | tail -2
  export LD_LIBRARY_PATH=$CF/bin:$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')
  echo "retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$OUT/check.txt"
  run cuda --set device=cuda
  tail -5 /tmp/extract-cuda.log
fi
run tf32 --set device=cuda --set tf32=true
run cuda64x2 --set device=cuda --set batch_size=64 --set inference_workers=2
run fp16 --set device=cuda --set base=$CF/vgg16_notop.fp16.onnx --set batch_size=128 --set inference_workers=2
python3 - "$OUT/check.txt" <<'PY'
import json, sys, numpy as np
out = open(sys.argv[1], "a")
def load(run, split):
    return np.load(f"/tmp/o/{run}/{split}/features.npy"), open(f"/tmp/o/{run}/{split}/paths.txt").read()
for run in ["cpu", "cuda", "tf32", "cuda64x2", "fp16"]:
    try:
        rep = json.load(open(f"/tmp/o/{run}/report.json"))
        vgg = [s for s in rep["stages"] if s["id"] == "conv_base"][0]["details"]
        print(run, "provider", vgg.get("provider"), "tf32", vgg.get("tf32"), "pinned", vgg.get("pinned_memory"),
              "bottleneck:", rep.get("bottleneck"), file=out)
    except Exception as e:
        print(run, "no report:", e, file=out)
for run in ["cuda", "tf32", "cuda64x2", "fp16"]:
    for split in ["train", "validation", "test"]:
        try:
            a, pa = load("cpu", split); b, pb = load(run, split)
        except Exception as e:
            print(run, split, "missing:", e, file=out); continue
        scale = np.abs(a).reshape(len(a), -1).max(axis=1)            # each image's largest feature
        d = np.abs(a - b).reshape(len(a), -1).max(axis=1)
        big = np.abs(a) > 1e-2 * np.abs(a).max()
        rel = (np.abs(a - b)[big] / np.abs(a)[big])
        print(f"{run} vs cpu {split}: n={len(a)} same order={pa == pb} "
              f"max|d|/max|cpu| per image: worst {float((d / scale).max()):.3e} median {float(np.median(d / scale)):.3e}; "
              f"elementwise rel (|cpu| > 1% of max): max {float(rel.max()):.3e} p99 {float(np.quantile(rel, 0.99)):.3e}",
              file=out)
PY
cat "$OUT/check.txt"

# 2. The figures: bare model, decode ceiling, end to end.
(nvidia-smi dmon -s u -d 1 > "$OUT/dmon.log" 2>&1 &)
say "bench"
CONVFLOW_GPU_PHOTOS=$CF/photos CONVFLOW_GPU_MODEL=$CF/vgg16_notop.onnx CONVFLOW_GPU_DEVICE=cuda \
  CONVFLOW_GPU_OUT=$OUT/gpu.json timeout ${BENCH_TIMEOUT:-420} $CF/bin/gpu_bench 2> "$OUT/bench.log"
say "bench exit $?"
# The half-precision model: bare and end to end at the batches where float32 peaked, and past them.
say "bench fp16"
CONVFLOW_GPU_PHOTOS=$CF/photos CONVFLOW_GPU_MODEL=$CF/vgg16_notop.fp16.onnx CONVFLOW_GPU_DEVICE=cuda \
  CONVFLOW_GPU_SECTIONS=bare,e2e CONVFLOW_GPU_BATCHES=128,256,512 \
  CONVFLOW_GPU_E2E=${FP16_E2E:-150/256/2/fp32,150/512/3/fp32,224/256/2/fp32} \
  CONVFLOW_GPU_OUT=$OUT/gpu_fp16.json timeout ${BENCH_FP16_TIMEOUT:-240} $CF/bin/gpu_bench 2> "$OUT/bench_fp16.log"
say "bench fp16 exit $?"
pkill -f "nvidia-smi dmon" || true
tail -40 "$OUT/bench.log"
