#!/usr/bin/env python3
"""convflow against what users run today, on the same data and machine, in
one run. Driven by benches/compare.sh (which makes the virtual environment
and builds convflow); run it through that.

Rows (medians of alternating repeats; every ratio from the same run):
  decode + resize 150x150      convflow (decode min_size / full decode) vs Keras
                               ImageDataGenerator (the book's code) vs tf.data,
                               and the ceiling: the same decode + resize on two
                               bare threads (cargo bench --bench decode -- 2_threads)
  + the book's augmentation    the same three, with rotation 40, shifts 0.2,
                               shear 0.2, zoom 0.2, horizontal flip, fill nearest
  VGG16 features               cargo bench --bench extraction: convflow end to
                               end vs bare model vs the plain Python loop; at
                               150x150 and 224x224, each engine (winograd,
                               onnx) end to end and bare, against bare ORT
  warm-cache rerun             pipelines/extract_features.yaml twice on a
                               hard-linked subset; the second run is timed
  dense head, 30 epochs        cargo bench --bench head -- 30_epochs (criterion) vs Keras (or numpy)
  compute floor                13.2 GFLOP per image against the best measured
                               sgemm rate (numpy's BLAS, ONNX Runtime's MLAS)

Writes OUT/compare.md and OUT/compare.json and prints the table.
"""
import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVFLOW = ROOT / "target/release/convflow"
PEER = ROOT / "benches/peer"
VGG16_GFLOP = 13.2


def log(msg):
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, timeout=1800):
    """Runs cmd, returns stdout; raises with stderr's tail when it fails."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full_env, timeout=timeout,
                       cwd=ROOT)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))}... exited {p.returncode}: {tail}")
    return p.stdout


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in: {text[-300:]}")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def convflow_rate(pipeline, sets, report_dir):
    """images/s of a convflow run: images through the last stage over the
    run's wall time less its set-up (process start is ~ms); and the CPU
    milliseconds per image of the whole process (all threads, set-up included)."""
    report = Path(report_dir) / "report.json"
    args = [CONVFLOW, "run", pipeline, "--quiet", "--set", f"report={report}"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    cpu = children_cpu()
    run(args)
    cpu = children_cpu() - cpu
    r = json.loads(report.read_text())
    images = r["stages"][-1]["items_in"]
    return {"images_per_second": images / (r["wall_seconds"] - r["setup_seconds"]),
            "cpu_ms_per_image": 1000 * cpu / images}


def ceiling_rate(train, n):
    """images/s of `cargo bench --bench decode -- 2_threads`: the n photos,
    already in memory, decoded (min_size 150) and resized on two threads
    that do nothing else; criterion's median time per pass over them."""
    run(["cargo", "bench", "--bench", "decode", "--", "2_threads"],
        env={"CONVFLOW_BENCH_DATA": str(train), "CONVFLOW_BENCH_IMAGES": str(n)}, timeout=900)
    est = ROOT / "target/criterion/decode_resize_150/min_size_150_nearest_2_threads/new/estimates.json"
    return {"images_per_second": n / (json.loads(est.read_text())["median"]["point_estimate"] / 1e9)}


def py_rate(python, script, args, env=None):
    return last_json(run([python, PEER / script, *args], env=env))


class Table:
    def __init__(self):
        self.rows = []
        self.notes = []

    def add(self, benchmark, system, unit, values, better="higher", baseline=False, note="", cpu=()):
        values = [v for v in values if v is not None]
        cpu = [c for c in cpu if c is not None]
        row = {"benchmark": benchmark, "system": system, "unit": unit, "values": values,
               "median": statistics.median(values) if values else None, "better": better,
               "baseline": baseline, "note": note,
               "cpu_ms_per_image": statistics.median(cpu) if cpu else None}
        self.rows.append(row)
        return row

    def ratios(self):
        """Each row of a benchmark against the benchmark's convflow (baseline) row."""
        for row in self.rows:
            base = next((r for r in self.rows if r["benchmark"] == row["benchmark"] and r["baseline"]), None)
            row["convflow_vs_this"] = None
            if base and base is not row and base["median"] and row["median"]:
                b, v = base["median"], row["median"]
                row["convflow_vs_this"] = b / v if row["better"] == "higher" else v / b

    def markdown(self):
        out = ["| benchmark | system | result (median) | runs | CPU ms/image | convflow vs this |",
               "| --- | --- | --- | --- | --- | --- |"]
        last = None
        for r in self.rows:
            bench = r["benchmark"] if r["benchmark"] != last else ""
            last = r["benchmark"]
            if r["median"] is None:
                result, runs = r["note"] or "n/a", ""
            else:
                result = f"{fmt(r['median'])} {r['unit']}"
                runs = " / ".join(fmt(v) for v in r["values"]) if len(r["values"]) > 1 else ""
                if r["note"]:
                    result += f" ({r['note']})"
            ratio = "" if r["convflow_vs_this"] is None else f"{r['convflow_vs_this']:.2f}x"
            if r["baseline"] and r["median"] is not None:
                ratio = "(convflow)"
            cpu = "" if r["cpu_ms_per_image"] is None else f"{r['cpu_ms_per_image']:.3f}"
            out.append(f"| {bench} | {r['system']} | {result} | {runs} | {cpu} | {ratio} |")
        return "\n".join(out)


