"""A stage's MLflow run (`stage_run`): opened with its lineage before the work, its params and data
inputs logged; after it, the DVC hashes of its outputs, its metrics, histories and artifacts. Live
epoch metrics (`epoch_logger`) and the logged classifier (`log_classifier`). A stage that DVC skips
logs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from classifier import config
from classifier.metrics import table
from ops.tracking import worker
from ops.tracking.lineage import (
    PROCESS,
    data_deps,
    dvc_hash,
    lineage_tags,
    locked_hashes,
    process_gone,
    stage_outputs,
    stage_params,
)
from ops.tracking.metrics import CURVE_PREFIX, history_rows, metric_key, stage_metrics
from ops.tracking.store import (
    TrackingError,
    active_run_id,
    check_server,
    enabled,
    logging_failed,
    retry_conflicts,
    store_lock,
    store_uri,
    tracking_uri,
    use_experiment,
)
from ops.tracking.version import changed_params, record_failed_attempt, runs_that_wrote, version_name
from ops.tracking.worker import in_worker, in_worker_later

log = logging.getLogger(__name__)


#: Outputs not copied into the tracking store: data and the backbone are too large (DVC keeps
#: them), and the frozen-backbone, fine-tuned and ensemble models are stored once, inside the models
#: train_top, evaluate and ensemble log and register.
NOT_ARTIFACTS = ("data/", "models/backbone.weights.h5", "models/model.keras", "models/frozen", "models/ensemble")


@contextlib.contextmanager
def stage_run(stage: str, params: config.Params) -> Iterator[str | None]:
    """The MLflow run of one stage: opened (lineage tagged) before the work, completed after it.

    When the body returns, the run gets the DVC hashes of the outputs dvc.yaml declares for the
    stage, and logs them (`log_outputs`). The stage's worker opens the run while the stage works
    (`_begin`), and its id is logged when it ends; yields the id where the run opened in this process
    (no worker: tests, notebooks), else None.
    """
    if not enabled():
        log.info("PIPELINE_TRACKING=off: %s logs nothing", stage)
        yield None
        return
    uri = tracking_uri()
    check_server(uri)
    # Sent to the worker, which opens the run once MLflow is loaded there: the stage works meanwhile.
    run_id = _begin(stage, params, lineage_tags(stage))
    try:
        yield run_id
        try:
            log_outputs(stage)
        except Exception as err:
            run_id = None
            with contextlib.suppress(Exception):
                run_id = _open_run_id()
            raise logging_failed(stage, "logging its outputs", err, run_id) from err
    except BaseException:
        with contextlib.suppress(Exception):
            _abort(stage, params)
        raise
    log.info("MLflow run %s (%s) at %s", _end_run(), stage, uri)


@in_worker_later
def _begin(stage: str, params: config.Params, tags: dict[str, str]) -> str:
    """Open the stage's run with its lineage `tags`, log its params and inputs; return its id."""
    import mlflow

    uri = tracking_uri()
    try:
        mlflow.set_tracking_uri(store_uri())
        with store_lock():
            run = _open_run(stage, tags=tags)
            mlflow.log_params(stage_params(stage, params))
            _log_inputs(stage)
        try:
            end_orphaned_runs(run.info.experiment_id)
        except Exception as orphans_err:  # noqa: BLE001  a later run tries again; this stage's run is open
            log.warning("could not end the runs left running by processes that have ended: %s", orphans_err)
    except Exception as err:
        if mlflow.active_run() is not None:
            with contextlib.suppress(Exception), store_lock():
                mlflow.end_run("FAILED")
        raise TrackingError(f"Could not open an MLflow run at {uri}: {err}") from err
    worker.run_opened(stage, functools.partial(_abort, stage, params))
    return run.info.run_id


@in_worker
def _open_run_id() -> str | None:
    """The id of the run the stage has open, if any (its worker opens it: `_begin`)."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


@in_worker
def _end_run() -> str:
    """End the stage's run as finished; return its id."""
    import mlflow

    run_id = active_run_id()
    with store_lock():
        mlflow.end_run()
    worker.run_closed()
    return run_id


