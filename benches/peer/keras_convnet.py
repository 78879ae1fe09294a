"""One training epoch of the book's two from-scratch convnets in Keras on
TensorFlow's CPU backend, on images already in memory (random pixels of
the real shapes: speed does not depend on their content), to set beside
convflow's `convnet` layers (`cargo bench --bench convnet`, and the
`images_per_second` of a run's report):

  mnist      28x28x1, 60,000 images, batch 64, RMSprop, categorical (5.1)
  cats_dogs  150x150x3, 2,000 images, batch 20, RMSprop lr 1e-4, binary (5.2)
  fine_tune  VGG16 (150x150x3) with block5 trainable and blocks 1-4 frozen,
             then Flatten, Dense(256, relu), Dense(1, sigmoid): the book's
             5.3.3 fine-tuning step, the whole VGG16 forward every step;
             2,000 images, batch 20, RMSprop lr 1e-5, binary. Random weights:
             ImageNet's are a download, and speed does not depend on them.

Prints one JSON line per model: images/s of one epoch after a warm-up of a
few steps (threads: TF's defaults, all cores). `benches/convnet_epoch.rs` is
convflow's side; `benches/convnet_vs_keras.sh` runs both.

    .bench-venv/bin/python benches/peer/keras_convnet.py [mnist|cats_dogs]

Env: CONVFLOW_KERAS_IMAGES caps the images per epoch (a quick check).
"""
import json
import os
import sys
import time

import numpy as np
import keras
from keras import layers


def mnist():
    m = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax"),
    ])
    m.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((60000, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(np.arange(60000) % 10, 10)
    return m, x, y, 64


def cats_dogs():
    m = keras.Sequential([
        keras.Input((150, 150, 3)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(1, activation="sigmoid"),
    ])
    m.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss="binary_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((2000, 150, 150, 3), dtype=np.float32)
    y = (np.arange(2000) % 2).astype(np.float32)
    return m, x, y, 20


def fine_tune():
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(150, 150, 3))
    trainable = False
    for layer in base.layers:  # the book's listing 5.22: block5_conv1 and above train
        trainable = trainable or layer.name == "block5_conv1"
        layer.trainable = trainable
    m = keras.Sequential([keras.Input((150, 150, 3)), base, layers.Flatten(),
                          layers.Dense(256, activation="relu"), layers.Dense(1, activation="sigmoid")])
    m.compile(optimizer=keras.optimizers.RMSprop(1e-5), loss="binary_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((2000, 150, 150, 3), dtype=np.float32) * 255
    y = (np.arange(2000) % 2).astype(np.float32)
    return m, x, y, 20


def main():
    which = sys.argv[1:] or ["mnist", "cats_dogs", "fine_tune"]
    for name in which:
        m, x, y, batch = {"mnist": mnist, "cats_dogs": cats_dogs, "fine_tune": fine_tune}[name]()
        cap = int(os.environ.get("CONVFLOW_KERAS_IMAGES", len(x)))
        x, y = x[:cap], y[:cap]
        # Warm-up: trace the step for a full batch and for the epoch's last, partial one.
        warm = batch * 5 + len(x) % batch
        m.fit(x[:warm], y[:warm], batch_size=batch, epochs=1, verbose=0)
        t = time.perf_counter()
        m.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        s = time.perf_counter() - t
        print(json.dumps({"model": name, "images": len(x), "batch": batch, "seconds": round(s, 3),
                          "images_per_second": round(len(x) / s, 1), "params": m.count_params(),
                          "trainable_params": sum(int(np.prod(w.shape)) for w in m.trainable_weights)}))


if __name__ == "__main__":
    main()
