"""Pipeline: validate, run (as `convflow run`, bit for bit), stream, errors."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convflow
from conftest import ROOT

FILES = ("features.npy", "labels.npy", "paths.txt", "classes.txt")
SPLITS = ("train", "validation", "test")


def extract(small_data, tiny_model, tmp, name):
    params = dict(data_dir=small_data, base=tiny_model, out_dir=tmp / name / "out", cache_dir=tmp / name / "cache")
    return convflow.Pipeline(ROOT / "pipelines/extract_features.yaml", **params), params


def test_validate_names_file_line_col(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        name: bad
        stages:
          - id: files
            kind: file_reader
            dirr: somewhere
        """))
    with pytest.raises(convflow.PipelineError) as e:
        convflow.Pipeline(bad).validate()
    assert re.search(r"bad\.yaml:5:\d+: stage `files`: field `dirr`", str(e.value)), str(e.value)
    assert e.value.errors[0]["line"] == 5 and e.value.errors[0]["stage"] == "files"
    assert isinstance(e.value, ValueError)


def test_validate_checks_params_and_environment(small_data):
    p = convflow.Pipeline(ROOT / "pipelines/extract_features.yaml", data_dir=small_data / "nowhere")
    assert p.validate(environment=False) == 6
    with pytest.raises(convflow.PipelineError, match=r"extract_features\.yaml:\d+:\d+: stage `files`: field `dir`"):
        p.validate()


def test_run_writes_what_the_cli_writes(small_data, tiny_model, convflow_bin, tmp_path):
    p, params = extract(small_data, tiny_model, tmp_path, "py")
    report = p.run(progress=False)
    assert report["interrupted"] is False
    assert json.loads((tmp_path / "py/out/report.json").read_text())["stages"] == report["stages"]
    cli = [str(convflow_bin), "run", "-q", "pipelines/extract_features.yaml"]
    for k, v in extract(small_data, tiny_model, tmp_path, "cli")[1].items():
        cli += ["--set", f"{k}={v}"]
    subprocess.run(cli, cwd=ROOT, check=True)
    for split in SPLITS:
        for f in FILES:
            a = (tmp_path / "py/out" / split / f).read_bytes()
            b = (tmp_path / "cli/out" / split / f).read_bytes()
            assert a == b, f"{split}/{f} differs"
    assert (tmp_path / "py/out/metrics.prom").exists()


def test_stream_equals_the_written_features(small_data, tiny_model, tmp_path):
    p, _ = extract(small_data, tiny_model, tmp_path, "s")
    p.run(progress=False)
    batches = list(p.stream("conv_base", batch_size=5))
    assert all(len(b) <= 5 for b in batches)
    for split in SPLITS:
        out = tmp_path / "s/out" / split
        rows = [(b, i) for b in batches for i, s in enumerate(b.split) if s == split]
        x = np.stack([b.x[i] for b, i in rows])
        y = np.array([b.y[i] for b, i in rows])
        np.testing.assert_array_equal(x, np.load(out / "features.npy"))
        np.testing.assert_array_equal(y, np.load(out / "labels.npy"))
        assert [b.paths[i] for b, i in rows] == (out / "paths.txt").read_text().splitlines()


