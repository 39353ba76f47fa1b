"""An ensemble member: one backbone of `ensemble.backbones` run over every split (`featurize_member`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras

from classifier import config, saving
from classifier.model import backbones, devices, heads
from classifier.model.bottleneck import META, write_splits

log = logging.getLogger(__name__)


#: The member's backbone weights, in its features folder.
WEIGHTS = "backbone.weights.h5"


def stage_name(backbone: str) -> str:
    """The DVC stage (and MLflow run) of one member."""
    return f"ensemble_features@{backbone}"


def featurize_member(backbone: str, prepared: Path, out: Path, params: config.Params) -> dict[str, Any]:
    """Write the member's features of every split, its meta.json and its backbone's weights into `out`;
    return the metadata."""
    keras.utils.set_random_seed(params.seed)  # reproducible random init with `ensemble.weights: null`
    size = params.ensemble.image_size
    side = backbones.member_size(backbone, size)
    base = backbones.build_backbone(backbone, params.ensemble.weights, (side, side))
    policy = devices.precision_policy(params.precision)
    pool = heads.head_pool(params.top, backbone)
    extractor = devices.computing_in(backbones.member(base, backbone, size, pool), policy)
    written = write_splits(
        prepared, out, extractor, (size, size), params.featurize.batch_size, policy, stage_name(backbone)
    )
    meta = {
        "backbone": backbone,
        "weights": params.ensemble.weights,
        "image_size": size,
        "side": side,
        "pool": pool,
        **written,
    }
    saving.write_json(out / META, meta)
    base.save_weights(out / WEIGHTS)
    return meta
