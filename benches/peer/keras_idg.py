"""Keras ImageDataGenerator, exactly the book's code path (5.2.5 / 5.3.1):
keras_preprocessing 1.1.2, flow_from_directory(target_size=(150, 150),
batch_size=20, class_mode='binary'), rescale=1./255, optionally the book's
augmentation. One epoch over DIR, one process (as the book runs it).

    python keras_idg.py DIR [--augment]

Prints one JSON line: images, seconds, images_per_second, cpu_ms_per_image
(CPU time of all the process's threads over the timed loop). The timer starts
after the generator is made (the folder listing) and stops after the last batch.
"""
import json
import math
import sys
import time

from keras_preprocessing.image import ImageDataGenerator

BOOK_AUGMENTATION = dict(
    rotation_range=40,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)


def main():
    root = sys.argv[1]
    augment = "--augment" in sys.argv[2:]
    gen = ImageDataGenerator(rescale=1.0 / 255, **(BOOK_AUGMENTATION if augment else {}))
    it = gen.flow_from_directory(root, target_size=(150, 150), batch_size=20, class_mode="binary")
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(math.ceil(it.n / it.batch_size)):
        x, _ = next(it)
        images += x.shape[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"images": images, "seconds": seconds, "images_per_second": images / seconds,
        "cpu_ms_per_image": 1000 * cpu / images}))


if __name__ == "__main__":
    main()
