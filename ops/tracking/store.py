"""Where runs go: the tracking URI (an embedded sqlite store at the project by default, or
MLFLOW_TRACKING_URI), the store made whole or not at all, its file lock, a server's login checked
before any work, concurrent inserts sent again, and what to do when logging fails.

An sqlite store's artifacts live in mlartifacts/ beside its database file; `store_uri`, the way
every stage and tool opens the store, makes it hold to that once per process (ops.tracking.locations:
a copied or moved store is pointed at its own folder, a store with locations elsewhere refused).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classifier import saving
from classifier.data import fetch
from classifier.errors import StageError
from ops.tracking import locations, lock

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "image-classifier"


#: Tells the MLflow UI this experiment trains models (its runs table), not a GenAI app (traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


REACHABLE_TIMEOUT = 5.0


class TrackingError(StageError):
    """The tracking server cannot be reached, or logging failed."""


def enabled() -> bool:
    """False when PIPELINE_TRACKING=off: the stages run and log nothing (to measure, or to try
    something without leaving a run behind)."""
    return os.environ.get("PIPELINE_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the project's sqlite store; a relative sqlite path is taken from the
    project folder (not from the temporary copy a queued experiment runs in)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{saving.project_root() / uri[len('sqlite:///') :]}"
    return uri


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def ensure_experiment(client: Any) -> Any:
    """The experiment, created if there is none yet (a team server on which every stage so far was
    restored from DVC rather than run, say). With the embedded sqlite store its artifacts go to
    mlartifacts/ beside the database, wherever the stage runs; a server decides for itself
    (--serve-artifacts)."""
    import mlflow

    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        store = sqlite_path(tracking_uri())
        location = (store.parent / "mlartifacts").as_uri() if store is not None else None
        try:
            client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # else another stage (a teammate's, say) created it meanwhile
        experiment = client.get_experiment_by_name(name)
    return experiment


def use_experiment() -> None:
    """Make the experiment current, creating it if needed (`ensure_experiment`)."""
    import mlflow

    mlflow.set_experiment(experiment_id=ensure_experiment(tracking_client()).experiment_id)


def check_server(uri: str | None = None) -> None:
    """Fail within seconds, before any work, when a tracking server does not answer or refuses the
    login (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN): one
    request, as the stage's runs will make them (MLflow is imported only to read ~/.mlflow/credentials,
    when the environment has no login and the file is there). `uri`: tracking_uri()."""
    uri = uri or tracking_uri()
    if not fetch.is_url(uri):
        return
    if urllib.parse.urlsplit(uri).password is not None:
        raise TrackingError(
            "MLFLOW_TRACKING_URI holds a password: it would be shown in logs and run links. Put the user name "
            "and password in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead. Nothing was run."
        )
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password) and Path("~/.mlflow/credentials").expanduser().is_file():
        from mlflow.utils.credentials import read_mlflow_creds  # MLflow's own reading of that file

        user, password = read_mlflow_creds()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    login = (
        fetch.basic_auth(user, password) if user and password else {"Authorization": f"Bearer {token}"} if token else {}
    )
    query = urllib.parse.urlencode({"experiment_name": experiment_name()})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}", headers=login)
    try:
        with urllib.request.urlopen(request, timeout=REACHABLE_TIMEOUT):
            pass
    except urllib.error.HTTPError as err:
        if err.code == 401:
            who = f"user {user!r} with the password given" if user and password else "no user name and password"
            raise TrackingError(
                f"The MLflow tracking server {uri} refused the login ({who}). Set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to your login on it (a team member's file from `python -m ops.team "
                "add-user` exports both), or unset MLFLOW_TRACKING_URI to log to mlflow.db. Nothing was run."
            ) from err
        if err.code == 403:
            raise TrackingError(
                f"The MLflow tracking server {uri} does not let {user!r} read experiment {experiment_name()!r}: "
                "ask its admin for EDIT permission on it. Nothing was run."
            ) from err
        return  # it answered (404: no such experiment yet; a proxy may answer otherwise)
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"The MLflow tracking server {uri} is not reachable ({getattr(err, 'reason', err)}). Start it, "
            "correct MLFLOW_TRACKING_URI, or unset it to log to mlflow.db in the project. Nothing was run."
        ) from err


def sqlite_path(uri: str) -> Path | None:
    """The file of an sqlite store's URI; None for any other store."""
    return Path(uri[len("sqlite:///") :].split("?")[0]) if uri.startswith("sqlite:///") else None


