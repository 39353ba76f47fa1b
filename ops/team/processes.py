"""The stack's processes: started in a clean environment, their pids, waiting until ready, and
whether a port is free."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from classifier.errors import StageError
from ops.team.state import DIR_VARIABLE, Stack

#: Seconds a service has to stop after SIGTERM, before SIGKILL. SeaweedFS stores its data within
#: two seconds, then may wait on a retry loop of its own.
GRACE = {"mlflow": 20, "s3": 5}


READY_TIMEOUT = float(os.environ.get("TEAM_READY_TIMEOUT", "180"))


def venv_tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise StageError(f"`{name}` is not installed: run `make install` (it installs the team stack's packages)")
    return found


def service_pid(stack: Stack, service: str) -> int | None:
    """The pid of `service` when it runs from this stack's folder."""
    if service == "postgres":
        pidfile = stack.path("postgres", "postmaster.pid")
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            return pid if _alive(pid, str(stack.path("postgres"))) else None
        return None
    with contextlib.suppress(OSError, ValueError):
        pid = int(stack.path(f"{service}.pid").read_text())
        return pid if _alive(pid, str(stack.root)) else None
    return None


def _alive(pid: int, mark: str) -> bool:
    """Whether `pid` runs and its command line or environment names `mark` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return mark in cmdline or mark in environ


#: What the services are given of the operator's environment: nothing else of it (logins, keys, tokens)
#: reaches a process that another user (PostgreSQL's, as root) could read it from.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


def service_env(**extra: str) -> dict[str, str]:
    """A service's whole environment: PASSED_ENV and `extra`."""
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ} | extra


def spawn_service(stack: Stack, service: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start `service` detached (its own session), its output appended to logs/<service>.log."""
    logs = stack.path("logs")
    logs.mkdir(exist_ok=True)
    with open(logs / f"{service}.log", "ab") as out:
        process = subprocess.Popen(
            args, cwd=stack.root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    stack.path(f"{service}.pid").write_text(f"{process.pid}\n")
    return process


def wait_until_ready(ready, stack: Stack, service: str, process: subprocess.Popen | None = None) -> None:
    """Wait for `ready()` to be true; fail naming the log if `process` ends or READY_TIMEOUT passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        if process is not None and process.poll() is not None:
            why = f"it stopped (exit {process.returncode})"
            break
        if time.monotonic() > deadline:
            why = f"it was not ready after {READY_TIMEOUT:.0f} s"
            break
        time.sleep(0.25)
    log_file = stack.path("logs", f"{service}.log")
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) if log_file.is_file() else ""
    raise StageError(f"The team's {service} did not start: {why}. The end of {log_file}:\n{tail}")


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise StageError(
                f"port {port} is taken by another program: stop it, or move {DIR_VARIABLE} to a new folder "
                "to start a stack on other ports"
            )


def group_alive(pgid: int) -> bool:
    """Whether a thread of process group `pgid` still runs. A zombie does not count (its parent may never
    reap it), but a zombie leader does not make the group dead either: while a process exits, its main
    thread turns zombie before the others have ended and let go of its sockets."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap it when we started it
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state not in ("Z", "X"):
                return True
    return False
