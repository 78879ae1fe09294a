"""Keras 3's own ImageDataGenerator (keras.preprocessing.image, the book's
API kept in Keras 3), whose flow_from_directory is a keras.utils.PyDataset:
what a Keras user feeds model.fit with today. target_size (150, 150),
batch_size 20, class_mode 'binary', rescale 1/255, optionally the book's
augmentation. One epoch over DIR, one process, after the listing.

    python keras_pydataset.py DIR [--augment]

Prints one JSON line: images, seconds, images_per_second, cpu_ms_per_image.
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # where Keras 3 exports it (tf.keras's namespace in 3.15)
    from keras.preprocessing.image import ImageDataGenerator  # noqa: E402
except ImportError:
    from keras._tf_keras.keras.preprocessing.image import ImageDataGenerator  # noqa: E402

BOOK_AUGMENTATION = dict(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
                         zoom_range=0.2, horizontal_flip=True, fill_mode="nearest")


def main():
    root = sys.argv[1]
    augment = "--augment" in sys.argv[2:]
    gen = ImageDataGenerator(rescale=1.0 / 255, **(BOOK_AUGMENTATION if augment else {}))
    data = gen.flow_from_directory(root, target_size=(150, 150), batch_size=20, class_mode="binary")
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for i in range(len(data)):  # the PyDataset protocol: __len__, __getitem__
        x, _ = data[i]
        images += x.shape[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"images": images, "seconds": seconds, "images_per_second": images / seconds,
                      "cpu_ms_per_image": 1000 * cpu / images}))


if __name__ == "__main__":
    main()
