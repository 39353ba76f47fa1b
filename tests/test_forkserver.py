"""The fork server of the stages' MLflow workers (stages/forkserver.py): one server for the stages of
a `dvc repro`, each worker in its stage's folder and environment, a new server for new code, none
left behind once idle, and plain processes when it is off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stages import forkserver, tracking
from stages.demo import ROOT


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_the_workers_of_two_stages_are_forked_by_one_server_in_their_folder_and_environment(tmp_path, monkeypatch):
    workers = []
    for stage in ("download", "prepare"):
        folder = tmp_path / stage
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.setenv("WHICH_STAGE", stage)
        worker = tracking._Worker(stage)
        try:
            assert worker.call(os.getcwd, (), {}) == str(folder)
            assert worker.call(os.getenv, ("WHICH_STAGE",), {}) == stage
            assert worker.call(os.getenv, (tracking.STAGE_PID,), {}) == str(os.getpid())
            workers.append((worker.process.pid, worker.call(os.getppid, (), {})))
        finally:
            worker.called = True  # ends at the end of its input, as after a stage's run
            worker.close()
    (first, server), (second, same_server) = workers
    assert isinstance(worker.process, forkserver.Forked)
    assert first != second and server == same_server != os.getpid(), "both forked by the one server"
    assert gone(first, 5) and gone(second, 5), "a worker ends with its stage"


def test_new_code_gets_a_new_server_and_an_idle_server_leaves(tmp_path):
    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), forkserver.IDLE_VARIABLE: "5"}

    def python(code: str) -> str:
        """What `code` prints, run with the copy of the stages."""
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout.strip()

    def address() -> str:
        return python("from stages import forkserver; print(forkserver.address())")

    before = address()
    assert address() == before
    os.utime(copy / "config.py", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert address() != before, "an edited stage module is served by a new server"

    worker = "import os\nfrom stages import tracking\nprint(tracking._Worker('download').call(os.getppid, (), {}))"
    server = python(worker)
    socket = Path(address())
    assert socket.exists()
    assert gone(int(server), 20), "five idle seconds and it left"
    assert not socket.exists()


def test_off_the_worker_is_a_plain_process_of_the_stage(monkeypatch):
    monkeypatch.setenv(forkserver.IDLE_VARIABLE, "0")
    worker = tracking._Worker("download")
    try:
        assert isinstance(worker.process, subprocess.Popen)
        assert worker.call(os.getppid, (), {}) == os.getpid()
    finally:
        worker.called = True
        worker.close()
