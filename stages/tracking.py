"""MLflow: the one place that opens runs, tags their lineage, and logs params, metrics and artifacts.

Tracking is embedded by default: `sqlite:///mlflow.db` in the project folder (also for queued DVC
experiments, which run in a temporary copy: DVC tells the stage where the project is). Set
`MLFLOW_TRACKING_URI` to use a team server instead, `MLFLOW_EXPERIMENT_NAME` to pick the experiment.

Lineage points from MLflow to DVC, never back: nothing here writes a DVC output, and no stage
depends on this module, so DVC never re-runs a stage for tracking's sake and its run-cache works.

Each stage that runs opens one run named after itself (`stage_run`), tagged with the stage, the
git commit, and the DVC content hashes of the data and models it reads (`dvc.in.<path>`, from
dvc.lock), which it also logs as MLflow dataset inputs. When the stage's work is saved, the run
gets the DVC content hashes of what it wrote (`dvc.out.<path>`, computed as DVC does), its
metrics files, its per-epoch histories (live, through `epoch_logger`) and its outputs as
artifacts. A stage that DVC skips (unchanged, or restored from its run-cache) logs nothing.

`compare`, the last stage, then opens the run of the pipeline version (`log_pipeline_version`):
all params, the key metrics of every model, and a link to the run of every stage, found by the
hashes of the outputs dvc.lock records for it, so unchanged stages reused from earlier versions are
linked too.
`python -m stages.tracking find <path>` finds the run that wrote an output.

The sqlite store is shared by experiments running in parallel: every write takes a file lock, so
none fails with "database is locked". A tracking server that cannot be reached fails the stage at
its start; a logging failure after the work is saved says how to log it afterwards
(`python -m stages.tracking log <stage> --run-id <id>`; for the stages that log a model or the
version, `dvc repro --force <stage>`: see RERUN_TO_LOG).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import fcntl
import functools
import hashlib
import json
import logging
import os
import pickle
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from stages import common, config, fetch
from stages.common import StageError, project_root

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "image-classifier"
PIPELINE_FILE = Path("dvc.yaml")
LOCK_FILE = Path("dvc.lock")
PIPELINE_RUN = "pipeline"
#: The pipeline version's headline metrics, named as in the metrics files (flattened) and in DVC.
KEY_METRICS = (
    "top.val_accuracy",
    "finetune.val_accuracy",
    "test.accuracy",
    "test.top3_accuracy",
    "test.log_loss",
    "baseline.test.accuracy",
    "ensemble.test.accuracy",
)
#: The prefix of each training stage's per-epoch metrics, so the curves of the stages can't be confused.
CURVE_PREFIX = {"train_top": "top.", "finetune": "finetune.", "baseline": "baseline.", "ensemble": "ensemble."}
#: Outputs not copied into the tracking store: data and the backbone are too large (DVC keeps
#: them), and the fine-tuned and ensemble models are stored once, inside the models evaluate and
#: ensemble log and register.
NOT_ARTIFACTS = ("data/", "models/backbone.weights.h5", "models/model.keras", "models/ensemble")
#: Tells the MLflow UI this experiment trains models (its runs table), not a GenAI app (traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
REACHABLE_TIMEOUT = 5.0
#: Stages whose logging is done again by running them again (cheaply: what they say) rather than by
#: `python -m stages.tracking log`, because a model or the pipeline version is part of it.
RERUN_TO_LOG = {
    "evaluate": "it scores the test set again; nothing is trained",
    "ensemble": "it trains the head again, in seconds, on the cached features",
    "compare": "it reads the metrics files again",
}


#: When this module was imported: with the pid, names this process where /proc cannot (see `attempt`).
_IMPORTED = f"{time.time():.0f}"


class TrackingError(StageError):
    """The tracking server cannot be reached, or logging failed."""


# The stage's MLflow worker ------------------------------------------------------------------
#
# Importing MLflow and opening its store take seconds in every stage. A stage, once its arguments
# and params are read, starts a worker process of its own (`start_worker`: `python -m
# stages.tracking serve`) that imports MLflow while the stage loads its data and builds its model,
# then does the stage's logging: the functions marked `in_worker` are called there, with the same
# arguments and results (pickled over the two pipes between the stage and its child, which no other
# process can reach), their errors raised in the stage. Anywhere else (tests, notebooks, this
# module's commands) they run in-process. A stage asked for --help, or stopped by a wrong argument
# or param, has started nothing; one killed before it closes its run leaves the worker at the end
# of its input: it ends the run as failed.

#: The stage modules whose processes log through a worker.
STAGE_MODULES = frozenset(
    f"stages.{name}"
    for name in (
        "download",
        "prepare",
        "featurize",
        "train_top",
        "finetune",
        "evaluate",
        "baseline",
        "ensemble_features",
        "ensemble",
        "compare",
    )
)
#: In the worker's environment: the stage's process id (see `attempt`).
STAGE_PID = "PIPELINE_STAGE_PID"
_worker: _Worker | None = None
#: In the worker: the stage and params of the run it has open.
_OPEN: dict[str, Any] = {}


class _Worker:
    def __init__(self, stage: str) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, STAGE_PID: str(os.getpid())}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stages.tracking", "serve", stage],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.called = False

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.called = True
        try:
            pickle.dump((fn.__module__, fn.__name__, args, kwargs), self.process.stdin)
            self.process.stdin.flush()
            ok, value = pickle.load(self.process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            raise TrackingError(
                f"the MLflow logging process of this stage stopped (exit {self.process.poll()})"
            ) from err
        if ok:
            return value
        raise value

    def close(self) -> None:
        """At the stage's exit. A worker never called has nothing to finish (the stage stopped before
        its run opened): it is stopped. Otherwise the end of its input ends it: at once (it skips the
        interpreter's teardown), or once it has ended a run left open as failed."""
        if not self.called:
            self.process.kill()
        elif self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_worker(stage: str) -> None:
    """Start the MLflow worker of `stage` (one of STAGE_MODULES), when tracking is on: called by the
    stage's main once its arguments and params are read."""
    global _worker
    if f"stages.{stage}" in STAGE_MODULES and enabled() and _worker is None:
        _worker = _Worker(stage)
        atexit.register(_worker.close)


def in_worker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` runs in this process's MLflow worker, when it has one; else here."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _worker is None:
            return fn(*args, **kwargs)
        return _worker.call(fn, args, kwargs)

    return call


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling; else a TrackingError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001  any exception object may refuse
        return TrackingError(f"{type(err).__name__}: {err}")
    return err


def _warm_up(stage: str) -> None:
    """What the stage will need, loaded while it does its first work: MLflow, an embedded store that
    exists already (none is created here, and a server is not asked anything yet), and for evaluate
    what logging a model needs (Keras too: MLflow loads the logged model to check that it serves its
    input example). Failures wait for the call that needs it."""
    with contextlib.suppress(Exception):
        import mlflow

        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        store = _sqlite_path(uri)
        if store is not None and store.is_file():
            with store_lock():
                mlflow.get_experiment_by_name(experiment_name())
        if stage in ("evaluate", "ensemble"):  # they log a model
            import mlflow.pyfunc
            from mlflow.utils import requirements_utils

            from stages import backbones  # noqa: F401  Keras: MLflow loads the model to check its input example

            requirements_utils._init_modules_to_packages_map()  # reads every installed package's metadata


def serve(stage: str) -> None:
    """The worker's loop: run the calls the stage sends on stdin, answer each on stdout."""
    import importlib
    import signal

    from stages import common

    # Ctrl-C reaches the whole process group: the stage handles it and tells the worker to end its
    # run as failed (or, gone, leaves it at the end of its input).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    common.configure_logging()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what MLflow prints goes to the stage's stderr
    calls = sys.stdin.buffer
    _warm_up(stage)
    while True:
        try:
            module, name, args, kwargs = pickle.load(calls)
        except EOFError:
            break
        try:
            answer = (True, getattr(importlib.import_module(module), name)(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001  every error belongs to the stage
            answer = (False, _portable(err))
        pickle.dump(answer, answers)
        answers.flush()
    if _OPEN:  # the stage stopped without closing its run
        log.warning("the %s stage stopped before its MLflow run was complete: marking it failed", _OPEN["stage"])
        try:
            _abort(_OPEN["stage"], _OPEN["params"])
        except Exception as err:  # noqa: BLE001  the worker's last words
            log.warning("could not mark it failed at %s: %s", tracking_uri(), err)
    # Everything is written and committed: skip the interpreter's teardown of MLflow (most of a second).
    sys.stderr.flush()
    os._exit(0)


# Where runs go ------------------------------------------------------------------------------


def enabled() -> bool:
    """False when PIPELINE_TRACKING=off: the stages run and log nothing (to measure, or to try
    something without leaving a run behind)."""
    return os.environ.get("PIPELINE_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the project's sqlite store; a relative sqlite path is taken from the
    project folder (not from the temporary copy a queued experiment runs in)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{project_root() / uri[len('sqlite:///') :]}"
    return uri


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def _experiment(client: Any) -> Any:
    """The experiment, created if there is none yet (a team server on which every stage so far was
    restored from DVC rather than run, say). With the embedded sqlite store its artifacts go to
    mlartifacts/ beside the database, wherever the stage runs; a server decides for itself
    (--serve-artifacts)."""
    import mlflow

    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        store = _sqlite_path(tracking_uri())
        location = (store.parent / "mlartifacts").as_uri() if store is not None else None
        try:
            client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # else another stage (a teammate's, say) created it meanwhile
        experiment = client.get_experiment_by_name(name)
    return experiment


def _use_experiment() -> None:
    """Make the experiment current, creating it if needed (`_experiment`)."""
    import mlflow

    mlflow.set_experiment(experiment_id=_experiment(_client()).experiment_id)


def _open_run(stage: str, run_id: str | None = None, tags: dict[str, str] | None = None):
    """Start (or, with `run_id`, resume) the stage's run in the current experiment."""
    import mlflow

    _use_experiment()
    if run_id:
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(run_name=stage, tags=lineage_tags(stage) if tags is None else tags)


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
                "MLFLOW_TRACKING_PASSWORD to your login on it (a team member's file from `python -m stages.team "
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


def _sqlite_path(uri: str) -> Path | None:
    """The file of an sqlite store's URI; None for any other store."""
    return Path(uri[len("sqlite:///") :].split("?")[0]) if uri.startswith("sqlite:///") else None


def store_uri() -> str:
    """tracking_uri(), its sqlite store created first if there is none (`create_store`)."""
    uri = tracking_uri()
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        create_store(path)
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
        common.clear_stale(path)  # what a creation cut short left (it held the lock: it is gone)
        tmp = path.with_name(f"{common.TMP_PREFIX}{path.name}.{os.getpid()}")
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        os.replace(tmp, path)
    log.info("created the MLflow store %s", path)


@contextlib.contextmanager
def store_lock() -> Iterator[None]:
    """Serialise writes to an sqlite store across processes (parallel experiments share it)."""
    path = _sqlite_path(tracking_uri())
    if path is None:
        yield
        return
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client():
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


# What dvc.yaml and dvc.lock say ------------------------------------------------------------


def _stages() -> dict[str, Any]:
    """The stages of dvc.yaml in the current folder, read once per process and folder."""
    return _read_stages(PIPELINE_FILE.resolve())


@functools.cache
def _read_stages(pipeline: Path) -> dict[str, Any]:
    """dvc.yaml's stages, a `foreach` stage expanded as DVC does: `name@item` for each item of its
    list (given in place, or as `${key}` of a list in params.yaml), `${item}` replaced in its `do`."""
    if not pipeline.is_file():
        return {}
    stages: dict[str, Any] = {}
    for name, spec in (yaml.safe_load(pipeline.read_text(encoding="utf-8")).get("stages") or {}).items():
        if "foreach" not in spec:
            stages[name] = spec
            continue
        items = spec["foreach"]
        if isinstance(items, str):
            items = _param_value(pipeline.parent / config.PARAMS_FILE, items.strip().removeprefix("${").rstrip("}"))
        for item in items or []:
            stages[f"{name}@{item}"] = _with_item(spec["do"], str(item))
    return stages


def _param_value(params: Path, key: str) -> Any:
    value: Any = yaml.safe_load(params.read_text(encoding="utf-8")) if params.is_file() else {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _with_item(node: Any, item: str) -> Any:
    if isinstance(node, str):
        return node.replace("${item}", item)
    if isinstance(node, list):
        return [_with_item(v, item) for v in node]
    if isinstance(node, dict):
        return {_with_item(k, item): _with_item(v, item) for k, v in node.items()}
    return node


def _paths(entries: list) -> list[str]:
    """Paths of dvc.yaml deps/outs/metrics entries (plain strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def stage_param_keys(stage: str) -> list[str]:
    """The params a stage depends on, as dvc.yaml declares them (e.g. ['seed', 'top'])."""
    keys: list[str] = []
    for entry in _stages().get(stage, {}).get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {params-file: [keys]}; {params-file: null} is all of them, as no keys at all
            for names in entry.values():
                keys.extend(names or [])
    return keys


def loggable_params(params: config.Params) -> dict[str, Any]:
    """All params, flattened, a URL's secrets redacted (`fetch.redact_url`)."""
    return {
        key: fetch.redact_url(value) if isinstance(value, str) and fetch.is_url(value) else value
        for key, value in config.flatten(params).items()
    }


def stage_params(stage: str, params: config.Params) -> dict[str, Any]:
    """Flattened values of the params `stage` depends on (all params if dvc.yaml is not here)."""
    flat = loggable_params(params)
    keys = stage_param_keys(stage)
    if not keys:
        return flat
    return {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}


def stage_outputs(stage: str) -> list[str]:
    """Everything dvc.yaml says `stage` writes: its outs, then its metrics."""
    spec = _stages().get(stage, {})
    return _paths(spec.get("outs")) + _paths(spec.get("metrics"))


def data_deps(stage: str) -> list[str]:
    """What a stage reads that another stage wrote (data, features, models), per dvc.yaml."""
    return [p for p in _paths(_stages().get(stage, {}).get("deps")) if not p.startswith("stages/")]


def locked_hashes(lock: Path = LOCK_FILE) -> dict[str, str]:
    """{path: DVC md5} of every stage output recorded in dvc.lock (directories end in .dir)."""
    if not lock.is_file():
        return {}
    stages = yaml.safe_load(lock.read_text(encoding="utf-8")).get("stages", {})
    return {out["path"]: out["md5"] for spec in stages.values() for out in spec.get("outs", []) if "md5" in out}


def dvc_hash(path: Path) -> str:
    """The content hash DVC records in dvc.lock for a file or a folder: the md5 of a file; for a
    folder, the md5 of its listing (each file's md5 and path, sorted, as JSON) followed by `.dir`."""
    if not path.is_dir():
        return _md5(path)
    files = sorted(file for file in path.rglob("*") if file.is_file())
    listing = sorted(
        ({"md5": _md5(file), "relpath": file.relative_to(path).as_posix()} for file in files),
        key=lambda entry: entry["relpath"],
    )
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


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


def attempt() -> str:
    """The `dvc repro` (or `dvc exp run`) this stage runs in, as `<pid>.<start>` of that process;
    the stage's own process when none is found. Tags runs so a failed attempt's runs stay together."""
    pid = int(os.environ.get(STAGE_PID, os.getpid()))  # a stage's MLflow worker names the stage's
    own = f"{pid}.{_IMPORTED}"
    for step in range(8):  # the stage's python, a shell, then DVC
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            break
        here = f"{pid}.{stat[19]}"  # field 22 of /proc/<pid>/stat: the start time, against pid reuse
        own = here if step == 0 else own
        if any(os.path.basename(part) == b"dvc" for part in command[:3]):
            return here
        pid = int(stat[1])
    return own


def lineage_tags(stage: str) -> dict[str, str]:
    commit, dirty = git_commit()
    tags = {
        "pipeline.stage": stage,
        "pipeline.attempt": attempt(),
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    hashes = locked_hashes()
    for path in data_deps(stage):
        if path in hashes:
            tags[f"dvc.in.{path}"] = hashes[path]
    return tags


# Runs ---------------------------------------------------------------------------------------


def logging_failed(stage: str, action: str, err: Exception, run_id: str | None = None) -> TrackingError:
    """The error for a logging failure after a stage's work is saved: what to do to log it later."""
    if stage in RERUN_TO_LOG:  # running it again is the simplest way
        included = ", the model included," if stage != "compare" else ""
        how = f"log everything{included} with\n    dvc repro --force {stage}\n({RERUN_TO_LOG[stage]})"
    else:
        into = f" --run-id {run_id}" if run_id else ""
        how = (
            f"log the saved outputs with\n    python -m stages.tracking log {stage}{into}\n"
            f"and record them in dvc.lock without running the stage again with\n    dvc commit {stage}"
        )
    return TrackingError(
        f"The {stage} stage finished its work and saved its outputs, but {action} to {tracking_uri()} "
        f"failed: {err}\nNothing is lost. Once tracking works again, {how}"
    )


@contextlib.contextmanager
def stage_run(stage: str, params: config.Params) -> Iterator[str | None]:
    """The MLflow run of one stage: opened (lineage tagged) before the work, completed after it.

    When the body returns, the run gets the DVC hashes of the outputs dvc.yaml declares for the
    stage, and logs them (`log_outputs`). Yields the run's id (None when tracking is off).
    """
    if not enabled():
        log.info("PIPELINE_TRACKING=off: %s logs nothing", stage)
        yield None
        return
    uri = tracking_uri()
    check_server(uri)
    run_id = _begin(stage, params, lineage_tags(stage))
    log.info("MLflow run %s (%s) at %s", run_id, stage, uri)
    try:
        yield run_id
        try:
            log_outputs(stage)
        except Exception as err:
            raise logging_failed(stage, "logging its outputs", err, run_id) from err
    except BaseException:
        with contextlib.suppress(Exception):
            _abort(stage, params)
        raise
    _end_run()


@in_worker
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
    except Exception as err:
        if mlflow.active_run() is not None:
            with contextlib.suppress(Exception), store_lock():
                mlflow.end_run("FAILED")
        raise TrackingError(f"Could not open an MLflow run at {uri}: {err}. Nothing was run.") from err
    _OPEN.update(stage=stage, params=params)
    return run.info.run_id


@in_worker
def _end_run() -> None:
    """End the stage's run as finished."""
    import mlflow

    with store_lock():
        mlflow.end_run()
    _OPEN.clear()


@in_worker
def _abort(stage: str, params: config.Params) -> None:
    """End the stage's run as failed, with a failed row for its attempt (`_record_failed_attempt`)."""
    import mlflow

    _OPEN.clear()
    with store_lock():
        mlflow.end_run("FAILED")
        _record_failed_attempt(stage, params)


def _record_failed_attempt(stage: str, params: config.Params) -> None:
    """A failed row for the attempt a stage failed in, with the attempt's stage runs nested under it,
    so that a failure stands with its version's params, not as a lone run among the versions."""
    client = _client()
    experiment = _experiment(client)
    tags = lineage_tags(PIPELINE_RUN) | {"pipeline.failed_stage": stage}
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`pipeline.attempt` = '{tags['pipeline.attempt']}'", max_results=100
    )
    name = f"{version_name(params)} (failed at {stage})"
    failed = client.create_run(experiment.experiment_id, run_name=name, tags=tags, start_time=_first_start(runs))
    for params_key, value in loggable_params(params).items():
        client.log_param(failed.info.run_id, params_key, value)
    for other in runs:
        if "mlflow.parentRunId" not in other.data.tags and other.data.tags.get("pipeline.stage") != PIPELINE_RUN:
            retry_conflicts(client.set_tag, other.info.run_id, "mlflow.parentRunId", failed.info.run_id)
    client.set_terminated(failed.info.run_id, "FAILED")


def _first_start(runs: list[Any]) -> int | None:
    """When the earliest of `runs` started (ms), None for none."""
    return min((r.info.start_time for r in runs), default=None)


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


@in_worker
def log_outputs(stage: str, replay_history: bool = False) -> None:
    """Log what dvc.yaml says `stage` produced: the DVC hash of each output (`dvc.out.<path>`),
    metrics files, artifacts, and optionally the per-epoch history files as step metrics (when
    they were not logged live)."""
    import mlflow

    metrics = _stage_metrics(stage)
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
    """A history.csv as step metrics named `prefix` + column, except the metrics in `skip` (already
    logged live); returns the names it logged."""
    import mlflow

    names: set[str] = set()
    for step, row in _history(path):
        values = {prefix + k: v for k, v in row.items() if prefix + k not in skip}
        mlflow.log_metrics(values, step=step)
        names |= set(values)
    return names


def _history(path: Path) -> list[tuple[int, dict[str, float]]]:
    """The rows of a history.csv as (step, {metric: value}): step 0 is its first epoch; columns
    that are not numbers (a stage name) are left out."""
    rows = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f)):
            values = {}
            for key, value in row.items():
                with contextlib.suppress(TypeError, ValueError):
                    values[key] = float(value)
            values.pop("epoch", None)
            rows.append((number, values))
    return rows