#: The sqlite stores this process has created or checked with `relocate` already.
_CHECKED: set[Path] = set()


def store_uri() -> str:
    """tracking_uri(), its sqlite store created first if there is none (`create_store`), or, the first
    time this process opens it, its artifact locations pointed at its own mlartifacts/ and refused if
    any is elsewhere (`locations.own_store`)."""
    uri = tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        create_store(path)
        _CHECKED.add(path)
    elif path is not None and path not in _CHECKED:
        locations.own_store(path)
        _CHECKED.add(path)
    return uri


def create_store(path: Path) -> None:
    """A new sqlite store at `path`, whole or not at all: MLflow builds its tables in a temporary file
    beside it, which is then renamed to `path`, all under the store's lock, so a creation cut short
    (Ctrl-C, a stage stopped, two first stages at once) leaves no half-made store for the next stage."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock():
        if path.is_file():  # another stage made it while this one waited for the lock
            return
        saving.clear_stale(path)  # what a creation cut short left (it held the lock: it is gone)
        tmp = path.with_name(f"{saving.TMP_PREFIX}{path.name}.{os.getpid()}")
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        os.replace(tmp, path)
    log.info("created the MLflow store %s", path)


def store_lock(path: Path | None = None) -> contextlib.AbstractContextManager[None]:
    """Serialise writes to an sqlite store across processes (parallel experiments share it): `lock.held`
    of `path`, by default the store of tracking_uri(); nothing for a server's store."""
    return lock.held(path if path is not None else sqlite_path(tracking_uri()))


def tracking_client():
    import mlflow

    return mlflow.MlflowClient(store_uri())


#: What a store says when two writers insert the same row at the same moment (PostgreSQL through an
#: MLflow server, sqlite): MLflow's get-or-create of a dataset, tag or alias reads, then inserts.
CONFLICTS = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "IntegrityError")


CONFLICT_ATTEMPTS = 8


def retry_conflicts(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, sent again when the store refused it because another writer inserted
    the same row meanwhile (a teammate's stage logging the same input, say): the refused write was
    rolled back whole, and the next attempt finds that row and uses it."""
    import mlflow

    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            return call(*args, **kwargs)
        except mlflow.exceptions.MlflowException as err:
            if attempt == CONFLICT_ATTEMPTS - 1 or not any(mark in str(err) for mark in CONFLICTS):
                raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))  # spread the retries of writers released together
    raise AssertionError("unreachable")


#: Stages whose logging is done again by running them again (cheaply: what they say) rather than by
#: `python -m ops.tracking log`, because a model or the pipeline version is part of it.
RERUN_TO_LOG = {
    "evaluate": "it scores the test set again; nothing is trained",
    "ensemble": "it trains the head again, in seconds, on the cached features",
    "compare": "it reads the metrics files again",
}


def logging_failed(stage: str, action: str, err: Exception, run_id: str | None = None) -> TrackingError:
    """The error for a logging failure after a stage's work is saved: what to do to log it later."""
    if stage in RERUN_TO_LOG:  # running it again is the simplest way
        included = ", the model included," if stage != "compare" else ""
        how = f"log everything{included} with\n    dvc repro --force {stage}\n({RERUN_TO_LOG[stage]})"
    else:
        into = f" --run-id {run_id}" if run_id else ""
        how = (
            f"log the saved outputs with\n    python -m ops.tracking log {stage}{into}\n"
            f"and record them in dvc.lock without running the stage again with\n    dvc commit {stage}"
        )
    return TrackingError(
        f"The {stage} stage finished its work and saved its outputs, but {action} to {tracking_uri()} "
        f"failed: {err}\nNothing is lost. Once tracking works again, {how}"
    )


def active_run_id() -> str:
    """The id of the MLflow run the current stage opened."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no MLflow run is open: log from inside tracking.stage_run")
    return run.info.run_id
