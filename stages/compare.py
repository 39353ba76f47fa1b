"""The models side by side on the same test set: the baseline from scratch, the fine-tuned model, the ensemble.

Reads the metrics files of the stages that score a model on the test split (evaluate's
`test`, baseline's `baseline.test`, ensemble's `ensemble.test`) and writes reports/models.csv: one
row per model that was trained (a stage switched off has none), with what it is and its headline
test metrics, best test accuracy first; DVC plots its accuracies as bars. The table is printed too.

The last stage of the pipeline, so it also logs the pipeline version to MLflow: one run with all
params, the key metrics of every model (`test.accuracy`, `baseline.test.accuracy`,
`ensemble.test.accuracy`, ...) and a link to every stage's run (`tracking.log_pipeline_version`).

Run: dvc repro compare   (or: python -m stages.compare reports/models.csv reports/metrics.json
       reports/baseline/metrics.json reports/ensemble/metrics.json)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

from stages import common, config, tracking

log = logging.getLogger(__name__)

#: The model whose scores are the top-level `test` object (evaluate's metrics.json).
FINETUNED = "finetuned"
#: The columns after `model` and `description`, in order, as far as some model has them.
COLUMNS = ("accuracy", "top3_accuracy", "f1", "log_loss", "roc_auc", "images")


def describe(model: str, params: config.Params) -> str:
    """What a model of the table is, in a few words."""
    if model == "baseline":
        return "small convnet trained from scratch"
    if model == FINETUNED:
        blocks = params.finetune.blocks
        return f"{params.model.backbone}, last {blocks} block{'s' if blocks > 1 else ''} fine-tuned"
    if model == "ensemble":
        return f"head on {' + '.join(params.ensemble.backbones)} features"
    return model


def scores(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{model: its `test` object} from metrics files: a top-level `test` is the fine-tuned model's,
    `<name>.test` the model `name`'s. A file without any (a stage switched off) adds none."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("test"), dict):
            found[FINETUNED] = data["test"]
        for name, value in data.items():
            if isinstance(value, dict) and isinstance(value.get("test"), dict):
                found[name] = value["test"]
    return found


def table(found: dict[str, dict[str, Any]], params: config.Params) -> list[dict[str, Any]]:
    """One row per model, best test accuracy first (ties: in the order of the metrics files given)."""
    columns = [c for c in COLUMNS if any(c in test for test in found.values())]
    rows = [
        {"model": model, "description": describe(model, params)} | {c: test.get(c) for c in columns}
        for model, test in found.items()
    ]
    return sorted(rows, key=lambda row: -(row.get("accuracy") or 0.0))


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """models.csv; numbers with 6 decimals, an undefined value (None) left empty."""
    with common.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]) if rows else ["model", "description"])
        for row in rows:
            writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else v for v in row.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="where to write models.csv")
    parser.add_argument("metrics", type=Path, nargs="+", help="the metrics files of the stages that score a model")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("compare")  # its arguments and params are good: the run will open
    if tracking.enabled():
        tracking.check_server()  # a refused login fails here, not after the table is written
    rows = table(scores(args.metrics), params)
    write_table(rows, args.output)
    for row in rows:
        log.info("%-10s test accuracy %.4f  (%s)", row["model"], row["accuracy"], row["description"])
    tracking.log_pipeline_version(params)


if __name__ == "__main__":
    common.run(main)
