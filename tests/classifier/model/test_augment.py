"""The fine-tuning augmentation: a shear about the image centre, as ImageDataGenerator's, and reproducible."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from classifier.config import AugmentParams
from classifier.model import augment

SIZE = 150  # the recipe's image size: the magnitudes below are in its pixels
CENTRE = (SIZE - 1) / 2  # 74.5: pixel centres sit on integer coordinates


def vertical_line(batch: int = 1, column: int = 75) -> np.ndarray:
    """A batch of SIZE x SIZE one-channel images, black but for one bright column."""
    image = np.zeros((batch, SIZE, SIZE, 1), np.float32)
    image[:, :, column, :] = 255.0
    return image


def line_shift(image: np.ndarray, row: int, column: int = 75) -> float:
    """How far right of `column` the bright line lies in `row` (its intensity-weighted centre)."""
    weights = image[row, :, 0].astype(np.float64)
    assert weights.sum() > 0, f"the line left the image in row {row}"
    return float((weights * np.arange(SIZE)).sum() / weights.sum()) - column


def fixed_shear(angle: float, **kwargs) -> augment.CentredShear:
    """A CentredShear that always draws `angle`, with a black fill so the line alone is seen."""
    return augment.CentredShear((angle, angle), fill_mode="constant", **kwargs)


def test_keras_random_shear_is_anchored_at_the_top_left_corner():
    """Why CentredShear exists: RandomShear leaves the top row and moves the bottom row tan(a) * 149 px."""
    angle = 0.2
    shear = keras.layers.RandomShear(x_factor=(math.tan(angle),) * 2, fill_mode="constant", seed=0)
    out = np.asarray(shear(vertical_line(batch=4), training=True))
    for image in out:  # RandomShear picks the sign itself, at random
        assert abs(line_shift(image, 0)) < 0.5
        assert abs(line_shift(image, SIZE - 1)) == pytest.approx(math.tan(angle) * (SIZE - 1), abs=1.0)  # 30.2 px


@pytest.mark.parametrize("angle", [0.2, -0.2, 0.5])
def test_centred_shear_moves_top_and_bottom_rows_equally_and_oppositely(angle):
    out = np.asarray(fixed_shear(angle, seed=0)(vertical_line(), training=True))[0]
    reach = math.tan(angle) * CENTRE  # 15.1 px at 0.2 radians, half of RandomShear's bottom row
    assert line_shift(out, 0) == pytest.approx(-reach, abs=1.0)  # a positive angle moves the top row left
    assert line_shift(out, SIZE - 1) == pytest.approx(reach, abs=1.0)  # ... and the bottom row right
    for row in (74, 75):  # the two rows either side of the centre (74.5) stay within half a pixel
        assert abs(line_shift(out, row)) < 0.5
    # A straight line stays straight: every row moves tan(angle) times its distance from the centre.
    rows = np.arange(0, SIZE, 10)
    shifts = np.array([line_shift(out, r) for r in rows])
    np.testing.assert_allclose(shifts, math.tan(angle) * (rows - CENTRE), atol=1.0)


def test_centred_shear_moves_nothing_vertically():
    image = np.zeros((1, SIZE, SIZE, 1), np.float32)
    image[0, 40, :, 0] = 255.0  # a horizontal line, well above the centre
    out = np.asarray(fixed_shear(0.3, seed=0)(image, training=True))[0, :, :, 0]
    lit = out.sum(axis=1)
    assert lit.argmax() == 40 and lit[40] > 0.99 * lit.sum()


def test_shear_matrix_is_a_shear_about_the_centre_row():
    angles = np.array([0.2, -0.5], np.float32)
    matrix = np.asarray(augment.shear_matrix(angles, SIZE))
    t = np.tan(angles)
    one, zero = np.ones(2), np.zeros(2)
    expected = np.stack([one, -t, t * CENTRE, zero, one, zero, zero, zero], axis=1)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)


def test_each_image_gets_its_own_angle_within_the_range():
    shear = augment.CentredShear(0.4, fill_mode="constant", seed=3)
    out = np.asarray(shear(vertical_line(batch=16), training=True))
    slopes = np.array([(line_shift(image, SIZE - 1) - line_shift(image, 0)) / (SIZE - 1) for image in out])
    angles = np.arctan(slopes)
    assert np.all(np.abs(angles) <= 0.4 + 0.01)
    assert len(np.unique(np.round(angles, 3))) == 16 and angles.min() < 0 < angles.max()


def test_inference_is_the_identity():
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    shear = augment.CentredShear(0.5, seed=0)
    np.testing.assert_array_equal(np.asarray(shear(batch, training=False)), batch)
    np.testing.assert_array_equal(np.asarray(shear(batch)), batch)  # no training flag: inference
    whole = augment.augmentation(AugmentParams(), seed=0)
    np.testing.assert_array_equal(np.asarray(whole(batch, training=False)), batch)
    assert not np.array_equal(np.asarray(whole(batch, training=True)), batch)


def test_the_same_seed_gives_the_same_augmented_batch():
    batch = np.random.default_rng(1).uniform(0, 255, (4, 48, 48, 3)).astype(np.float32)

    def sheared(seed: int) -> np.ndarray:
        return np.asarray(augment.CentredShear(0.5, seed=seed)(batch, training=True))

    np.testing.assert_array_equal(sheared(5), sheared(5))
    assert not np.array_equal(sheared(5), sheared(6))

    def augmented(seed: int) -> np.ndarray:
        return np.asarray(augment.augmentation(AugmentParams(), seed)(batch, training=True))

    np.testing.assert_array_equal(augmented(42), augmented(42))
    assert not np.array_equal(augmented(42), augmented(43))


def test_the_augmentation_shears_about_the_centre_by_the_param():
    layer = augment.augmentation(AugmentParams(shear=0.3), seed=0).get_layer("shear")
    assert isinstance(layer, augment.CentredShear)
    assert layer.factor == (-0.3, 0.3) and layer.fill_mode == "nearest" and layer.interpolation == "bilinear"


def test_the_layer_survives_its_config(tmp_path):
    shear = augment.CentredShear(0.25, fill_mode="reflect", seed=9, name="shear")
    config = shear.get_config()
    again = augment.CentredShear.from_config(config)
    assert again.get_config() == config
    assert again.factor == (-0.25, 0.25) and again.fill_mode == "reflect" and again.seed == 9
    batch = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again(batch, training=True)), np.asarray(shear(batch, training=True)))

    # Registered: a saved model holding the whole augmentation reloads, in safe mode, as the same layers.
    model = keras.Sequential([keras.Input((32, 32, 3)), augment.augmentation(AugmentParams(), seed=0)])
    model.save(tmp_path / "augment.keras")
    loaded = keras.models.load_model(tmp_path / "augment.keras", safe_mode=True)
    reloaded = loaded.get_layer("augmentation").get_layer("shear")
    assert isinstance(reloaded, augment.CentredShear) and reloaded.factor == (-0.2, 0.2)


def test_the_layer_computes_in_the_mixed_precision_dtype():
    shear = augment.CentredShear(0.2, seed=0, dtype="mixed_bfloat16")
    out = shear(vertical_line(), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert line_shift(np.asarray(out, dtype=np.float32)[0], SIZE - 1) != 0


@pytest.mark.parametrize("factor", [math.pi / 2, (0.1, 2.0), (0.1, 0.2, 0.3)])
def test_bad_factors_are_refused(factor):
    with pytest.raises(ValueError, match="CentredShear"):
        augment.CentredShear(factor)
