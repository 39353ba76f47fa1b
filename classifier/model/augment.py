"""Data augmentation layers for fine-tuning and the baseline (`finetune.augment`): flips, shifts,
rotation, zoom and a centred shear; none when features are extracted."""

from __future__ import annotations

import math
from typing import Any

import keras

from classifier.config import AugmentParams


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
