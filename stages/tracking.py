"""MLflow: the one place that opens runs, tags them, and logs params, metrics and artifacts.

Tracking is embedded by default (`sqlite:///mlflow.db` in the directory the stage runs in, the
repository root under `dvc repro`); `MLFLOW_TRACKING_URI` points it elsewhere, e.g. a team server,
and `MLFLOW_EXPERIMENT_NAME` picks the experiment. Each stage that runs opens one run named after
itself and logs the params it depends on, as declared in dvc.yaml, so the MLflow view and DVC's
agree on what a stage's inputs are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from stages import config

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "image-classifier"
PIPELINE_FILE = "dvc.yaml"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def stage_param_keys(stage: str, pipeline: Path = Path(PIPELINE_FILE)) -> list[str]:
    """The params a stage depends on, as dvc.yaml declares them (e.g. ['seed', 'top'])."""
    if not pipeline.is_file():
        return []
    stages = yaml.safe_load(pipeline.read_text(encoding="utf-8")).get("stages", {})
    keys: list[str] = []
    for entry in stages.get(stage, {}).get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {params-file: [keys]}
            for names in entry.values():
                keys.extend(names)
    return keys


def stage_params(stage: str, params: config.Params) -> dict[str, Any]:
    """Flattened values of the params `stage` depends on (all params if dvc.yaml is not here)."""
    flat = config.flatten(params)
    keys = stage_param_keys(stage)
    if not keys:
        return flat
    return {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}


def git_commit() -> tuple[str, bool]:
    """(HEAD's commit, whether the work tree has uncommitted changes); ('unknown', False) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return head, bool(dirty)


@contextlib.contextmanager
def stage_run(stage: str, params: config.Params) -> Iterator[Any]:
    """Open the MLflow run of one stage, with its params and lineage tags logged."""
    import mlflow  # imported here: it takes seconds, and only stages that run need it

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    commit, dirty = git_commit()
    tags = {"pipeline.stage": stage, "git.commit": commit, "git.dirty": str(dirty).lower()}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(stage_params(stage, params))
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, tracking_uri())
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def epoch_logger(prefix: str = "") -> Any:
    """A Keras callback logging each epoch's loss and accuracy (train and validation) to MLflow."""
    import keras  # imported here: stages without a model need not load TensorFlow

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs:
                log_metrics({prefix + k: v for k, v in logs.items() if k != "learning_rate"}, step=epoch)

    return EpochLogger()