def active_run_id() -> str:
    """The id of the MLflow run the current stage opened."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no MLflow run is open: log from inside tracking.stage_run")
    return run.info.run_id


@in_worker
def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active stage run (extra metrics a stage computes beyond its metrics files)."""
    if not enabled():
        return
    import mlflow

    with store_lock():
        mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def epoch_logger(prefix: str = "") -> Any:
    """A Keras callback logging each epoch's loss and accuracy (train and validation) live.

    Best effort: if the tracking store fails mid-training, training goes on (the history is
    saved with the outputs and can be logged afterwards).
    """
    import keras  # imported here: stages without a model need not load TensorFlow

    class EpochLogger(keras.callbacks.Callback):
        failed = False

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs and not self.failed:
                try:
                    log_metrics({prefix + k: v for k, v in logs.items() if k != "learning_rate"}, step=epoch)
                except Exception as err:  # noqa: BLE001  training matters more than its live curve
                    self.failed = True
                    log.warning("live logging to %s failed, training goes on: %s", tracking_uri(), err)

    return EpochLogger()


@in_worker
def log_model(*args: Any, **kwargs: Any) -> str:
    """`serving.log_model`, in the worker: the stage need not import MLflow's model code."""
    from stages import serving

    return serving.log_model(*args, **kwargs)


