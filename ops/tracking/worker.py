"""The stage's MLflow worker.

Importing MLflow and opening its store take seconds in every stage. A stage, once its arguments
and params are read, starts a worker process of its own (`start_worker`: `python -m ops.tracking
serve`) that imports MLflow while the stage loads its data and builds its model, then does the
stage's logging: the functions marked `in_worker` are called there, with the same arguments and
results (pickled over the two pipes between the stage and its child, which no other process can
reach), their errors raised in the stage; those marked `in_worker_later` (opening the stage's run)
are sent without the stage waiting, their errors raised by the next call. Anywhere else (tests,
notebooks, the tracking commands) they run in-process. A stage asked for --help, or stopped by a
wrong argument or param, has started nothing; one killed before it closes its run leaves the worker
at the end of its input: it ends the run as failed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ops import runner
from ops.code import ROOT
from ops.tracking.lineage import STAGE_PID
from ops.tracking.store import TrackingError, enabled, experiment_name, sqlite_path, store_lock, tracking_uri

log = logging.getLogger(__name__)

#: The stage modules whose processes log through a worker: every module of stages/.
STAGE_MODULES = frozenset(f"stages.{path.stem}" for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")


_worker: _Worker | None = None
#: In the worker: the run the stage has open, by stage, and how to end it as failed should the
#: stage's input end first (`run_opened`, `run_closed`).
_UNFINISHED: dict[str, Callable[[], None]] = {}


def run_opened(stage: str, end_failed: Callable[[], None]) -> None:
    """The stage's run is open: `end_failed` ends it, should the stage stop before closing it."""
    _UNFINISHED[stage] = end_failed


def run_closed() -> None:
    """The stage's run is closed (finished or failed)."""
    _UNFINISHED.clear()


class _Worker:
    def __init__(self, stage: str) -> None:
        env = {**os.environ, STAGE_PID: str(os.getpid())}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ops.tracking", "serve", stage],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.called = False
        self.unanswered = 0  # calls sent whose answers are not read yet (`send`)

    def send(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        """Ask the worker to run `fn`, without waiting: its answer is read, and its error raised, by
        the next `call`."""
        assert self.process.stdin is not None
        self.called = True
        try:
            pickle.dump((fn.__module__, fn.__name__, args, kwargs), self.process.stdin)
            self.process.stdin.flush()
        except OSError as err:
            raise self._stopped() from err
        self.unanswered += 1

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run `fn` in the worker and return its value (raise its error), once every call sent before
        it has been answered (the first error among those is raised instead)."""
        self.send(fn, args, kwargs)
        assert self.process.stdout is not None
        answers = []
        try:
            while self.unanswered:
                answers.append(pickle.load(self.process.stdout))
                self.unanswered -= 1
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            raise self._stopped() from err
        for ok, value in answers[:-1]:
            if not ok:
                raise value
        ok, value = answers[-1]
        if ok:
            return value
        raise value

    def _stopped(self) -> TrackingError:
        return TrackingError(f"the MLflow logging process of this stage stopped (exit {self.process.poll()})")

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


def in_worker_later(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` runs in this process's MLflow worker without the stage waiting for it: None at once (its
    error is raised by the next call to the worker); with no worker, here, and its value."""

    @functools.wraps(fn)
    def send(*args: Any, **kwargs: Any) -> Any:
        if _worker is None:
            return fn(*args, **kwargs)
        _worker.send(fn, args, kwargs)
        return None

    return send


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling; else a TrackingError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001  any exception object may refuse
        return TrackingError(f"{type(err).__name__}: {err}")
    return err


def _warm_up(stage: str) -> None:
    """What the stage will need, loaded while it does its first work: MLflow, an embedded store that
    exists already (none is created here, and a server is not asked anything yet), and for the
    stages that log a model what logging one needs (not Keras: the model is logged without an input
    example, which MLflow would load it to check). Failures wait for the call that needs it."""
    with contextlib.suppress(Exception):
        import mlflow

        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        store = sqlite_path(uri)
        if store is not None and store.is_file():
            with store_lock():
                mlflow.get_experiment_by_name(experiment_name())
        if stage in ("train_top", "evaluate", "ensemble"):  # they log a model
            import mlflow.pyfunc
            from mlflow.utils import requirements_utils

            requirements_utils._init_modules_to_packages_map()  # reads every installed package's metadata


def serve(stage: str) -> None:
    """The worker's loop: run the calls the stage sends on stdin, answer each on stdout."""
    import importlib
    import signal

    # Ctrl-C reaches the whole process group: the stage handles it and tells the worker to end its
    # run as failed (or, gone, leaves it at the end of its input).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner.configure_logging()
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
    for stage_name, end_failed in list(_UNFINISHED.items()):  # the stage stopped without closing its run
        log.warning("the %s stage stopped before its MLflow run was complete: marking it failed", stage_name)
        try:
            end_failed()
        except Exception as err:  # noqa: BLE001  the worker's last words
            log.warning("could not mark it failed at %s: %s", tracking_uri(), err)
    # Everything is written and committed: skip the interpreter's teardown of MLflow (most of a second).
    sys.stderr.flush()
    os._exit(0)