def fmt(v):
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def machine():
    info = {"cpu": "unknown", "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        info["git"] = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return info


def warm_page_cache(folder):
    for p in Path(folder).rglob("*"):
        if p.is_file():
            p.read_bytes()


def has_augment_stage():
    try:
        return re.search(r"^augment:", run([CONVFLOW, "stages"]), re.M) is not None
    except RuntimeError:
        return False


def images_and_augment(t, args, python, tf_ok, tmp):
    train = Path(args.data) / "train"
    warm_page_cache(train)
    augment = has_augment_stage()
    decode_yaml = ROOT / "benches/pipelines/decode_resize.yaml"
    augment_yaml = ROOT / "benches/pipelines/decode_augment.yaml"
    vals = {k: [] for k in ("cf_fast", "cf_full", "ceiling", "keras", "tf", "cf_aug", "keras_aug", "tf_aug")}
    errors = {}

    def attempt(key, fn):
        try:
            vals[key].append(fn())
        except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            errors.setdefault(key, str(e))
            log(f"{key} failed: {e}")

    base = {"data_dir": train}
    n = sum(1 for p in train.rglob("*") if p.is_file())
    for rep in range(args.repeats):
        log(f"decode/augment repeat {rep + 1}/{args.repeats}")
        attempt("cf_fast", lambda: convflow_rate(decode_yaml, dict(base, min_size=150), tmp))
        attempt("keras", lambda: py_rate(python, "keras_idg.py", [train]))
        attempt("cf_full", lambda: convflow_rate(decode_yaml, dict(base, min_size="null"), tmp))
        attempt("ceiling", lambda: ceiling_rate(train, n))
        if tf_ok:
            attempt("tf", lambda: py_rate(python, "tf_data.py", [train]))
        if augment:
            attempt("cf_aug", lambda: convflow_rate(augment_yaml, dict(base, min_size=150), tmp))
        attempt("keras_aug", lambda: py_rate(python, "keras_idg.py", [train, "--augment"]))
        if tf_ok:
            attempt("tf_aug", lambda: py_rate(python, "tf_data.py", [train, "--augment"]))

    def add(benchmark, system, key, baseline=False, missing=None):
        note = errors.get(key, "") if missing is None else missing
        t.add(benchmark, system, "images/s", [v["images_per_second"] for v in vals[key]], baseline=baseline,
              note=note, cpu=[v.get("cpu_ms_per_image") for v in vals[key]])

    no_tf = None if tf_ok else "tensorflow-cpu did not install"
    b1 = f"decode + resize to 150x150 ({n} images, batches of 20)"
    add(b1, "convflow, decode `min_size: 150` (DCT-scaled JPEG decode), 2 workers", "cf_fast", baseline=True)
    add(b1, "convflow, full decode (exact, the default), 2 workers", "cf_full")
    add(b1, "ceiling: the same decode + resize on two bare threads, photos in memory, nothing else "
        "(`cargo bench --bench decode -- 2_threads`)", "ceiling")
    add(b1, "Keras ImageDataGenerator (keras-preprocessing 1.1.2, the book's code), 1 process", "keras")
    add(b1, "tf.data + Keras preprocessing layers (parallel map, prefetch)", "tf", missing=no_tf)
    b2 = f"decode + resize + the book's augmentation ({n} images)"
    add(b2, "convflow, decode min_size + resize + augment", "cf_aug", baseline=True,
        missing=None if augment else "augment stage not available")
    add(b2, "Keras ImageDataGenerator with the book's augmentation", "keras_aug")
    add(b2, "tf.data + Keras Random* layers", "tf_aug", missing=no_tf)


def extraction(t, args):
    log(f"VGG16 extraction bench, {args.vgg_images} images")
    b = f"VGG16 features ({args.vgg_images} images, 150x150, batch 20)"
    env = {"CONVFLOW_BENCH_DATA": str(Path(args.data) / "train"), "CONVFLOW_BENCH_IMAGES": str(args.vgg_images),
           "CONVFLOW_BENCH_REPEATS": str(args.repeats)}
    try:
        run(["cargo", "bench", "--bench", "extraction"], env=env, timeout=3600)
        j = json.loads((ROOT / "target/bench/extraction.json").read_text())
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        t.add(b, "convflow end to end", "images/s", [], baseline=True, note=f"bench failed: {e}")
        return None
    t.add(b, "convflow end to end (read, decode, resize, batch, VGG16, write)", "images/s",
          j["convflow_images_per_second"], baseline=True)
    t.add(b, "bare ONNX Runtime model, tensors already in memory", "images/s", j["bare_images_per_second"])
    py = j.get("python_loop_images_per_second")
    t.add(b, "plain Python loop (PIL + onnxruntime, batch 20)", "images/s", [py] if py else [],
          note="" if py else "did not run (.venv missing: models/setup.sh)")
    # Each engine at each size, against the bare ONNX Runtime model (same run).
    isa = j.get("engine_isa")
    for size, rows in (j.get("sizes") or {}).items():
        bs = f"VGG16 engines ({args.vgg_images} images, {size}x{size}, batch 20)"
        w4 = rows.get("winograd")
        t.add(bs, f"convflow end to end, engine winograd ({isa})", "images/s",
              w4["convflow_images_per_second"] if w4 else [], baseline=True,
              note="" if w4 else "the model is not a plain VGG")
        if w4:
            t.add(bs, f"bare winograd engine ({isa}), tensors already in memory", "images/s",
                  w4["bare_images_per_second"])
        t.add(bs, "convflow end to end, engine onnx", "images/s", rows["onnx"]["convflow_images_per_second"])
        t.add(bs, "bare ONNX Runtime model, tensors already in memory", "images/s",
              rows["onnx"]["bare_images_per_second"])
    return j


def warm_cache(t, args, tmp, python_loop_rate):
    """A subset of the book's splits, hard-linked (no copy) where the file
    system allows, run through pipelines/extract_features.yaml twice."""
    sub = Path(tmp) / "subset"
    k = args.cache_images_per_class
    for split in ("train", "validation", "test"):
        for cls_dir in sorted((Path(args.data) / split).iterdir()):
            if not cls_dir.is_dir():
                continue
            dst = sub / split / cls_dir.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:k]:
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy(f, dst / f.name)
    n = sum(1 for p in sub.rglob("*") if p.is_file())
    log(f"warm-cache rerun on {n} images")
    b = f"warm-cache rerun (pipelines/extract_features.yaml, {n} images, whole command)"
    cmd = [CONVFLOW, "run", ROOT / "pipelines/extract_features.yaml", "--quiet", "--set", f"data_dir={sub}",
           "--set", f"out_dir={Path(tmp) / 'features'}", "--set", f"cache_dir={Path(tmp) / 'cache'}"]
    try:
        times = []
        for _ in range(2):
            s = time.perf_counter()
            run(cmd)
            times.append(time.perf_counter() - s)
        report = json.loads((Path(tmp) / "features/report.json").read_text())
        hits = (report.get("cache") or {}).get("hits")
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        t.add(b, "convflow second run", "s", [], better="lower", baseline=True, note=f"failed: {e}")
        return
    t.add(b, f"convflow second run ({hits} cache hits)", "s", [times[1]], better="lower", baseline=True)
    t.add(b, "convflow first run (empty cache)", "s", [times[0]], better="lower")
    if python_loop_rate:
        t.add(b, "plain Python loop (no cache: every run pays the model)", "s", [n / python_loop_rate],
              better="lower", note="from the VGG16 row's rate")


