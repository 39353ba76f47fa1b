"""The recipe's baseline: a small convnet trained from scratch on the same split, scored on the same test set.

Three convolution blocks (3x3 convolutions of 32, 32 and 64 filters, ReLU, 2x2 max pooling), then
Flatten, Dense(`baseline.units`, relu), Dropout and a sigmoid (two classes) or softmax, trained with
RMSprop on the pixels scaled to 0..1 and the same augmentation as fine-tuning (`finetune.augment`).
Its test metrics sit beside the fine-tuned model's (`baseline.test.accuracy` next to `test.accuracy`):
what transfer learning gains is their difference. `baseline.enabled: false` skips the training: the
stage then writes empty outputs (no model, a history without epochs, `{}` as metrics) and logs nothing.

Run: dvc repro baseline
  (or: python -m stages.baseline data/prepared models/baseline reports/baseline)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier import config, saving
from classifier.metrics.figures import RELIABILITY, write_reliability
from classifier.model import backend
from classifier.model.history import write_reports, write_switched_off
from classifier.saving import MODEL
from ops import launch, runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("models", type=Path, help=f"folder for the trained model ({MODEL})")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    if not params.baseline.enabled:
        write_switched_off(args.models, args.reports)
        write_reliability(args.reports / RELIABILITY, None, None, params.evaluate.threshold, "baseline (switched off)")
        log.info("baseline.enabled is false in params.yaml: no baseline trained")
        return
    launch.relaunch("baseline")  # as several processes, where PIPELINE_LAUNCH says so
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("baseline")  # its arguments and params are good: the run will open
    # Keras is imported once there is a model to train: switched off, the stage takes a second.
    from classifier import inference
    from classifier.model import devices, images
    from classifier.model.baseline import train_baseline

    devices.start(params.deterministic)
    name = "baseline"  # the metrics' prefix, live in MLflow and in metrics.json: baseline.val_accuracy
    policy = devices.precision_policy(params.precision)
    with tracking.stage_run("baseline", params):
        model, history = train_baseline(
            args.prepared, params, devices.strategy(), policy, callbacks=[tracking.epoch_logger(f"{name}.")]
        )
        split = images.load_split(args.prepared, "test")
        probs, scores = inference.evaluate(devices.computing_in(model, policy), split, params)
        with saving.atomic_dir(args.models) as tmp:
            saving.save_model(model, tmp / MODEL)
        kept = write_reports(args.reports, history, name, params.baseline.patience, scores["test"])
        write_reliability(args.reports / RELIABILITY, split.labels, probs, params.evaluate.threshold, "baseline")
    log.info("test accuracy %.4f on %d images (kept epoch %d)", scores["test"]["accuracy"], len(split), kept + 1)


if __name__ == "__main__":
    runner.run(main)
