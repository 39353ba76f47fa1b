"""Train the dense classifier on cached bottleneck features (seconds, not hours), and score it.

The head is `heads.build_head` (the same one `finetune` continues to train): Flatten or global
average pooling (`top.pool`, see `heads.head_pool`), Dense(units, relu), Dropout, then a
sigmoid for two classes or a softmax for more. Each epoch's
loss and accuracy, train and validation, go to reports/train_top/history.csv (a DVC plot) and MLflow.

The head on the frozen backbone is the recipe's second model, so it is scored on the test split
too, from the cached test features (`top.test.accuracy`, `top.test.log_loss`... in metrics.json,
and a row of reports/models.csv), with its reliability diagram. The stage saves it as one model of
raw pictures, the backbone with the weights its features came from and then the head
(models/frozen/model.keras, float32), and registers it as evaluate registers the fine-tuned model,
so `champion` goes to it when fine-tuning made things worse.

Run: dvc repro train_top
  (or: python -m stages.train_top data/features models/backbone.weights.h5 data/prepared models/top.keras
       models/frozen reports/train_top)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from classifier import config, saving
from classifier.metrics.figures import RELIABILITY, write_reliability
from classifier.model import backend
from classifier.saving import MODEL
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the featurize stage's output")
    parser.add_argument("backbone_weights", type=Path, help="the featurize stage's backbone weights")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output (the test set the model was scored on)")
    parser.add_argument("output", type=Path, help="where to save the trained head (.keras)")
    parser.add_argument("models", type=Path, help=f"folder for the frozen backbone and head as one model ({MODEL})")
    parser.add_argument("reports", type=Path, help="folder for history.csv, metrics.json and reliability.png")
    args = parser.parse_args()
    params = config.load()
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("train_top")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.model import devices, heads
    from classifier.model.bottleneck import META, load_features
    from classifier.model.history import write_reports
    from classifier.model.training import score_head, train_top

    devices.start(params.deterministic)
    classes = json.loads((args.features / META).read_text())["classes"]
    name = "top"  # the metrics' prefix, live in MLflow and in metrics.json: top.val_accuracy
    with tracking.stage_run("train_top", params):
        head, history = train_top(
            load_features(args.features, "train"),
            load_features(args.features, "validation"),
            len(classes),
            params.top,
            params.seed,
            heads.head_pool(params.top, params.model.backbone),
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        test = load_features(args.features, "test")
        probs, metrics = score_head(head, test, classes, params.evaluate.threshold)
        saving.save_model(head, args.output)
        with saving.atomic_dir(args.models) as tmp:
            saving.save_model(heads.frozen_classifier(params, args.backbone_weights, head, len(classes)), tmp / MODEL)
        kept = write_reports(args.reports, history, name, params.top.patience, metrics["test"])
        write_reliability(
            args.reports / RELIABILITY, test[1], probs, params.evaluate.threshold, "frozen backbone + head"
        )
        tracking.log_classifier("train_top", args.models / MODEL, classes, args.prepared, params, metrics["test"])
    log.info(
        "kept epoch %d of %d: validation accuracy %.4f, test accuracy %.4f; wrote %s and %s",
        kept + 1,
        len(history["val_loss"]),
        history["val_accuracy"][kept],
        metrics["test"]["accuracy"],
        args.output,
        args.models / MODEL,
    )


if __name__ == "__main__":
    runner.run(main)
