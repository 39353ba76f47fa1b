"""Fine-tune the last backbone block(s) together with the trained head, on augmented images.

The classifier is rebuilt from exactly the parts the earlier stages produced: the backbone with
the weights its features came from (models/backbone.weights.h5) and the head trained on those
features (models/top.keras; never a fresh random head, whose large gradients would wreck the
pretrained block). Everything is frozen except the last `finetune.blocks` block(s) and the head;
BatchNorm stays in inference mode; the model is recompiled with SGD at a low learning rate. The
saved model takes raw RGB images (0..255) and is always float32, whatever precision trained it.

Run: dvc repro finetune   (or: python -m stages.finetune data/prepared models/backbone.weights.h5
       models/top.keras models/model.keras models/classes.json reports/finetune)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from classifier import config, saving
from classifier.model import backend
from ops import launch, runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("backbone_weights", type=Path, help="the featurize stage's backbone weights")
    parser.add_argument("top", type=Path, help="the train_top stage's head (.keras)")
    parser.add_argument("output", type=Path, help="where to save the fine-tuned model (.keras)")
    parser.add_argument("classes", type=Path, help="where to save the class names (JSON list)")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    parser.add_argument(
        "--head-metrics", type=Path, help="train_top's metrics.json: a warning when fine-tuning ends below the head"
    )
    args = parser.parse_args()
    params = config.load()
    launch.relaunch("finetune")  # as several processes, where PIPELINE_LAUNCH says so
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("finetune")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    import keras

    from classifier.model import devices
    from classifier.model.finetuning import finetune
    from classifier.model.history import finetune_note, write_reports

    devices.start(params.deterministic)
    name = "finetune"  # the metrics' prefix, live in MLflow and in metrics.json: finetune.val_accuracy
    with tracking.stage_run("finetune", params):
        top = keras.models.load_model(args.top, safe_mode=True)
        result = finetune(
            args.prepared,
            args.backbone_weights,
            top,
            params,
            devices.strategy(),
            devices.precision_policy(params.precision),
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        saving.save_model(result.model, args.output)
        saving.write_json(args.classes, result.classes)
        kept = write_reports(args.reports, result.history, name, params.finetune.patience)
    accuracy = result.history["val_accuracy"][kept]
    log.info("kept epoch %d: validation accuracy %.4f; wrote %s", kept + 1, accuracy, args.output)
    if args.head_metrics and args.head_metrics.is_file():
        head = json.loads(args.head_metrics.read_text(encoding="utf-8")).get("top", {}).get("val_accuracy")
        if note := finetune_note(head, accuracy):
            log.warning("%s", note)


if __name__ == "__main__":
    runner.run(main)
