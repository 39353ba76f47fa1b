"""Features of one ensemble member: a backbone of `ensemble.backbones`, run once over every split.

Each member sees the same images, loaded at `ensemble.image_size`, resized to its own input size
(`backbones.member_size`) and preprocessed its own way, and its feature map becomes one vector per
image as `top.pool` says (`auto`: flattened for VGG16, averaged for the deeper maps of the others;
`backbones.member`): exactly what the ensemble model computes when it serves. One
DVC stage per member (`ensemble_features@resnet50`, ...), each with its own output folder, so adding
a backbone to the list featurizes that one only. The folder holds <split>.npz and meta.json, as
`featurize` writes them, and the member's backbone weights, which the ensemble model is built from.

Run: dvc repro ensemble_features@resnet50
  (or: python -m stages.ensemble_features resnet50 data/prepared data/ensemble/resnet50)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import keras

from stages import backbones, common, config, devices, tracking
from stages.featurize import META, write_splits

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
    pool = backbones.head_pool(params.top, backbone)
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
    common.write_json(out / META, meta)
    base.save_weights(out / WEIGHTS)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", choices=config.BACKBONES, help="the member's backbone")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("output", type=Path, help="folder for <split>.npz, meta.json and the backbone's weights")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("ensemble_features")  # its arguments and params are good: the run will open
    devices.set_determinism(params.deterministic)
    backbones.member_size(args.backbone, params.ensemble.image_size)  # too small fails now, not after loading
    with tracking.stage_run(stage_name(args.backbone), params), common.atomic_dir(args.output) as tmp:
        meta = featurize_member(args.backbone, args.prepared, tmp, params)
    log.info("wrote %s: %s features of %d images", args.output, meta["feature_shape"], sum(meta["images"].values()))


if __name__ == "__main__":
    common.run(main)
