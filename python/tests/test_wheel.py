"""The wheel python/tests/setup.sh built: small, abi3, libjpeg inside, no
OpenSSL, no ONNX Runtime."""

import os
import zipfile
from pathlib import Path

from conftest import ROOT, need


def test_the_wheel_is_small_and_carries_what_a_machine_may_lack():
    wheels = sorted((ROOT / "target/wheels").glob("convflow-*.whl"))
    wheel = need(Path(os.environ.get("CONVFLOW_WHEEL", wheels[0] if wheels else ROOT / "target/wheels/none.whl")),
                 "python/tests/setup.sh builds it")
    assert wheel.stat().st_size < 30 * 2**20, wheel.stat().st_size
    assert "-cp310-abi3-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    libs = [n for n in names if n.startswith("convflow.libs/")]
    assert any("libjpeg" in n for n in libs), names
    assert not any(k in n for n in names for k in ("libssl", "libcrypto", "onnxruntime")), names
    assert "convflow/exec.py" in names and "convflow/_native.abi3.so" in names
