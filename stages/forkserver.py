"""A fork server for the stages' MLflow workers: MLflow imported once per `dvc repro`, not per stage.

Every stage that logs starts a worker process (`python -m stages.tracking serve <stage>`, see
stages/tracking.py), and a worker's first seconds go to importing MLflow and its store's code. A
fork server imports them once and forks each worker from itself: the worker starts with them in
memory, in the stage's folder, with the stage's environment and the stage's pipes as its standard
input, output and error, as if the stage had started it.

`start(argv, env)` is `subprocess.Popen` for the stage: it asks the server to fork `python -m
<module> <args>` (`argv` without the interpreter), and starts the server first when none runs.
There is one server per user, Python and version of the code (the stages' files and MLflow's), on
a unix socket in a private folder; it leaves after `IDLE` seconds without a request
(PIPELINE_FORKSERVER_IDLE; 0 turns the server off: each worker then starts as a plain process).
Whatever goes wrong with the server, the worker starts as a plain process: the server only saves time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import IO, Any

#: What a worker needs that takes seconds to import: forking copies it in memory.
PRELOAD = ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "stages.tracking")
#: Seconds the server waits for a request before it leaves.
IDLE = 120.0
IDLE_VARIABLE = "PIPELINE_FORKSERVER_IDLE"
#: How long a stage waits for a server it started to be ready before starting its worker plainly.
READY_TIMEOUT = 30.0


def idle_seconds() -> float:
    try:
        return float(os.environ.get(IDLE_VARIABLE, IDLE))
    except ValueError:
        return IDLE


def address() -> Path:
    """The server's socket for this user, Python, and version of the stages' and MLflow's code:
    changing either starts a new server (the old one leaves when idle)."""
    package = Path(__file__).resolve().parent
    stamp: list[Any] = [sys.executable, sys.version, str(package)]
    for path in sorted(package.glob("*.py")):
        info = path.stat()
        stamp.append((path.name, info.st_mtime_ns, info.st_size))
    spec = importlib.util.find_spec("mlflow")
    if spec and spec.origin:
        stamp.append(Path(spec.origin).stat().st_mtime_ns)
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"stages-forkserver-{os.getuid()}" / f"{key}.sock"


def _private_folder(path: Path) -> None:
    """The socket's folder, readable by this user alone."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private folder of this user")


class Forked:
    """A worker the server forked, with what `subprocess.Popen` offers that the stage uses: its pipes,
    `poll`, `wait` and `kill`. It is the server's child, not the stage's: its end is seen as the end
    of its output (it closes it when it exits)."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None

    def _alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the pid was reused by another user's process
            return False
        return True

    def poll(self) -> int | None:
        if self.returncode is None and not self._alive():
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Until the worker has closed its output (at its exit) and is gone."""
        assert self.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.stdout.fileno()
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired("forked worker", timeout or 0.0)
            if not os.read(fd, 65536):
                break
        while self._alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)  # between closing its files at exit and being reaped
        self.returncode = 0 if self.returncode is None else self.returncode
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)
        self.returncode = -signal.SIGKILL


def start(argv: list[str], env: dict[str, str]) -> Forked | subprocess.Popen:
    """`python <argv>` (`-m module args...`) with `env`, pipes on its standard input and output and
    this process's standard error: forked by the server, or else started plainly."""
    if idle_seconds() > 0 and argv[:1] == ["-m"]:
        try:
            return _fork(argv, env)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def _fork(argv: list[str], env: dict[str, str]) -> Forked:
    where = address()
    _private_folder(where.parent)
    conn = _connect(where)
    calls_read, calls_write = os.pipe()
    answers_read, answers_write = os.pipe()
    try:
        request = {"module": argv[1], "argv": argv[1:], "cwd": os.getcwd(), "env": env}
        with conn:
            socket.send_fds(conn, [json.dumps(request).encode()], [calls_read, answers_write, sys.stderr.fileno()])
            conn.settimeout(READY_TIMEOUT)
            reply = conn.recv(64)
        pid = int(json.loads(reply)["pid"])
    except (OSError, ValueError, KeyError):
        os.close(calls_write)
        os.close(answers_read)
        raise
    finally:
        os.close(calls_read)
        os.close(answers_write)
    return Forked(pid, os.fdopen(calls_write, "wb"), os.fdopen(answers_read, "rb"))


def _connect(where: Path) -> socket.socket:
    """A connection to the server at `where`, started first when none answers there."""
    deadline = time.monotonic() + READY_TIMEOUT
    started = False
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(where))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        if not started:
            _spawn(where)
            started = True
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired("fork server", READY_TIMEOUT)
        time.sleep(0.02)


def _spawn(where: Path) -> None:
    """Start a server at `where` in a session of its own, attached to no terminal or pipe of ours
    (so nothing waits for it), unless one is starting already (it holds the lock)."""
    with open(where.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a server is starting (or serving): wait for its socket
        fcntl.flock(lock, fcntl.LOCK_UN)
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    subprocess.Popen(
        [sys.executable, "-m", "stages.forkserver", str(where)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,
        close_fds=True,
    )


def serve(where: Path) -> None:
    """The server: preload, then fork a worker per request until idle for `idle_seconds()`."""
    lock = open(where.with_suffix(".lock"), "a")  # noqa: SIM115  held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server got there first
    for module in PRELOAD:
        importlib.import_module(module)
    where.unlink(missing_ok=True)  # a server killed before it could clean up
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(where))
    listener.listen(16)
    listener.settimeout(idle_seconds())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the workers are reaped as they end
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                break
            with conn:
                _fork_worker(conn, listener, lock)
    finally:
        where.unlink(missing_ok=True)
        listener.close()


def _fork_worker(conn: socket.socket, listener: socket.socket, lock: IO[str]) -> None:
    conn.settimeout(READY_TIMEOUT)
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    try:
        request = json.loads(message)
        pid = os.fork()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if pid == 0:  # the worker
        listener.close()
        lock.close()  # the server's lock is the server's alone
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        code = 0
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [request["module"], *request["argv"][1:]]
            with warnings.catch_warnings():  # that it runs a module the server imported: the point
                warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else 1
        except BaseException:  # noqa: BLE001  the worker's last words go to the stage's stderr
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
