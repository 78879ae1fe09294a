"""The Keras adapter drives model.fit for an epoch (the JAX backend: Keras's
numpy backend cannot train; tests/setup.sh installs keras and jax)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import keras
import convflow, convflow.keras
p = convflow.Pipeline(sys.argv[1], data_dir=sys.argv[2])
loader = convflow.Loader(p, stage="augment", batch_size=8, seed=0)
data = convflow.keras.PyDataset(loader, rescale=1 / 255)
model = keras.Sequential([
    keras.Input((64, 64, 3)),
    keras.layers.Conv2D(4, 3, activation="relu"),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["acc"])
history = model.fit(data, epochs=2, verbose=0)
print("epochs", len(history.history["loss"]), "loader epoch", loader.epoch, "steps", len(data))
"""


def test_keras_model_fit_trains_on_a_loader(loader_pipeline, small_data):
    for m in ("keras", "jax"):
        if importlib.util.find_spec(m) is None:  # not imported here: keras picks its backend on import
            if os.environ.get("CI"):
                pytest.fail(f"{m} missing on CI (tests/setup.sh installs it)")
            pytest.skip(f"{m} not installed (tests/setup.sh installs it)")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(loader_pipeline), str(small_data)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epochs 2 loader epoch 1 steps 7" in r.stdout, r.stdout + r.stderr[-2000:]
