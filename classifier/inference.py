"""Pictures -> class probabilities: the one path of evaluate, predict and the served model.

A saved classifier takes raw RGB pictures (0..255) at the size it was trained at. `load_model`
loads one to compute in the precision params.yaml asks for on this machine (the served model and
predict use the precision evaluate scored in). `probabilities` decodes encoded pictures as
training did (classifier.model.images.model_input: orientation, colour, the params' size limits)
and predicts; `class_probabilities` does the same for the files of a split, in batches
(`images.images_only`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier import config
from classifier.data import pictures
from classifier.errors import StageError
from classifier.metrics.scores import as_class_probabilities, compute_metrics
from classifier.model import backend, devices, images


@dataclass(frozen=True)
class Limits:
    """What a picture must be to be classified (params.yaml's data.max_side, data.min_side and
    data.max_pixels, as the model was trained with): larger than max_side is shrunk first."""

    max_side: int
    min_side: int = 1
    max_pixels: int | None = None

    @classmethod
    def of(cls, data: config.DataParams) -> Limits:
        return cls(data.max_side, data.min_side, data.max_pixels)


class UnusablePicture(StageError):
    """Picture number `index` of a batch cannot be classified; `reason` is a key of pictures.REASONS."""

    def __init__(self, index: int, cause: pictures.Unusable) -> None:
        super().__init__(str(cause))
        self.index = index
        self.reason = cause.reason


class OutOfTime(StageError):
    """The pictures were not classified by their deadline: the work was given up."""


def load_model(path: str | Path, precision: str) -> Any:
    """The classifier saved at `path` (.keras, loaded in safe mode), computing in the policy
    `precision` (params.yaml's, `auto` included) gives on this machine."""
    import keras

    from classifier.model import backbones  # noqa: F401  registers the custom layers

    saved = keras.models.load_model(path, safe_mode=True)
    return devices.computing_in(saved, devices.precision_policy(precision))


def probabilities(model: Any, files: Sequence[bytes], limits: Limits, deadline: float | None = None) -> np.ndarray:
    """(N, classes) probabilities of `model` for the encoded pictures `files`, decoded and resized as
    in training; `UnusablePicture` names the first that cannot be. Past `deadline` (a
    time.monotonic() value), the next picture is not decoded, nor the batch predicted: `OutOfTime`."""
    size = tuple(model.input_shape[1:3])
    inputs = []
    for index, data in enumerate(files):
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime(f"{index} of {len(files)} pictures decoded by the deadline")
        try:
            inputs.append(images.model_input(data, size, limits.max_side, limits.max_pixels, limits.min_side))
        except pictures.Unusable as err:
            raise UnusablePicture(index, err) from err
    if deadline is not None and time.monotonic() > deadline:
        raise OutOfTime(f"{len(files)} pictures decoded, none predicted, by the deadline")
    return as_class_probabilities(model.predict(np.stack(inputs), verbose=0))


def class_probabilities(model: Any, paths: list[str], image_size: tuple[int, int], batch_size: int) -> np.ndarray:
    """(N, classes) probabilities of `model` for prepared picture files, decoded as in training. Run as
    several processes, each predicts its part of the files and every process gets the whole."""
    mine = paths[backend.cluster().part(len(paths))]
    batches = [devices.predict_batch(model, batch) for batch in images.images_only(mine, image_size, batch_size)]
    outputs = np.concatenate(batches) if batches else np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return as_class_probabilities(devices.gather(outputs, len(paths)))


def evaluate(model: Any, split: images.Split, params: config.Params) -> tuple[np.ndarray, dict[str, Any]]:
    """(class probabilities, metrics) of `model` on `split`."""
    probs = class_probabilities(model, split.paths, params.data.image_size, params.evaluate.batch_size)
    return probs, compute_metrics(split.labels, probs, split.classes, params.evaluate.threshold)