def test_stream_writes_nothing_and_needs_only_what_feeds_the_stage(small_data, tmp_path):
    # The model does not exist: streaming `resize` never builds `conv_base`.
    p = convflow.Pipeline(ROOT / "pipelines/extract_features.yaml", data_dir=small_data, base=tmp_path / "none.onnx",
                          out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", image_size=32)
    batches = list(p.stream("resize", batch_size=7))
    assert sum(len(b) for b in batches) == 78
    assert batches[0].x.dtype == np.uint8 and batches[0].x.shape[1:] == (32, 32, 3)
    assert not (tmp_path / "out").exists()


def test_stream_refuses_a_sink_and_an_unknown_stage(small_data):
    p = convflow.Pipeline(ROOT / "pipelines/extract_features.yaml", data_dir=small_data)
    with pytest.raises(ValueError, match=r"stage `write` is a `feature_writer`, a sink: it emits nothing"):
        p.stream("write")
    with pytest.raises(ValueError, match=r"no stage `vgg61`; stages that emit items: files, decode, resize, batch, conv_base"):
        p.stream("vgg61")


def test_run_errors_are_the_clis_words(small_data, tmp_path, convflow_bin):
    data = tmp_path / "data"
    shutil.copytree(small_data / "test", data)
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    pipeline = tmp_path / "fail.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        name: fail
        stages:
          - {{id: files, kind: file_reader, dir: {data}}}
          - {{id: decode, kind: decode, input: files, on_error: fail}}
        """))
    with pytest.raises(convflow.RunError) as e:
        convflow.Pipeline(pipeline).run(progress=False)
    r = subprocess.run([str(convflow_bin), "run", "-q", str(pipeline)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"error: {e.value}" in r.stderr, (str(e.value), r.stderr)
    assert str(e.value).startswith("stage `decode` failed: ") and "broken.jpg" in str(e.value)


SIGINT_SCRIPT = """
import os, signal, sys, threading, time
# Python leaves SIGINT ignored when it starts ignored (a test run launched in
# the background of a non-interactive shell): Ctrl-C's handler, as a terminal has it.
signal.signal(signal.SIGINT, signal.default_int_handler)
import convflow
p = convflow.Pipeline(sys.argv[1], data_dir=sys.argv[2], epochs=1000)
sent = []
def interrupt():
    time.sleep(1.0)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt, daemon=True).start()
try:
    p.run(progress=False)
    print("finished without an interrupt")
except KeyboardInterrupt:
    print(f"raised after {time.monotonic() - sent[0]:.3f}")
"""


def test_sigint_during_run_raises_keyboardinterrupt_promptly(loader_pipeline, small_data):
    r = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, str(loader_pipeline), str(small_data)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    m = re.search(r"raised after ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) < 0.5, r.stdout


def test_import_is_quick_and_imports_no_framework():
    code = "import sys, convflow; print(sorted(m for m in ('torch', 'tensorflow', 'onnxruntime', 'jax', 'keras', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import convflow"], capture_output=True, text=True,
                       check=True)
    # "import time: self [us] | cumulative | name"; the package's line is its total.
    total = [int(line.split("|")[1]) for line in r.stderr.splitlines() if line.rstrip().endswith("| convflow")]
    assert total and total[0] < 100_000, r.stderr[-2000:]


def test_the_onnxruntime_package_library_is_used_unless_ort_dylib_path_says_otherwise():
    from convflow import _ort

    lib = _ort.library()
    if lib is None:
        pytest.skip("no onnxruntime package in this environment")
    assert os.path.basename(os.path.dirname(lib)) == "capi" and "libonnxruntime.so." in lib
    code = "import os, convflow; convflow.Pipeline('x.yaml'); print(os.environ['ORT_DYLIB_PATH'])"
    env = dict(os.environ)
    env.pop("ORT_DYLIB_PATH", None)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == lib
    env["ORT_DYLIB_PATH"] = "/mine/libonnxruntime.so"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == env["ORT_DYLIB_PATH"]


PROGRESS_SCRIPT = """
import sys
import convflow
convflow.Pipeline(sys.argv[1], data_dir=sys.argv[2]).run(progress=sys.argv[3] == "on")
"""


def test_progress_goes_to_python_and_nothing_reaches_raw_stderr(loader_pipeline, small_data, tmp_path):
    # A file that fails to decode: the CLI would log a warning; from Python
    # it is in the report, never on the process's stderr.
    data = tmp_path / "data"
    shutil.copytree(small_data / "train", data / "train")
    (data / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    run = lambda mode: subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, str(loader_pipeline), str(data), mode],
                                      capture_output=True, text=True, timeout=120, cwd=ROOT)
    quiet = run("off")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.stderr
    shown = run("on")
    assert shown.returncode == 0
    if importlib.util.find_spec("tqdm") is not None:
        assert "63/63" in shown.stderr and "img" in shown.stderr, shown.stderr  # tqdm's bar, through Python
    else:
        assert shown.stderr == ""