def head(t, args, python, tf_ok, tmp):
    feats = Path(tmp) / "head-features"
    log("dense head: synthetic features, 30 epochs")
    b = "the book's dense head, 30 epochs (2000 x 8192 train, 1000 validation, batch 20)"
    try:
        run([python, PEER / "make_features.py", feats])
    except RuntimeError as e:
        t.add(b, "convflow", "s", [], better="lower", baseline=True, note=f"no features: {e}")
        return
    cf, peer, peer_name, errors = [], [], None, {}
    script = "keras_head.py" if tf_ok else "numpy_head.py"
    peer_name = "Keras (tensorflow-cpu), model.fit" if tf_ok else "numpy (tensorflow-cpu did not install)"
    for rep in range(args.head_repeats):
        try:
            # criterion's head/30_epochs: 10 samples of one whole run each; their median.
            run(["cargo", "bench", "--bench", "head", "--", "30_epochs"], env={"CONVFLOW_HEAD_FEATURES": str(feats)},
                timeout=1800)
            sample = json.loads((ROOT / "target/criterion/head/30_epochs/new/sample.json").read_text())
            cf.append(statistics.median(t / i / 1e9 for t, i in zip(sample["times"], sample["iters"])))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors.setdefault("cf", str(e))
        try:
            peer.append(py_rate(python, script, [feats])["seconds"])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors.setdefault("peer", str(e))
    t.add(b, "convflow (cargo bench --bench head -- 30_epochs, all cores)", "s", cf, better="lower", baseline=True,
          note=errors.get("cf", ""))
    t.add(b, peer_name, "s", peer, better="lower", note=errors.get("peer", ""))