@in_worker
def _abort(stage: str, params: config.Params) -> None:
    """End the stage's run as failed, with a failed row for its attempt (`record_failed_attempt`)."""
    import mlflow

    worker.run_closed()
    with store_lock():
        mlflow.end_run("FAILED")
        record_failed_attempt(stage, params)


#: Why `end_orphaned_runs` ended a run (its tag pipeline.ended).
ORPHANED = "its process ended without ending it (killed with SIGKILL, or the machine stopped): ended by a later run"


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as FAILED every run of the experiment still RUNNING whose stage process on this machine has
    ended (a process group killed with SIGKILL takes the stage's MLflow worker with it); their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    orphans = [
        run.info.run_id
        for run in client.search_runs(
            [experiment_id], f"attributes.status = 'RUNNING' AND tags.`{PROCESS}` LIKE '{host}:%'", max_results=1000
        )
        if process_gone(run.data.tags[PROCESS])
    ]
    for run_id in orphans:
        client.set_tag(run_id, "pipeline.ended", ORPHANED)
        client.set_terminated(run_id, "FAILED")
        log.info("MLflow run %s was left running by a process that has ended: ended as failed", run_id)
    return orphans


def _log_inputs(stage: str) -> None:
    """Each data input as an MLflow dataset whose digest is its DVC content hash."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    hashes = locked_hashes()
    for path in data_deps(stage):
        if path in hashes:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are local paths
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str(Path(path).resolve()))
            dataset = MetaDataset(source, name=path, digest=hashes[path])  # type: ignore[abstract]  # concrete at run time
            retry_conflicts(mlflow.log_input, dataset, context=stage)


@in_worker
def log_outputs(stage: str, replay_history: bool = False) -> None:
    """Log what dvc.yaml says `stage` produced: the DVC hash of each output (`dvc.out.<path>`),
    metrics files, artifacts, and optionally the per-epoch history files as step metrics (when
    they were not logged live)."""
    import mlflow

    metrics = stage_metrics(stage)
    written = {f"dvc.out.{path}": dvc_hash(Path(path)) for path in stage_outputs(stage) if Path(path).exists()}
    outputs = [p for p in stage_outputs(stage) if not p.startswith(NOT_ARTIFACTS)]
    with store_lock():
        mlflow.set_tags(written)
        logged = set(mlflow.get_run(active_run_id()).data.metrics)
        if replay_history:
            for path in outputs:
                if path.endswith("history.csv") and Path(path).is_file():
                    logged |= _log_history(Path(path), CURVE_PREFIX.get(stage, ""), skip=logged)
        # A final value already logged per epoch (val_accuracy...) is not logged again at step 0.
        fresh = {k: v for k, v in metrics.items() if k not in logged}
        if fresh:
            mlflow.log_metrics(fresh)
        for path in outputs:
            if Path(path).is_dir():
                mlflow.log_artifacts(path, path)
            elif Path(path).is_file():
                mlflow.log_artifact(path, str(Path(path).parent))


def _log_history(path: Path, prefix: str, skip: set[str]) -> set[str]:
    """A history.csv as step metrics named `prefix` + column, at the steps of its epochs (`history_rows`),
    except the metrics in `skip` (already logged live); returns the names it logged."""
    import mlflow

    names: set[str] = set()
    for step, row in history_rows(path):
        values = {prefix + k: v for k, v in row.items() if prefix + k not in skip}
        mlflow.log_metrics(values, step=step)
        names |= set(values)
    return names


@in_worker
def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active stage run (extra metrics a stage computes beyond its metrics files)."""
    if not enabled():
        return
    import mlflow

    with store_lock():
        mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def epoch_logger(prefix: str = "") -> Any:
    """A Keras callback logging each epoch's loss and accuracy (train and validation) live, at the
    step of the epoch's number within the stage: 1, 2, ... as history.csv and metrics.json count
    them (Keras counts from 0).

    Best effort: if the tracking store fails mid-training, training goes on (the history is
    saved with the outputs and can be logged afterwards).
    """
    import keras  # imported here: stages without a model need not load TensorFlow

    class EpochLogger(keras.callbacks.Callback):
        failed = False

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs and not self.failed:
                try:
                    log_metrics({prefix + k: v for k, v in logs.items() if k != "learning_rate"}, step=epoch + 1)
                except Exception as err:  # noqa: BLE001  training matters more than its live curve
                    self.failed = True
                    log.warning("live logging to %s failed, training goes on: %s", tracking_uri(), err)

    return EpochLogger()


