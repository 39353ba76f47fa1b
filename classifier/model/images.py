"""Prepared pictures as model input: the splits of the manifest (`load_split`), decoding as
training does, and batches of them: tf.data pipelines on TensorFlow, a Keras PyDataset read by
threads on JAX (`Batches`), which needs no TensorFlow.

Both decode a file the same way: the RGB pixels of the picture, resized to the model's size with
antialiased bilinear interpolation (TensorFlow's `tf.image.resize(..., antialias=True)`; `resize`
computes the same in numpy), as float32 0..255.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from classifier.data import manifest, pictures
from classifier.errors import StageError
from classifier.model import backend

#: Threads that decode pictures for a Batches.
WORKERS = min(16, os.cpu_count() or 1)


@dataclass(frozen=True)
class Split:
    """The images of one split, in manifest order, with integer labels."""

    paths: list[str]
    labels: np.ndarray  # int32 index into `classes`
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def load_split(prepared: Path, split: str) -> Split:
    """The images of `split` listed in `prepared/manifest.csv`; classes are sorted label names."""
    rows = manifest.read(prepared)
    classes = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    chosen = [row for row in rows if row["split"] == split]
    if not chosen:
        raise StageError(
            f"{Path(prepared) / manifest.MANIFEST} lists no image in split '{split}': run the prepare stage again"
        )
    return Split(
        paths=[str(Path(prepared) / row["path"]) for row in chosen],
        labels=np.array([index[row["label"]] for row in chosen], dtype=np.int32),
        classes=classes,
    )


def on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def decode_tf(path: Any, image_size: tuple[int, int]) -> Any:
    """One image file (a string tensor) -> float32 RGB tensor of `image_size`, values 0..255."""
    import tensorflow as tf

    return decode_bytes(tf.io.read_file(path), image_size)


def decode_bytes(data: Any, image_size: tuple[int, int]) -> Any:
    """An encoded image (one of `pictures.FORMATS`) -> float32 RGB array of `image_size`, 0..255:
    by TensorFlow on TensorFlow (a tensor), else by Pillow and `resize` (a numpy array)."""
    if not on_tensorflow():
        return decode_pillow(data, image_size)
    import tensorflow as tf

    image = tf.cond(
        tf.io.is_jpeg(data),  # libjpeg's accurate integer transform, as Pillow decodes; not the default fast one
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    image.set_shape((*image_size, 3))
    return image


@functools.lru_cache(maxsize=64)
def _resize_weights(before: int, after: int) -> np.ndarray:
    """(after, before) weights of antialiased bilinear resampling along one axis, as TensorFlow's
    ScaleAndTranslate computes them: a triangle kernel, widened by the shrink factor when shrinking,
    centred on each output pixel's centre, normalised to sum 1."""
    scale = after / before
    width = max(1.0, 1.0 / scale)
    centres = (np.arange(after, dtype=np.float64) + 0.5) / scale
    weights = np.maximum(0.0, 1.0 - np.abs((np.arange(before) + 0.5 - centres[:, None]) / width))
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.flags.writeable = False  # cached: shared by every picture of these sizes
    return weights


def resize(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 -> (height, width, C) by antialiased bilinear resampling."""
    rows = _resize_weights(image.shape[0], image_size[0])
    columns = _resize_weights(image.shape[1], image_size[1])
    return np.einsum("ih,hwc,jw->ijc", rows, image, columns, optimize=True).astype(np.float32)


def decode_pillow(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """An encoded image -> float32 RGB numpy array of `image_size`, 0..255, without TensorFlow."""
    with Image.open(io.BytesIO(data), formats=pictures.FORMATS) as picture:
        return resize(np.asarray(picture.convert("RGB"), dtype=np.float32), image_size)


def model_input(
    data: bytes, image_size: tuple[int, int], max_side: int, max_pixels: int | None = None, min_side: int = 1
) -> np.ndarray:
    """An encoded picture (the bytes of its file) as the model gets it: float32 (H, W, 3) RGB, 0..255.

    The picture is normalised by `pictures` into the very JPEG bytes `prepare` would write for it
    (upright, transparency on white, longest side `max_side`, re-encoded), then decoded by
    `decode_bytes`, as featurize, finetune and evaluate read the prepared files. So `predict`, the
    served model and evaluate's pipeline give a picture the same input, hence the same answer.
    Raises `pictures.Unusable` for a file `prepare` would drop (with its reason): broken, over
    `max_pixels` pixels, or with a side under `min_side` (`data.min_side`: nothing that small was
    measured, and a score of it would look as sure as any other).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"model_input takes the bytes of an image file, not {type(data).__name__}")
    decoded = pictures.decode(data, max_side, max_pixels)
    if min(decoded.original_size) < min_side:
        width, height = decoded.original_size
        raise pictures.Unusable("too_small", f"{width}x{height}, under data.min_side = {min_side}")
    jpeg = pictures.jpeg_file(data, decoded, max_side)
    return np.asarray(decode_bytes(jpeg, image_size), dtype=np.float32)