def sgemm(pythons):
    """sgemm GFLOP/s through numpy's BLAS (each interpreter) and ONNX Runtime's MLAS (where it imports)."""
    env = dict(os.environ)
    # Set on some processors for old OpenBLAS builds; they slow a current numpy (unset for this command only).
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    found = []
    for python in pythons:
        try:
            p = subprocess.run([str(python), PEER / "sgemm.py"], capture_output=True, text=True, env=env, timeout=600)
            j = last_json(p.stdout)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            log(f"sgemm with {python} failed: {e}")
            continue
        found.append((j["numpy_gflops"], f"numpy sgemm ({j['blas']})"))
        if j.get("onnxruntime_gflops"):
            found.append((j["onnxruntime_gflops"], "ONNX Runtime MatMul (MLAS)"))
    return found


def floor(t, samples, e2e, bare):
    b = f"compute floor (VGG16 {VGG16_GFLOP} GFLOP per 150x150 image)"
    if not samples:
        t.add(b, "sgemm", "GFLOP/s", [], note="sgemm did not run")
        return None
    gflops, how = max(samples)
    best = gflops / VGG16_GFLOP
    t.add(b, "convflow end to end (VGG16 row)", "images/s", [e2e] if e2e else [], baseline=True,
          note=f"{100 * e2e / best:.0f}% of the floor" if e2e else "")
    t.add(b, "bare model (VGG16 row)", "images/s", [bare] if bare else [],
          note=f"{100 * bare / best:.0f}% of the floor" if bare else "")
    t.add(b, f"floor: {gflops:.0f} GFLOP/s ({how}, best of {len(samples)} measures) / {VGG16_GFLOP} GFLOP",
          "images/s", [best], note="the best possible")
    return {"gflops": gflops, "how": how, "samples": samples, "images_per_second": best}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--data", default=str(ROOT / "../shared/data/cats_and_dogs_small"))
    ap.add_argument("--python", default=sys.executable, help="interpreter with the peers installed")
    ap.add_argument("--tf", choices=["yes", "no"], default="yes", help="did tensorflow-cpu install")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vgg-images", type=int, default=100)
    ap.add_argument("--cache-images-per-class", type=int, default=10)
    ap.add_argument("--head-repeats", type=int, default=2)
    ap.add_argument("--only", default="images,extraction,cache,head,floor")
    args = ap.parse_args()
    only = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "train").is_dir():
        sys.exit(f"compare: {args.data}/train not found: pass --data (the book's cats_and_dogs_small)")
    tf_ok = args.tf == "yes"
    info = machine()
    t = Table()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convflow-compare-") as tmp:
        if "images" in only:
            images_and_augment(t, args, args.python, tf_ok, tmp)
        # sgemm right before and after the VGG16 runs: the machine may be shared, take the best.
        pythons = [args.python, ROOT / ".venv/bin/python"]
        samples = sgemm(pythons) if "floor" in only else []
        ex = extraction(t, args) if "extraction" in only or "floor" in only else None
        samples += sgemm(pythons) if "floor" in only else []
        e2e = statistics.median(ex["convflow_images_per_second"]) if ex else None
        bare = statistics.median(ex["bare_images_per_second"]) if ex else None
        py_loop = ex.get("python_loop_images_per_second") if ex else None
        if "cache" in only:
            warm_cache(t, args, tmp, py_loop)
        if "head" in only:
            head(t, args, args.python, tf_ok, tmp)
        floor_info = floor(t, samples, e2e, bare) if "floor" in only else None
    t.ratios()
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["load_average_at_end"] = os.getloadavg()
    header = (f"Machine: {info['cpu']}, {info['cores']} cores, {info.get('memory_gib', '?')} GiB; "
              f"{info['date']}; convflow {info.get('git', '')}; load average at start "
              f"{', '.join(f'{x:.1f}' for x in info.get('load_average_at_start', ()))}; "
              f"{info['seconds']:.0f} s in all.")
    md = ["# convflow vs. peers", "", header, "", t.markdown(), "",
          "Reproduce: `benches/compare.sh` (results in bench-results/). Medians of alternating repeats; "
          "each ratio compares two figures of this one run. `convflow vs this` > 1: convflow is faster."]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    (out / "compare.json").write_text(json.dumps({"machine": info, "rows": t.rows, "floor": floor_info,
                                                  "extraction": ex}, indent=2) + "\n")
    print("\n".join(md))
    log(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")


if __name__ == "__main__":
    main()