def log_classifier(
    stage: str,
    model_path: Path,
    classes: list[str],
    example: Path,
    prepared: Path,
    params: config.Params,
    test: dict[str, Any],
) -> None:
    """Log and register a classifier that `stage` scored on the test split of `prepared` (`log_model`,
    with evaluate's threshold and registry name, `test` its headline test metrics and `example` an
    input picture); a failure says how to log it afterwards (`logging_failed`)."""
    try:
        log_model(
            model_path,
            classes,
            params.evaluate.threshold,
            example,
            params.evaluate.registered_model,
            test["accuracy"],
            test_set=locked_hashes().get(prepared.as_posix()),
            max_side=params.data.max_side,
            min_side=params.data.min_side,
            max_pixels=params.data.max_pixels,
            precision=params.precision,
            metrics=test,
        )
    except Exception as err:
        raise logging_failed(stage, "logging the model", err) from err


# The pipeline version -----------------------------------------------------------------------


def _stage_metrics(stage: str) -> dict[str, float]:
    """Every number in the metrics files of `stage`, by its flattened name (as DVC shows it)."""
    metrics: dict[str, float] = {}
    for path in _paths(_stages().get(stage, {}).get("metrics")):
        if Path(path).is_file():
            metrics.update(_numbers(json.loads(Path(path).read_text(encoding="utf-8"))))
    return metrics


