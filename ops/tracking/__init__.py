"""MLflow tracking, one module per concern; a stage reads it as `from ops import tracking`.

- store: where runs go (the tracking URI, an embedded sqlite store made whole or not at all, its
  file lock, a server's login check, the retry of concurrent inserts) and the errors of logging.
- locations: an sqlite store's artifacts in its own mlartifacts/ (a copied or moved store pointed
  there, a store with artifacts elsewhere refused).
- lineage: what a run is traced to (dvc.yaml's deps, outs and params of a stage, dvc.lock's
  hashes, DVC's hash of an output, the git commit, the attempt).
- metrics: a stage's metrics and history files as MLflow metrics.
- worker: the stage's logging process (MLflow is imported there, while the stage works).
- runs: a stage's run (`stage_run`), live epoch metrics, the logged model.
- version: the pipeline version's run (`log_pipeline_version`): its rank, figures and the links it
  prints; failed attempts, `find`.
- views: the comparisons of versions that the MLflow UI opens from a link (saved views).
- cli: `python -m ops.tracking log|find`.

Lineage points from MLflow to DVC, never back: nothing here writes a DVC output, and no stage
depends on it, so DVC never re-runs a stage for tracking's sake.
"""

from ops.tracking import locations
from ops.tracking.lineage import (
    CODE,
    LOCK_FILE,
    PIPELINE_FILE,
    STAGE_PID,
    attempt,
    data_deps,
    dvc_hash,
    git_commit,
    lineage_tags,
    locked_hashes,
    loggable_params,
    stage_outputs,
    stage_param_keys,
    stage_params,
)
from ops.tracking.metrics import CURVE_PREFIX, metric_key
from ops.tracking.runs import (
    NOT_ARTIFACTS,
    epoch_logger,
    log_classifier,
    log_metrics,
    log_model,
    log_outputs,
    relog,
    stage_run,
    tag_exported,
)
from ops.tracking.store import (
    CONFLICT_ATTEMPTS,
    CONFLICTS,
    DEFAULT_EXPERIMENT,
    EXPERIMENT_KIND,
    REACHABLE_TIMEOUT,
    RERUN_TO_LOG,
    TrackingError,
    active_run_id,
    check_server,
    create_store,
    enabled,
    experiment_name,
    logging_failed,
    retry_conflicts,
    store_lock,
    store_uri,
    tracking_uri,
)
from ops.tracking.version import (
    KEY_METRICS,
    PIPELINE_RUN,
    changed_params,
    find,
    log_pipeline_version,
    runs_that_wrote,
    switched_off,
    version_name,
    versions_url,
)
from ops.tracking.worker import STAGE_MODULES, in_worker, run_closed, run_opened, serve, start_worker

__all__ = [
    "CODE",
    "CONFLICTS",
    "CONFLICT_ATTEMPTS",
    "CURVE_PREFIX",
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_KIND",
    "KEY_METRICS",
    "LOCK_FILE",
    "NOT_ARTIFACTS",
    "PIPELINE_FILE",
    "PIPELINE_RUN",
    "REACHABLE_TIMEOUT",
    "RERUN_TO_LOG",
    "STAGE_MODULES",
    "STAGE_PID",
    "TrackingError",
    "active_run_id",
    "attempt",
    "changed_params",
    "check_server",
    "create_store",
    "data_deps",
    "dvc_hash",
    "enabled",
    "epoch_logger",
    "experiment_name",
    "find",
    "git_commit",
    "in_worker",
    "lineage_tags",
    "locations",
    "locked_hashes",
    "log_classifier",
    "log_metrics",
    "log_model",
    "log_outputs",
    "log_pipeline_version",
    "loggable_params",
    "logging_failed",
    "metric_key",
    "relog",
    "retry_conflicts",
    "run_closed",
    "run_opened",
    "runs_that_wrote",
    "serve",
    "stage_outputs",
    "stage_param_keys",
    "stage_params",
    "stage_run",
    "start_worker",
    "store_lock",
    "store_uri",
    "switched_off",
    "tag_exported",
    "tracking_uri",
    "version_name",
    "versions_url",
]
