"""The Python Loader against `convflow run` on the same graph and against
what Python users feed training with today, side by side in one run, on the
book's training photos with its augmentation (150x150, batch 20):

    convflow run benches/pipelines/decode_augment.yaml    the CLI, the graph's own speed
    convflow.Loader(stage="augment")                      the same graph, batches into Python
    Keras PyDataset over ImageDataGenerator               benches/peer/keras_pydataset.py --augment
    tf.data + Keras preprocessing layers                  benches/peer/tf_data.py --augment

then the Loader's resident memory over 30 epochs (flat: within 5%).

    python/.venv/bin/python benches/python_loader.py [--repeats 5] [--peer-python .bench-venv/bin/python]

The peers run in the bench venv benches/compare.sh makes (.bench-venv:
benches/peer/requirements.txt, scipy for the augmentation, and
requirements-tf.txt, TensorFlow and Keras 3); without it only the two
convflow rows are measured.

Run it on a quiet machine (no build beside it). Medians of the repeats,
the four interleaved so drift hits each alike. Prints a Markdown table and
one JSON line.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "benches/pipelines/decode_augment.yaml"


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cli_rate(binary, data, workers):
    report = ROOT / "bench-results/python_loader/report.json"
    subprocess.run([str(binary), "run", "-q", str(GRAPH), "--set", f"data_dir={data}", "--set", f"workers={workers}",
                    "--set", f"report={report}"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    r = json.loads(report.read_text())
    files = next(s for s in r["stages"] if s["id"] == "files")
    return files["items_out"] / r["wall_seconds"]


def loader_rate(data, workers):
    import convflow

    p = convflow.Pipeline(GRAPH, data_dir=data, workers=workers)
    loader = convflow.Loader(p, stage="augment", batch_size=20, shuffle=True, drop_last=False)
    start = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - start)


def peer_rate(python, script, data):
    out = subprocess.run([python, str(ROOT / "benches/peer" / script), str(data), "--augment"], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def memory_over_epochs(data, workers, epochs):
    import convflow

    p = convflow.Pipeline(GRAPH, data_dir=data, workers=workers)
    loader = convflow.Loader(p, stage="augment", batch_size=20)
    rss = []
    for e in range(epochs):
        loader.set_epoch(e)
        batch = None
        for batch in loader:
            pass
        # The loader's memory, not the caller's: the last batch is the
        # caller's array until it lets go of it.
        batch = None
        gc.collect()
        rss.append(rss_mb())
    return rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cats_and_dogs_small/train"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--binary", default=str(ROOT / "target/release/convflow"))
    ap.add_argument("--peer-python", default=str(ROOT / ".bench-venv/bin/python"))
    args = ap.parse_args()
    peers = Path(args.peer_python).exists()
    rows = {"convflow run": [], "convflow.Loader": []}
    if peers:
        rows["Keras PyDataset (ImageDataGenerator)"] = []
        rows["tf.data"] = []
    for _ in range(args.repeats):
        rows["convflow run"].append(cli_rate(args.binary, args.data, args.workers))
        rows["convflow.Loader"].append(loader_rate(args.data, args.workers))
        if peers:
            rows["Keras PyDataset (ImageDataGenerator)"].append(
                peer_rate(args.peer_python, "keras_pydataset.py", args.data))
            try:
                rows["tf.data"].append(peer_rate(args.peer_python, "tf_data.py", args.data))
            except subprocess.CalledProcessError:
                rows.pop("tf.data")
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    rss = memory_over_epochs(args.data, args.workers, args.epochs)
    later = rss[1:] or rss
    growth = (max(later) - min(later)) / min(later)
    loader = med["convflow.Loader"]
    print(f"| what | images/s (median of {args.repeats}) | convflow.Loader is |")
    print("| --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {'' if k == 'convflow.Loader' else f'{loader / v:.2f}x'} |")
    print(f"\nLoader RSS over {args.epochs} epochs: first {rss[0]:.0f} MB, epochs 2-{args.epochs} "
          f"{min(later):.0f}-{max(later):.0f} MB ({100 * growth:.1f}% spread)")
    print(json.dumps({"medians": med, "runs": rows, "rss_mb": rss, "rss_spread_after_first": growth,
                      "workers": args.workers, "data": args.data}))


if __name__ == "__main__":
    sys.exit(main())
