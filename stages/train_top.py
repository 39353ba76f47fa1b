"""Train the dense classifier on cached bottleneck features (seconds, not hours).

The head is `heads.build_head` (the same one `finetune` continues to train): Flatten or global
average pooling (`top.pool`, see `heads.head_pool`), Dense(units, relu), Dropout, then a
sigmoid for two classes or a softmax for more. Each epoch's
loss and accuracy, train and validation, go to reports/train_top/history.csv (a DVC plot) and MLflow.

Run: dvc repro train_top
  (or: python -m stages.train_top data/features models/top.keras reports/train_top)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from classifier import config, saving
from classifier.model import backend
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the featurize stage's output")
    parser.add_argument("output", type=Path, help="where to save the trained head (.keras)")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("train_top")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.model import devices, heads
    from classifier.model.bottleneck import META, load_features
    from classifier.model.history import write_reports
    from classifier.model.training import train_top

    devices.start(params.deterministic)
    meta = json.loads((args.features / META).read_text())
    name = "top"  # the metrics' prefix, live in MLflow and in metrics.json: top.val_accuracy
    with tracking.stage_run("train_top", params):
        head, history = train_top(
            load_features(args.features, "train"),
            load_features(args.features, "validation"),
            len(meta["classes"]),
            params.top,
            params.seed,
            heads.head_pool(params.top, params.model.backbone),
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        saving.save_model(head, args.output)
        kept = write_reports(args.reports, history, name, params.top.patience)
    log.info(
        "kept epoch %d of %d: validation accuracy %.4f; wrote %s",
        kept + 1,
        len(history["val_loss"]),
        history["val_accuracy"][kept],
        args.output,
    )


if __name__ == "__main__":
    runner.run(main)
