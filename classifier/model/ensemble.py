"""The ensemble: a head on the members' concatenated features, and the whole ensemble as one model.

Keras is imported where an ensemble is trained, not here: switched off, the stage takes a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier import errors

if TYPE_CHECKING:
    import keras

# Keras is imported where an ensemble is trained, not here: switched off, the stage takes a second.

log = logging.getLogger(__name__)


def member_meta(folder: Path, backbones: tuple[str, ...], image_size: int) -> list[dict[str, Any]]:
    """The meta.json of each member's features in `folder`, checked: present, at `image_size`, same classes."""
    from classifier.model.bottleneck import META

    metas: list[dict[str, Any]] = []
    for name in backbones:
        path = folder / name / META
        if not path.is_file():
            raise errors.StageError(
                f"{path} not found: the features of ensemble member {name} are missing; "
                f"run `dvc repro ensemble_features@{name}`"
            )
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta["image_size"] != image_size:
            raise errors.StageError(
                f"{folder / name} holds features of {meta['image_size']}px images, not ensemble.image_size "
                f"({image_size}): run `dvc repro ensemble_features@{name}`"
            )
        if metas and meta["classes"] != metas[0]["classes"]:
            raise errors.StageError(
                f"the features of {name} and {backbones[0]} name different classes: run `dvc repro` to featurize "
                "every member from the same prepared data"
            )
        metas.append(meta)
    return metas


def concatenated(folder: Path, backbones: tuple[str, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features of every member side by side, in `backbones` order; labels) of one split."""
    from classifier.model.bottleneck import load_features

    parts = [load_features(folder / name, split) for name in backbones]
    for name, (_, labels) in zip(backbones[1:], parts[1:], strict=True):
        if not np.array_equal(labels, parts[0][1]):
            raise errors.StageError(f"the {split} features of {name} and {backbones[0]} list different images")
    return np.concatenate([features for features, _ in parts], axis=1), parts[0][1]


def assemble(folder: Path, backbones: tuple[str, ...], metas: list[dict[str, Any]], head: keras.Model) -> keras.Model:
    """The ensemble as one float32 model: raw images -> each member (its backbone with the weights its
    features came from) -> the concatenated vectors -> the trained head."""
    from classifier.model import backbones as parts
    from classifier.model.members import WEIGHTS

    members = []
    for name, meta in zip(backbones, metas, strict=True):
        base = parts.build_backbone(name, None, (meta["side"], meta["side"]))
        base.load_weights(folder / name / WEIGHTS)
        members.append(parts.member(base, name, meta["image_size"], meta["pool"]))
    return parts.build_ensemble(members, head)