def _all_metrics() -> dict[str, float]:
    """Every number in the pipeline's metrics files, by its flattened name."""
    return {key: value for stage in _stages() for key, value in _stage_metrics(stage).items()}


def version_name(params: config.Params) -> str:
    """What a version is called: its DVC experiment, else its commit, and the params it changed
    from the committed params.yaml (`exp-3f2a1 finetune.learning_rate=0.0002`)."""
    commit, _ = git_commit()
    name = os.environ.get("DVC_EXP_NAME") or (commit[:7] if commit != "unknown" else PIPELINE_RUN)
    changed = changed_params(params)
    shown = [f"{key}={value}" for key, value in changed.items()][:3]
    if len(changed) > len(shown):
        shown.append(f"+{len(changed) - len(shown)} more")
    return " ".join([name, *shown])


def changed_params(params: config.Params) -> dict[str, Any]:
    """The params whose values differ from the committed params.yaml ({} outside git)."""
    try:
        committed = subprocess.run(
            ["git", "show", f"HEAD:./{config.PARAMS_FILE}"], capture_output=True, text=True, check=True
        ).stdout
        before = config.flatten(config.parse(yaml.safe_load(committed)))
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError, config.ParamsError):
        return {}
    return {k: v for k, v in loggable_params(params).items() if before.get(k) != v}


