"""Images in and out of the model: the prepared-data manifest, tf.data pipelines, augmentation.

Every stage that reads images goes through here, so decoding and resizing are the same in
featurize, finetune and evaluate. Images enter the model as float32 RGB in 0..255; scaling is the
backbone's own preprocessing (see `backbones.Preprocess`). A new picture (`predict`, the served
model) enters through `model_input`: prepared as `prepare` prepares the data set, then decoded as
these stages decode it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from stages import manifest, pictures
from stages.common import StageError
from stages.config import AugmentParams


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


def model_input(data: bytes, image_size: tuple[int, int], max_side: int, max_pixels: int | None = None) -> np.ndarray:
    """An encoded picture (the bytes of its file) as the model gets it: float32 (H, W, 3) RGB, 0..255.

    The picture is normalised by `pictures` into the very JPEG bytes `prepare` would write for it
    (upright, transparency on white, longest side `max_side`, re-encoded), then decoded by
    `decode_bytes`, as featurize, finetune and evaluate read the prepared files. So `predict`, the
    served model and evaluate's pipeline give a picture the same input, hence the same answer.
    Raises `pictures.Unusable` for a file `prepare` would drop as broken (with its reason).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"model_input takes the bytes of an image file, not {type(data).__name__}")
    jpeg = pictures.normalised_jpeg(data, max_side, max_pixels)
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


def augmentation(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """The classic recipe's random transforms, as Keras preprocessing layers (active only in training).

    None when every transform is switched off.
    """
    layers: list[keras.Layer] = []
    fill = {"fill_mode": "nearest"}
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation / 360.0, seed=seed, name="rotation", **fill))
    if params.width_shift or params.height_shift:
        layers.append(
            keras.layers.RandomTranslation(params.height_shift, params.width_shift, seed=seed + 1, name="shift", **fill)
        )
    if params.shear:
        # Keras's shear factor is the tangent's range; an intensity of s radians shears by tan(s).
        factor = math.tan(params.shear)
        layers.append(keras.layers.RandomShear(x_factor=factor, y_factor=0.0, seed=seed + 2, name="shear", **fill))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, params.zoom, seed=seed + 3, name="zoom", **fill))
    if params.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4, name="flip"))
    return keras.Sequential(layers, name="augmentation") if layers else None
