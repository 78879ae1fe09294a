"""Fixtures of the Python package's tests: the repository, the book's
photos (a small copy), the convflow binary, the tiny model.

Run by the README's test command (tests/python.rs runs pytest with the
wheel tests/setup.sh installed into python/.venv), or by hand:
python/.venv/bin/python -m pytest python/tests
"""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = Path(__file__).resolve().parent / "pipelines"


def need(path, what):
    """A file the set-up makes: CI must have it; elsewhere the test skips."""
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing on CI ({what})")
    pytest.skip(f"{path} not present ({what})")


@pytest.fixture(scope="session")
def book():
    return need(ROOT.parent / "shared/data/cats_and_dogs_small", "the book's photos beside the checkout")


@pytest.fixture(scope="session")
def small_data(book, tmp_path_factory):
    """31 + 31 training photos (62: not a multiple of 3 ranks), 4 + 4 each
    for validation and test, copied from the book's data."""
    out = tmp_path_factory.mktemp("data")
    for split, n in (("train", 31), ("validation", 4), ("test", 4)):
        for cls in ("cats", "dogs"):
            src = book / split / cls
            dst = out / split / cls
            dst.mkdir(parents=True)
            for f in sorted(os.listdir(src))[:n]:
                shutil.copy(src / f, dst / f)
    return out


@pytest.fixture(scope="session")
def convflow_bin():
    path = Path(os.environ.get("CONVFLOW_BIN", ROOT / "target/release/convflow"))
    return need(path, "cargo build --release")


@pytest.fixture(scope="session")
def tiny_model():
    return need(ROOT / "models/tiny_vgg.onnx", "models/setup.sh")


@pytest.fixture(scope="session")
def loader_pipeline():
    return PIPELINES / "loader.yaml"
