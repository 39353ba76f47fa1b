"""Evaluate the fine-tuned model on the held-out test split, and only there.

reports/metrics.json (a DVC metric, logged to MLflow under the same names) holds the headline
numbers only, nested so that DVC's flattened names are the MLflow names: `test.accuracy`,
`test.top3_accuracy` (more than 3 classes only: the fraction of test images whose true class is
among the model's 3 most probable), `test.precision`, `test.recall`, `test.f1` (of the second
class for two classes, macro-averaged for more), `test.log_loss`, `test.roc_auc` (two classes: of
the second class; more: the mean of the one-vs-rest AUCs of the classes the test split has; null
when undefined) and `test.images`, all computed by scikit-learn (`sklearn.metrics`).
reports/evaluate/ (a cached output) holds the rest: per_class.csv, confusion.json (rows actual,
columns predicted), the plots' data (predictions.csv for DVC's confusion matrix, roc.csv) and PNG
figures of the confusion matrix, the ROC curve and the training curves of both training stages.

Class indices are the model's (sorted label names, `images.load_split`); tables and figures show
the classes in natural order (`scores.natural_key`: "two" before "ten", "class2" before "class10").

Run: dvc repro evaluate   (or: python -m stages.evaluate data/prepared models/model.keras
       reports/metrics.json reports/evaluate --history reports/train_top/history.csv ...)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier import config, saving
from classifier.model import backend
from ops import launch, runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prepared", type=Path, help="the prepare stage's output")
    parser.add_argument("model", type=Path, help="the fine-tuned model (.keras)")
    parser.add_argument("metrics", type=Path, help="where to write metrics.json")
    parser.add_argument("reports", type=Path, help="folder for plot data and figures")
    parser.add_argument("--history", type=Path, action="append", default=[], help="a history.csv to plot")
    args = parser.parse_args()
    params = config.load()
    launch.relaunch("evaluate")  # as several processes, where PIPELINE_LAUNCH says so
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("evaluate")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier import inference
    from classifier.metrics.reports import write_reports
    from classifier.model import devices, images

    devices.start(params.deterministic)
    with tracking.stage_run("evaluate", params):
        split = images.load_split(args.prepared, "test")
        with devices.predicting():  # over every device of this process
            model = inference.load_model(args.model, params.precision)
            log.info("predicting in %s on %s", devices.precision_policy(params.precision), devices.device_name())
            probs, metrics = inference.evaluate(model, split, params)
        with saving.atomic_dir(args.reports) as tmp:
            write_reports(tmp, split, probs, metrics, params.evaluate.threshold, args.history)
        saving.write_json(args.metrics, {"test": metrics["test"]})  # headline numbers only: DVC's columns
        tracking.log_classifier("evaluate", args.model, split.classes, args.prepared, params, metrics["test"])
    log.info("test accuracy %.4f on %d images; wrote %s", metrics["test"]["accuracy"], len(split), args.metrics)


if __name__ == "__main__":
    runner.run(main)
