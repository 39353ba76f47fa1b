"""Run the pretrained backbone once over every split and keep its bottleneck features.

No augmentation, BatchNorm in inference mode, the backbone's own preprocessing. Features are
streamed to disk batch by batch (memory does not grow with the number of images) and saved with
their labels, in manifest order, as data/features/<split>.npz; data/features/meta.json names the
classes and the backbone. The backbone's weights are saved too (models/backbone.weights.h5), so
fine-tuning starts from exactly the weights the features came from, even when they are random.

Run: dvc repro featurize
  (or: python -m stages.featurize data/prepared data/features models/backbone.weights.h5)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from classifier import config, saving
from classifier.model import backend
from ops import launch, runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("output", type=Path, help="folder for <split>.npz and meta.json")
    parser.add_argument("backbone_weights", type=Path, help="where to save the backbone's weights (.weights.h5)")
    args = parser.parse_args()
    params = config.load()
    launch.relaunch("featurize")  # as several processes, where PIPELINE_LAUNCH says so
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("featurize")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.model import backbones, devices
    from classifier.model.bottleneck import featurize

    devices.start(params.deterministic)
    backbones.check(params)  # finetune's block count too: fail now, not after training the head
    with tracking.stage_run("featurize", params):
        started = time.perf_counter()
        with saving.atomic_dir(args.output) as tmp:
            base, meta = featurize(args.prepared, tmp, params)
        with saving.atomic_path(args.backbone_weights) as tmp_weights:
            base.save_weights(tmp_weights)
        seconds = time.perf_counter() - started
        tracking.log_metrics({"images_per_second": sum(meta["images"].values()) / seconds})
    log.info("wrote %s and %s", args.output, args.backbone_weights)


if __name__ == "__main__":
    runner.run(main)
