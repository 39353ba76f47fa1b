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

from classifier import config, saving
from classifier.model import backend
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", choices=config.BACKBONES, help="the member's backbone")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("output", type=Path, help="folder for <split>.npz, meta.json and the backbone's weights")
    args = parser.parse_args()
    params = config.load()
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("ensemble_features")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.model import backbones, devices
    from classifier.model.members import featurize_member, stage_name

    devices.start(params.deterministic)
    backbones.member_size(args.backbone, params.ensemble.image_size)  # too small fails now, not after loading
    with tracking.stage_run(stage_name(args.backbone), params), saving.atomic_dir(args.output) as tmp:
        meta = featurize_member(args.backbone, args.prepared, tmp, params)
    log.info("wrote %s: %s features of %d images", args.output, meta["feature_shape"], sum(meta["images"].values()))


if __name__ == "__main__":
    runner.run(main)
