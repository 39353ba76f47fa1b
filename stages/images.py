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
from typing import Any

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


def fit(
    model: keras.Model,
    train: Split,
    validation: Split,
    image_size: tuple[int, int],
    batch_size: int,
    epochs: int,
    seed: int,
    callbacks: list[keras.callbacks.Callback],
) -> dict[str, list[float]]:
    """Train `model` on the train split's images, shuffled with `seed`, validated on the validation
    split each epoch; return its per-epoch history."""
    history = model.fit(
        dataset(train, image_size, batch_size, shuffle=True, seed=seed),
        validation_data=dataset(validation, image_size, batch_size),
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself, with the seed
        callbacks=callbacks,
        verbose=2,
    )
    return history.history


def images_only(paths: list[str], image_size: tuple[int, int], batch_size: int) -> tf.data.Dataset:
    """Batches of the images at `paths`, in order, for prediction."""
    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    ds = ds.map(lambda p: decode(p, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def shear_matrix(angles: Any, height: Any) -> Any:
    """Transforms for `keras.ops.image.affine_transform` (one row of 8 an angle): shears about the centre row.

    A positive angle moves the rows below the centre to the right and those above it to the left,
    each by tan(angle) times its distance from the centre row ((height - 1) / 2, as RandomRotation
    and RandomZoom centre theirs); the centre row stays put, so a vertical line leans by `angle`.
    Each maps an output pixel (x, y) to the input point it samples (Keras's convention):
    x_in = x - tan(angle) * (y - centre), y_in = y.
    """
    tangents = keras.ops.tan(keras.ops.cast(angles, "float32"))
    centre = (keras.ops.cast(height, "float32") - 1.0) / 2.0
    ones = keras.ops.ones_like(tangents)
    zeros = keras.ops.zeros_like(tangents)
    return keras.ops.stack([ones, -tangents, tangents * centre, zeros, ones, zeros, zeros, zeros], axis=1)


@keras.saving.register_keras_serializable(package="stages")
class CentredShear(keras.layers.Layer):
    """Random horizontal shear about the image centre, as ImageDataGenerator's `shear_range` did.

    Keras 3's RandomShear shears about the top-left corner: its top row never moves and its bottom
    row moves twice as far as a centred shear moves it. Here each image gets its own angle, drawn
    uniformly from `factor` (radians: s means [-s, s], a pair (low, high) that range) by a seeded
    generator, and is sheared about its centre. Only in training; at inference the images pass
    through unchanged.

    The direction is ImageDataGenerator's (Keras 2): a positive angle leans vertical lines
    counter-clockwise as displayed (`shear_matrix`). Its matrix also stretched the image vertically
    by 1/cos(angle), 2% at 0.2 radians; this is a pure shear. (The recipe's Keras 1 applied that
    matrix to (row, column) coordinates, so it sheared columns up and down instead; keras-preprocessing
    fixed the axes in 2020. With angles drawn symmetrically, the sign itself changes nothing.)
    """

    def __init__(
        self,
        factor: float | tuple[float, float] | list[float],
        interpolation: str = "bilinear",
        fill_mode: str = "nearest",
        fill_value: float = 0.0,
        seed: int | None = None,
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if isinstance(factor, (tuple, list)):
            if len(factor) != 2:
                raise ValueError(f"CentredShear: factor must be one angle or a (low, high) pair, got {factor!r}")
            low, high = sorted(float(f) for f in factor)
        else:
            low, high = -abs(float(factor)), abs(float(factor))
        if not -math.pi / 2 < low <= high < math.pi / 2:
            raise ValueError(f"CentredShear: shear angles must lie in (-pi/2, pi/2) radians, got {[low, high]}")
        self.factor = (low, high)
        self.interpolation = interpolation
        self.fill_mode = fill_mode
        self.fill_value = fill_value
        self.seed = seed
        self.data_format = data_format or keras.config.image_data_format()
        if self.data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"CentredShear: unknown data_format {self.data_format!r}")
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training:
            return inputs
        images = inputs if len(inputs.shape) == 4 else keras.ops.expand_dims(inputs, 0)
        shape = keras.ops.shape(images)
        height = shape[1] if self.data_format == "channels_last" else shape[2]
        angles = keras.random.uniform(
            (shape[0],), minval=self.factor[0], maxval=self.factor[1], dtype="float32", seed=self.generator
        )
        outputs = keras.ops.image.affine_transform(
            images,
            shear_matrix(angles, height),
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
            data_format=self.data_format,
        )
        return outputs if len(inputs.shape) == 4 else keras.ops.squeeze(outputs, 0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "factor": list(self.factor),
            "interpolation": self.interpolation,
            "fill_mode": self.fill_mode,
            "fill_value": self.fill_value,
            "seed": self.seed,
            "data_format": self.data_format,
        }


def augmentation(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """The classic recipe's random transforms, as Keras preprocessing layers (active only in training).

    Like ImageDataGenerator's, the rotation, shear and zoom act about the image centre (Keras 3's
    RandomRotation and RandomZoom do; its RandomShear does not, hence `CentredShear`).
    None when every transform is switched off.
    """
    layers: list[keras.Layer] = []
    fill: dict[str, Any] = {"fill_mode": "nearest"}
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation / 360.0, seed=seed, name="rotation", **fill))
    if params.width_shift or params.height_shift:
        layers.append(
            keras.layers.RandomTranslation(params.height_shift, params.width_shift, seed=seed + 1, name="shift", **fill)
        )
    if params.shear:
        layers.append(CentredShear(params.shear, seed=seed + 2, name="shear", **fill))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, params.zoom, seed=seed + 3, name="zoom", **fill))
    if params.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4, name="flip"))
    return keras.Sequential(layers, name="augmentation") if layers else None
