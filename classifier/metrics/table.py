"""reports/models.csv: the models side by side on the same test set, best first (`ranking`: highest
test accuracy, then lowest log loss), with a note where fine-tuning made the model worse than the
head it started from."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from classifier import config, saving
from classifier.metrics import ranking
from classifier.model import history

log = logging.getLogger(__name__)


#: The model whose scores are the top-level `test` object (evaluate's metrics.json).
FINETUNED = "finetuned"


#: The stage that scores (and, but for the baseline, registers) each model of the table.
STAGES = {FINETUNED: "evaluate", "top": "train_top", "baseline": "baseline", "ensemble": "ensemble"}


#: The columns after `model` and `description`, in order, as far as some model has them.
COLUMNS = ("accuracy", "top3_accuracy", "f1", "log_loss", "ece", "roc_auc", "images")


def describe(model: str, params: config.Params) -> str:
    """What a model of the table is, in a few words."""
    if model == "baseline":
        return "small convnet trained from scratch"
    if model == FINETUNED:
        blocks = params.finetune.blocks
        return f"{params.model.backbone}, last {blocks} block{'s' if blocks > 1 else ''} fine-tuned"
    if model == "ensemble":
        return f"head on {' + '.join(params.ensemble.backbones)} features"
    if model == "top":
        return f"{params.model.backbone} frozen, dense head on its cached features"
    return model


def validation_accuracies(paths: list[Path]) -> dict[str, float]:
    """{stage prefix: its kept epoch's validation accuracy} from metrics files (`top.val_accuracy`,
    `finetune.val_accuracy`...)."""
    found = {}
    for path in paths:
        for name, value in json.loads(path.read_text(encoding="utf-8")).items():
            if isinstance(value, dict) and isinstance(value.get("val_accuracy"), int | float):
                found[name] = float(value["val_accuracy"])
    return found


def finetune_note(accuracies: dict[str, float]) -> str | None:
    """The fine-tuned row's note (`history.finetune_note`), from the stages' validation accuracies."""
    return history.finetune_note(accuracies.get("top"), accuracies.get("finetune"))


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


def table(
    found: dict[str, dict[str, Any]], params: config.Params, notes: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per model, best first (`ranking.sort_key`: test accuracy, then log loss; models equal
    in both stay in the order of the metrics files given), with a `note` column when `notes`
    ({model: text}) has one."""
    columns = [c for c in COLUMNS if any(c in test for test in found.values())]
    rows = [
        {"model": model, "description": describe(model, params)} | {c: test.get(c) for c in columns}
        for model, test in found.items()
    ]
    if notes:
        rows = [row | {"note": notes.get(str(row["model"]), "")} for row in rows]
    return sorted(rows, key=lambda row: ranking.sort_key(row.get("accuracy"), row.get("log_loss")))


#: The decimals of the scores the table shows (and the pipeline version's row in MLflow).
DECIMALS = 6


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """models.csv; numbers with DECIMALS decimals, an undefined value (None) left empty."""
    with saving.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]) if rows else ["model", "description"])
        for row in rows:
            writer.writerow(
                ["" if v is None else f"{v:.{DECIMALS}f}" if isinstance(v, float) else v for v in row.values()]
            )
