"""The book's dense head (5.3.1) in Keras on the same cached features as
`cargo bench --bench head`: Dense(256, relu) -> Dropout(0.5) ->
Dense(1, sigmoid), RMSprop(learning_rate=2e-5), binary cross-entropy,
30 epochs, batch 20, validation after every epoch.

    python keras_head.py FEATURES_DIR [EPOCHS]

FEATURES_DIR holds train/ and validation/, each features.npy [N,4,4,512]
and labels.npy [N]. Prints one JSON line: seconds (model.fit), val_acc.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def load(d):
    x = np.load(os.path.join(d, "features.npy")).reshape(-1, 4 * 4 * 512)
    return x, np.load(os.path.join(d, "labels.npy"))


def main():
    root = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    xt, yt = load(os.path.join(root, "train"))
    xv, yv = load(os.path.join(root, "validation"))
    model = keras.Sequential([
        keras.Input(shape=(4 * 4 * 512,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=2e-5), loss="binary_crossentropy",
                  metrics=["acc"])
    start = time.perf_counter()
    history = model.fit(xt, yt, epochs=epochs, batch_size=20, validation_data=(xv, yv), verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "epochs": epochs, "val_acc": float(history.history["val_acc"][-1]),
                      "keras": keras.__version__}))


if __name__ == "__main__":
    main()
