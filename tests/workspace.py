"""Running the real pipeline in tests: a git repository with the tiny config, `dvc` and `git` in it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from ops import demo
from tests.conftest import TINY

#: The stages of the tiny pipeline (TINY: baseline, ensemble and export switched off), in the order
#: `dvc repro` runs them.
STAGES = [
    "download",
    "prepare",
    "featurize",
    "train_top",
    "finetune",
    "evaluate",
    "baseline",
    "ensemble",
    "audit",
    "export",
    "compare",
]
#: Those that log a run of their own (compare logs the pipeline version; a stage switched off, nothing).
LOGGED = [*STAGES[:6], "audit"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Return once a GET of `url` answers 200; fail the test, with the end of the server's `log`,
    if `process` stops first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the server at {url} stopped: " + log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f} s: " + log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


def without_tensorflow(folder: Path) -> str:
    """A folder for PYTHONPATH, made in `folder`, in which `import tensorflow` fails, as on a machine
    without it (the GPU machine's)."""
    blocked = folder / "no-tensorflow" / "tensorflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here')\n")
    return str(blocked.parent)


def base_env(**extra: str) -> dict:
    return demo.pipeline_env(**GIT_ENV, **extra)


def run(args: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`args` run to its end, within `timeout` seconds: past it the test fails with the end of its output."""
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        out, errors = (
            text.decode(errors="replace") if isinstance(text, bytes) else text or ""
            for text in (err.stdout, err.stderr)
        )
        pytest.fail(f"{args} did not end within {timeout:.0f} s:\n{out[-3000:]}\n{errors[-3000:]}")
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def dvc(*args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, env, check)


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` or `dvc exp run` ran (not skipped, not restored), in order."""
    return re.findall(r"Running stage '([\w@]+)'", output)


def restored_stages(output: str) -> list[str]:
    """The stages DVC restored from its run-cache instead of running them, in order."""
    return re.findall(r"Stage '([\w@]+)' is cached - skipping run", output)


def dvc_repro(workspace: Path, env: dict, *args: str) -> list[str]:
    """Run `dvc repro`; return the stages it ran, in order."""
    return ran_stages(dvc("repro", *args, cwd=workspace, env=env).stdout)


class Repro(NamedTuple):
    """A program (`dvc repro`: `start_repro`) running in the background, its output going to `log`."""

    process: subprocess.Popen
    log: Path


def start_background(args: list[str], cwd: Path, env: dict, log: Path) -> Repro:
    """`args` started in `cwd`, its output (both streams) going to `log` (a pipe nobody reads yet would
    fill and stop it); `finish_repro` waits for it."""
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Repro(process, log)


def start_repro(workspace: Path, env: dict) -> Repro:
    """`dvc repro` started in `workspace` (`start_background`), its output in a file beside it."""
    return start_background(
        [sys.executable, "-m", "dvc", "repro"], workspace, env, workspace.parent / f"{workspace.name}.repro.log"
    )


def finish_repro(repro: Repro, timeout: float = 600) -> str:
    """The output of a `start_background`, once it has succeeded; past `timeout` seconds, it is stopped
    and the test fails with the end of its log."""
    try:
        repro.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        repro.process.kill()
        repro.process.wait()
        pytest.fail(f"{repro.process.args} did not end within {timeout:.0f} s:\n{repro.log.read_text()[-3000:]}")
    output = repro.log.read_text()
    assert repro.process.returncode == 0, output[-3000:]
    return output


def set_param(workspace: Path, section: str, key: str, value) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def git_repo(path: Path, env: dict) -> Path:
    """The tiny pipeline in a new git repository at `path`, committed, nothing run yet."""
    workspace = demo.make_workspace(path, TINY, git=True)
    commit(workspace, env, "pipeline")
    return workspace


def commit(workspace: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], workspace, env)
    run(["git", "commit", "-qm", message], workspace, env)


def locked_hashes(workspace: Path) -> dict[str, str]:
    """{output path: md5} of every stage output in the workspace's dvc.lock."""
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for spec in lock.values() for out in spec["outs"]}


#: The line a script run by `released_together` waits at: everything before it is done in every process first.
WAIT_FOR_RELEASE = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"


def released_together(scripts: list[str], cwd: Path, env: dict, timeout: float = 120) -> list[str]:
    """Run each Python script in its own process, hold each at its WAIT_FOR_RELEASE until all are
    there, then release them at one instant; the stdout of each (after 'ready'), once all succeeded."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in scripts
    ]
    # Past `timeout`, every process is stopped: a reading below then ends, and the test fails.
    deadline = threading.Timer(timeout, lambda: [p.kill() for p in processes])
    deadline.start()
    try:
        for process in processes:  # each has done its setup (imports, a run opened...)
            assert process.stdout is not None and process.stderr is not None
            before = []  # what it printed first (MLflow prints a link to each run it ends)
            while (line := process.stdout.readline()) not in ("ready\n", ""):
                before.append(line)
            if not line:
                for other in processes:
                    other.kill()
                pytest.fail(f"a process never got ready: {''.join(before)[-2000:]}\n{process.stderr.read()[-3000:]}")
        deadline.cancel()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err[-3000:]
            outputs.append(out)
        return outputs
    finally:
        deadline.cancel()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def queue_workers(workspace: Path) -> list[int]:
    """The pids of the DVC queue workers (`dvc exp queue-worker`) started in `workspace`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            where = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"queue-worker" in command and where.is_relative_to(workspace):
            pids.append(int(entry.name))
    return pids


def stop_queue(workspace: Path, env: dict) -> None:
    """Stop the queue's workers as the README tells a user to, then end any left behind."""
    run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], workspace, env, check=False, timeout=60)
    # A worker may still be starting when the queue stops, or take a moment to die: until none is left.
    deadline = time.monotonic() + 30
    while (left := queue_workers(workspace)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