@in_worker
def log_model(*args: Any, **kwargs: Any) -> str:
    """`registry.log_model`, in the worker: the stage need not import MLflow's model code."""
    from ops.serving import registry

    return registry.log_model(*args, **kwargs)


def log_classifier(
    stage: str,
    model_path: Path,
    classes: list[str],
    prepared: Path,
    params: config.Params,
    test: dict[str, Any],
) -> None:
    """Log and register a classifier that `stage` scored on the test split of `prepared` (`log_model`,
    with evaluate's threshold and registry name, `test` its headline test metrics), named as the
    models table names it (top, finetuned, ensemble) and described as the model of this pipeline
    version; a failure says how to log it afterwards (`logging_failed`). With tracking off, nothing
    (MLflow is not even imported)."""
    if not enabled():
        return
    model = next(name for name, scorer in table.STAGES.items() if scorer == stage)
    changed = changed_params(params)
    about = {
        "model": model,
        "what": table.describe(model, params),
        "version": version_name(params, changed),
        "changed": changed,
    }
    try:
        log_model(
            model_path,
            classes,
            params.evaluate.threshold,
            params.evaluate.registered_model,
            test["accuracy"],
            test_set=locked_hashes().get(prepared.as_posix()),
            max_side=params.data.max_side,
            min_side=params.data.min_side,
            max_pixels=params.data.max_pixels,
            precision=params.precision,
            metrics=test,
            about=about,
        )
    except Exception as err:
        raise logging_failed(stage, "logging the model", err) from err


@in_worker
def tag_exported(stage: str, folder: Path, registered_model: str | None) -> None:
    """Say where the exports of the model that `stage` logged are: the registry version that stage's
    run registered (the newest run that wrote the outputs dvc.lock records for it) gets the tag
    `export.run`, this run's id (the exports are its `folder` artifacts), and this run gets
    `export.model_version` ("none (...)" when the model was not registered, as the baseline is not)."""
    if not enabled():
        return
    import mlflow

    hashes = locked_hashes()
    with store_lock():
        found = runs_that_wrote({p: hashes[p] for p in stage_outputs(stage) if p in hashes}, stage, 1)
        version = found[0].data.tags.get("model.version") if found else None
        if registered_model is None or version is None:
            mlflow.set_tag("export.model_version", "none (the model is not registered)")
            return
        mlflow.MlflowClient().set_model_version_tag(registered_model, version, "export.run", active_run_id())
        mlflow.set_tags({"export.model_version": f"{registered_model} v{version}", "export.folder": folder.as_posix()})


def relog(stage: str, run_id: str | None) -> str:
    """Log the saved outputs of `stage` into the run `run_id` (or a new run); return its id."""
    import mlflow

    params = config.load()
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(store_uri())
    try:
        with store_lock():
            run = _open_run(stage, run_id)
            if not run_id:
                mlflow.log_params(stage_params(stage, params))
        log_outputs(stage, replay_history=True)
        with store_lock():
            mlflow.end_run()
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"Could not log {stage} to {uri}: {err}") from err
    return run.info.run_id


def _open_run(stage: str, run_id: str | None = None, tags: dict[str, str] | None = None):
    """Start (or, with `run_id`, resume) the stage's run in the current experiment."""
    import mlflow

    use_experiment()
    if run_id:
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(run_name=stage, tags=lineage_tags(stage) if tags is None else tags)
