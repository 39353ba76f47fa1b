"""A stage's metrics files and history.csv files as MLflow metrics (names as DVC shows them)."""

from __future__ import annotations

import contextlib
import csv
import json
import re
from pathlib import Path
from typing import Any

from ops.tracking.lineage import dep_paths, dvc_stages

#: The prefix of each training stage's per-epoch metrics, so the curves of the stages can't be confused.
CURVE_PREFIX = {"train_top": "top.", "finetune": "finetune.", "baseline": "baseline.", "ensemble": "ensemble."}


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON document, keys joined with dots."""
    if isinstance(data, dict):
        out: dict[str, float] = {}
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {metric_key(prefix): float(data)}
    return {}


def metric_key(name: str) -> str:
    """`name` with the characters MLflow refuses in metric names (class names may hold any) as _."""
    return re.sub(r"[^\w\-. /]", "_", name)


def history_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    """The rows of a history.csv as (step, {metric: value}): the step is the row's epoch within its
    stage, 1, 2, ... (its `epoch` column; the row's number counted from 1 where there is none), as
    the live curves (`epoch_logger`) and the metrics files count them. Columns that are not numbers
    (a stage name) are left out."""
    rows = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=1):
            values = {}
            for key, value in row.items():
                with contextlib.suppress(TypeError, ValueError):
                    values[key] = float(value)
            epoch = values.pop("epoch", None)
            rows.append((number if epoch is None else int(epoch), values))
    return rows


def stage_metrics(stage: str) -> dict[str, float]:
    """Every number in the metrics files of `stage`, by its flattened name (as DVC shows it)."""
    metrics: dict[str, float] = {}
    for path in dep_paths(dvc_stages().get(stage, {}).get("metrics")):
        if Path(path).is_file():
            metrics.update(_numbers(json.loads(Path(path).read_text(encoding="utf-8"))))
    return metrics


def all_metrics() -> dict[str, float]:
    """Every number in the pipeline's metrics files, by its flattened name."""
    return {key: value for stage in dvc_stages() for key, value in stage_metrics(stage).items()}
