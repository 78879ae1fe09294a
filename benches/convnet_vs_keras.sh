#!/usr/bin/env bash
# One training epoch of each of the book's from-scratch convnets (MNIST 5.1,
# cats vs. dogs 5.2), convflow (`benches/convnet_epoch.rs`) and Keras on
# TensorFlow CPU (`benches/peer/keras_convnet.py`) in turn, ROUNDS times, on
# images in memory of the same shapes, counts, batch sizes and optimizer.
# Prints a markdown table of median images/s and the ratio, and writes
# bench-results/convnet_vs_keras.json. Run it on a quiet machine.
#
#   benches/convnet_vs_keras.sh [ROUNDS]        (default 3)
#
# MODELS picks the models (default "mnist cats_dogs fine_tune"; fine_tune is
# VGG16's block5 + head on cached block4 maps against Keras's whole VGG16).
#
# Env: PY, a Python with tensorflow-cpu (default .bench-venv/bin/python, which
# benches/compare.sh installs); CONVFLOW_KERAS_IMAGES caps the images per epoch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-3}"
MODELS="${MODELS:-mnist cats_dogs fine_tune}"
PY="${PY:-$ROOT/.bench-venv/bin/python}"
"$PY" -c 'import tensorflow' 2>/dev/null || { echo "convnet_vs_keras: $PY has no tensorflow (run benches/compare.sh, or set PY)" >&2; exit 2; }
cargo bench --bench convnet_epoch --no-run >/dev/null 2>&1
BIN="$(ls -t target/release/deps/convnet_epoch-* | grep -v '\.d$' | head -1)"
mkdir -p bench-results
OUT=bench-results/convnet_vs_keras.jsonl
: > "$OUT"
for round in $(seq "$ROUNDS"); do
  for model in $MODELS; do
    "$BIN" "$model" | sed "s/^{/{\"side\": \"convflow\", \"round\": $round, /" >> "$OUT"
    TF_CPP_MIN_LOG_LEVEL=2 "$PY" benches/peer/keras_convnet.py "$model" 2>/dev/null \
      | sed "s/^{/{\"side\": \"keras\", \"round\": $round, /" >> "$OUT"
  done
done
"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| one training epoch, images in memory | convflow images/s | Keras (TF CPU) images/s | ratio |")
print("|---|---|---|---|")
summary = {}
for model in dict.fromkeys(r["model"] for r in rows):
    med = {side: statistics.median(r["images_per_second"] for r in rows if r["model"] == model and r["side"] == side)
           for side in ["convflow", "keras"]}
    one = next(r for r in rows if r["model"] == model)
    summary[model] = {**med, "ratio": med["convflow"] / med["keras"], "images": one["images"], "batch": one["batch"],
                      "runs": [r for r in rows if r["model"] == model]}
    print(f"| {model} ({one['images']} images, batch {one['batch']}) | {med['convflow']:.1f} | {med['keras']:.1f} | "
          f"{med['convflow'] / med['keras']:.2f}x |")
json.dump(summary, open("bench-results/convnet_vs_keras.json", "w"), indent=1)
PYEOF
