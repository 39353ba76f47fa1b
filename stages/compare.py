"""The models side by side on the same test set: the recipe's three (the baseline from scratch, the
frozen backbone with its head, the fine-tuned model) and the ensemble.

Reads the metrics files of the stages that score a model on the test split (evaluate's `test`,
train_top's `top.test`, baseline's `baseline.test`, ensemble's `ensemble.test`) and writes
reports/models.csv: one row per model that was trained (a stage switched off has none), with what
it is and its headline test metrics, best first (classifier.metrics.ranking: test accuracy, then
log loss); DVC plots its accuracies as bars. When fine-tuning ended with a lower validation
accuracy than the head it started from (finetune.val_accuracy below top.val_accuracy), the
fine-tuned row's note says so. The table is printed too.

The last stage of the pipeline, so it also logs the pipeline version to MLflow: one run with all
params, the key metrics of every model (`test.accuracy`, `baseline.test.accuracy`,
`ensemble.test.accuracy`, ...), its rank among the versions, the figures and the table, and a link
to every stage's run; it prints the links of the MLflow views that compare it with the version it
came from and with every version (`tracking.log_pipeline_version`).

Run: dvc repro compare   (or: python -m stages.compare reports/models.csv reports/metrics.json
       reports/train_top/metrics.json reports/finetune/metrics.json reports/baseline/metrics.json ...)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier import config
from classifier.metrics.table import FINETUNED, finetune_note, scores, table, validation_accuracies, write_table
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="where to write models.csv")
    parser.add_argument("metrics", type=Path, nargs="+", help="the metrics files of the stages that score a model")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("compare")  # its arguments and params are good: the run will open
    if tracking.enabled():
        tracking.check_server()  # a refused login fails here, not after the table is written
    note = finetune_note(validation_accuracies(args.metrics))
    rows = table(scores(args.metrics), params, {FINETUNED: note} if note else None)
    write_table(rows, args.output)
    for row in rows:
        log.info("%-10s test accuracy %.4f  (%s)", row["model"], row["accuracy"], row["description"])
    if note:
        log.warning("%s", note)
    tracking.log_pipeline_version(params)


if __name__ == "__main__":
    runner.run(main)