class Batches(keras.utils.PyDataset):
    """Batches of decoded pictures, read by threads (Keras on JAX): `(images, labels)`, or images alone.

    `shuffle`: a new order each epoch, the same in every process (seeded by `seed` and the epoch).
    `cluster`: this process feeds its own slice of each batch (`batch_size` divided by the number of
    processes). `full`: every batch has `batch_size` pictures, so that it splits evenly over several
    devices; the last is completed from the epoch's first pictures, with a sample weight of 0, so
    that they count in neither the loss nor the metrics.
    """

    def __init__(
        self,
        paths: list[str],
        image_size: tuple[int, int],
        batch_size: int,
        labels: np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        cluster: backend.Cluster | None = None,
        full: bool = False,
    ):
        super().__init__(workers=WORKERS, use_multiprocessing=False, max_queue_size=2 * WORKERS)
        cluster = cluster or backend.Cluster()
        if batch_size % cluster.count:
            raise StageError(
                f"a batch of {batch_size} pictures does not split evenly over {cluster.count} processes: "
                "make the batch size a multiple of the number of processes"
            )
        self.paths, self.image_size, self.batch_size, self.labels = paths, image_size, batch_size, labels
        self.shuffle, self.seed, self.cluster, self.full = shuffle, seed, cluster, full
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int) -> Any:
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        weights = np.ones(len(chosen), dtype=np.float32)
        if self.full and len(chosen) < self.batch_size:
            missing = self.batch_size - len(chosen)
            chosen = np.concatenate([chosen, np.resize(self.order, missing)])
            weights = np.concatenate([weights, np.zeros(missing, dtype=np.float32)])
        mine = self.cluster.part(len(chosen))
        chosen, weights = chosen[mine], weights[mine]
        images = np.stack([decode_pillow(Path(self.paths[i]).read_bytes(), self.image_size) for i in chosen])
        if self.labels is None:
            return images
        return (images, self.labels[chosen], weights) if self.full else (images, self.labels[chosen])

    def __iter__(self) -> Iterator[Any]:
        """The batches in order, decoded `WORKERS` at a time a few batches ahead (prediction)."""
        with ThreadPoolExecutor(WORKERS) as pool:
            pending: deque[Future[Any]] = deque()
            for index in range(len(self)):
                pending.append(pool.submit(self.__getitem__, index))
                if len(pending) > 2 * WORKERS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def on_epoch_end(self) -> None:
        # Keras calls this once the epoch's reading threads are stopped: the next epoch's order.
        self.epoch += 1
        self.order = self._order()


def dataset(
    split: Split,
    image_size: tuple[int, int],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Any:
    """Batches of (images, labels) for training; in manifest order unless `shuffle`. On JAX, this
    process's slice of each, completed to `batch_size` when the batch is split over several devices."""
    if not on_tensorflow():
        import jax

        devices = len(jax.devices())  # of every process
        if batch_size % devices:
            raise StageError(
                f"a batch of {batch_size} pictures does not split evenly over {devices} devices: "
                f"make the batch size a multiple of {devices}"
            )
        return Batches(split.paths, image_size, batch_size, split.labels, shuffle, seed, backend.cluster(), devices > 1)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (decode_tf(p, image_size), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def images_only(paths: list[str], image_size: tuple[int, int], batch_size: int) -> Any:
    """Batches of the images at `paths`, in order, for prediction (numpy arrays on JAX)."""
    if not on_tensorflow():
        return Batches([str(p) for p in paths], image_size, batch_size)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(lambda p: decode_tf(p, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
