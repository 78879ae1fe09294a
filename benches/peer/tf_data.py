"""tf.data with Keras preprocessing layers, the way TensorFlow's own tutorials
load an image folder today: image_dataset_from_directory(image_size=(150, 150),
batch_size=20, label_mode='binary', interpolation='nearest' as Keras's
load_img), Rescaling(1/255), optionally augmentation layers close to the
book's (RandomRotation(40 degrees), RandomTranslation(0.2, 0.2),
RandomShear(0.2 degrees), RandomZoom(0.2), RandomFlip('horizontal'), fill
'nearest'), map with num_parallel_calls=AUTOTUNE, prefetch. One epoch over
DIR after a 5-batch warm-up (graph tracing).

    python tf_data.py DIR [--augment]

Prints one JSON line: images, seconds, images_per_second, cpu_ms_per_image
(CPU time of all the process's threads over the timed loop), versions.
"""
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    root = sys.argv[1]
    augment = "--augment" in sys.argv[2:]
    ds = keras.utils.image_dataset_from_directory(
        root, image_size=(150, 150), batch_size=20, label_mode="binary", interpolation="nearest", verbose=False
    )
    layers = [keras.layers.Rescaling(1.0 / 255)]
    if augment:
        layers += [
            keras.layers.RandomRotation(40 / 360, fill_mode="nearest"),
            keras.layers.RandomTranslation(0.2, 0.2, fill_mode="nearest"),
            keras.layers.RandomShear(x_factor=math.tan(math.radians(0.2)), fill_mode="nearest"),
            keras.layers.RandomZoom(0.2, fill_mode="nearest"),
            keras.layers.RandomFlip("horizontal"),
        ]
    pipe = keras.Sequential(layers)
    ds = ds.map(lambda x, y: (pipe(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    for _ in ds.take(5):
        pass
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for x, _ in ds:
        images += int(x.shape[0])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({
        "images": images, "seconds": seconds, "images_per_second": images / seconds,
        "cpu_ms_per_image": 1000 * cpu / images,
        "tensorflow": tf.__version__, "keras": keras.__version__,
    }))


if __name__ == "__main__":
    main()
