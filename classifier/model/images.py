"""Prepared pictures as model input: the splits of the manifest (`load_split`), decoding as
training does, and tf.data pipelines over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from classifier.data import manifest, pictures
from classifier.errors import StageError


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


def decode(path: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """One image file -> float32 RGB tensor of `image_size`, values 0..255."""
    return decode_bytes(tf.io.read_file(path), image_size)


def decode_bytes(data: tf.Tensor | bytes, image_size: tuple[int, int]) -> tf.Tensor:
    """An encoded image (JPEG, PNG, GIF, BMP, WebP) -> float32 RGB tensor of `image_size`, 0..255."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    image.set_shape((*image_size, 3))
    return image


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


def dataset(
    split: Split,
    image_size: tuple[int, int],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (images, labels); in manifest order unless `shuffle`."""
    ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (decode(p, image_size), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def images_only(paths: list[str], image_size: tuple[int, int], batch_size: int) -> tf.data.Dataset:
    """Batches of the images at `paths`, in order, for prediction."""
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(lambda p: decode(p, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