def _log_curves(client: Any, run_id: str) -> set[str]:
    """The per-epoch history of each training stage, as step metrics of the version: its Compare
    and chart views draw them (`top.val_accuracy`, `finetune.val_accuracy`, ...). Returns their names."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    names: set[str] = set()
    for stage, prefix in CURVE_PREFIX.items():
        for path in stage_outputs(stage):
            if path.endswith("history.csv") and Path(path).is_file():
                rows = _history(Path(path))
                points = [Metric(prefix + k, v, stamp, step) for step, values in rows for k, v in values.items()]
                for start in range(0, len(points), 1000):  # log_batch takes at most 1000 metrics
                    client.log_batch(run_id, metrics=points[start : start + 1000])
                names |= {point.key for point in points}
    return names


def _link_models(client: Any, experiment_id: str, source_run: str, version_id: str) -> None:
    """Show the models `source_run` logged (the fine-tuned model) on the version's row too."""
    from mlflow.entities import LoggedModelOutput

    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{source_run}'"
    )
    if models:
        client.log_outputs(version_id, [LoggedModelOutput(m.model_id, step=0) for m in models])


def versions_url(base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs table of this experiment, showing only pipeline versions, best test
    accuracy first (the UI takes the filter and the order from the address)."""
    import urllib.parse

    experiment = _client().get_experiment_by_name(experiment_name())
    query = urllib.parse.urlencode(
        {
            "searchFilter": f"tags.`pipeline.stage` = '{PIPELINE_RUN}'",
            "orderByKey": "metrics.`test.accuracy`",
            "orderByAsc": "false",
            "workflowType": "machine_learning",  # the UI's model-training mode, not its GenAI one
        },
        quote_via=urllib.parse.quote,
    )
    where = f"experiments/{experiment.experiment_id}/runs?{query}" if experiment else ""
    return f"{base}/#/{where}"


def runs_that_wrote(outputs: dict[str, str], stage: str | None = None, max_results: int = 100) -> list[Any]:
    """The finished runs, newest first, that wrote every output in `outputs` ({path: DVC hash})."""
    client = _client()
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None or not outputs:
        return []
    conditions = [f"tags.`dvc.out.{path}` = '{md5}'" for path, md5 in outputs.items()]
    if stage:
        conditions.append(f"tags.`pipeline.stage` = '{stage}'")
    conditions.append("attributes.status = 'FINISHED'")
    return client.search_runs(
        [experiment.experiment_id],
        " and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def switched_off(params: config.Params) -> set[str]:
    """The stages that `params` switch off: they run, but write empty outputs and log no run."""
    off = set()
    if not params.baseline.enabled:
        off.add("baseline")
    if not params.ensemble.backbones:
        off.add("ensemble")
    return off


@in_worker
def log_pipeline_version(params: config.Params, stage: str = "compare") -> str | None:
    """Open the run of this pipeline version, linking the run of every stage; return its id
    (None when tracking is off).

    Called by the last stage, `stage`, which has no run of its own, once dvc.lock records every
    other stage. Each stage's run is the newest that wrote the outputs dvc.lock records for it, so a
    stage reused unchanged (or restored from DVC's run-cache) links the run that first wrote its
    outputs; a stage switched off (`switched_off`) has none. Runs made in this version get it as
    their parent: they nest under it in the MLflow UI. The version shows the models that evaluate
    and ensemble logged, and carries evaluate's `model.*` tags (the ensemble's as `ensemble.model.*`).
    """
    if not enabled():
        return None
    import mlflow
    from mlflow.entities import Param

    client = _client()
    hashes = locked_hashes()
    runs: dict[str, str] = {}
    skipped = switched_off(params) | {stage}
    for name in _stages():
        if name in skipped:
            continue
        if found := runs_that_wrote({p: hashes[p] for p in stage_outputs(name) if p in hashes}, name, 1):
            runs[name] = found[0].info.run_id
        else:
            log.warning("no run in %s wrote the %s outputs dvc.lock records: not linked", tracking_uri(), name)
    metrics = {k: v for k, v in _all_metrics().items() if k in KEY_METRICS}
    tags = lineage_tags(PIPELINE_RUN) | {f"run.{name}": run_id for name, run_id in runs.items()}
    try:
        with store_lock():
            experiment = _experiment(client)
            linked = {name: client.get_run(run_id) for name, run_id in runs.items()}
            new = [r for r in linked.values() if "mlflow.parentRunId" not in r.data.tags]  # made in this version
            for name, prefix in (("evaluate", ""), ("ensemble", "ensemble.")):
                if name in linked:
                    tags |= {prefix + k: v for k, v in linked[name].data.tags.items() if k.startswith("model.")}
            version = client.create_run(
                experiment.experiment_id,
                run_name=version_name(params),
                tags=tags,
                start_time=_first_start(new),  # the version spans the work of its stages
            )
            version_id = version.info.run_id
            client.log_batch(version_id, params=[Param(k, str(v)) for k, v in loggable_params(params).items()])
            curves = _log_curves(client, version_id)
            for key, value in metrics.items():
                if key not in curves:  # a curve ends on the final value already
                    client.log_metric(version_id, key, value)
            for name in ("evaluate", "ensemble"):
                if name in runs:
                    _link_models(client, experiment.experiment_id, runs[name], version_id)
            for other in new:
                retry_conflicts(client.set_tag, other.info.run_id, "mlflow.parentRunId", version_id)
            client.set_terminated(version_id)
    except Exception as err:
        raise logging_failed(stage, "logging the pipeline version", err) from err
    mlflow.set_tracking_uri(tracking_uri())
    log.info("pipeline version: MLflow run %s, linking %s", version_id, ", ".join(runs))
    return version_id


# Logging afterwards, finding runs -----------------------------------------------------------


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


def find(path: str, md5: str | None) -> list[str]:
    """Lines describing the runs that wrote `path` with the DVC hash `md5` (default: dvc.lock's)."""
    import mlflow

    md5 = md5 or locked_hashes().get(path)
    if md5 is None:
        raise StageError(f"dvc.lock records no output {path!r}: give its hash with --md5, or run `dvc repro` first")
    mlflow.set_tracking_uri(store_uri())
    runs = runs_that_wrote({path: md5})
    if not runs:
        raise StageError(
            f"no finished run in {tracking_uri()} (experiment {experiment_name()}) wrote {path} {md5}: "
            "it was made with PIPELINE_TRACKING=off, logged to another store, or restored by `dvc pull`"
        )
    return [
        f"{r.info.run_id}  {r.data.tags.get('pipeline.stage', '?'):<10} "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.info.start_time / 1000))}  "
        f"git {r.data.tags.get('git.commit', 'unknown')[:10]}  {r.data.tags.get('dvc.experiment', '')}".rstrip()
        for r in runs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Log a stage's saved outputs afterwards, or find the run of an output."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    log_cmd = sub.add_parser("log", help="log the saved outputs of a stage whose logging failed")
    log_cmd.add_argument("stage", choices=[name for name in _stages() if name not in RERUN_TO_LOG])
    log_cmd.add_argument("--run-id", help="the stage's run, as its error message names it (default: a new run)")
    find_cmd = sub.add_parser("find", help="the MLflow runs that wrote an output, found by its DVC hash")
    find_cmd.add_argument("path", help="an output named in dvc.yaml, e.g. models/model.keras")
    find_cmd.add_argument("--md5", help="the output's DVC hash (default: the one dvc.lock records)")
    serve_cmd = sub.add_parser("serve", help="(started by a stage) do the stage's MLflow logging")
    serve_cmd.add_argument("stage")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.stage)
    elif args.command == "log":
        run_id = relog(args.stage, args.run_id)
        print(f"logged {args.stage} to {tracking_uri()} as run {run_id}", file=sys.stderr)
    else:
        print("\n".join(find(args.path, args.md5)))


if __name__ == "__main__":
    # Run as the module the stages import (not as __main__, a second copy): the worker's state is one.
    from stages import common, tracking  # noqa: PLW0406

    common.run(tracking.main)
