"""What every stage shares: one clear line for an interruption or a full disk, nothing unfinished kept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from classifier import saving
from classifier.config import SyntheticParams
from classifier.data import synthetic
from ops import runner
from ops.code import ROOT


def test_ctrl_c_is_one_line_and_keeps_nothing_unfinished(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/stages/prepare.py"])

    def main():
        with saving.atomic_dir(tmp_path / "prepared") as tmp:
            (tmp / "half.jpg").write_bytes(b"x")
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        runner.run(main)
    assert stopped.value.code == 130
    assert capsys.readouterr().err == (
        "prepare: interrupted (Ctrl-C); nothing unfinished was kept: run it again to redo it\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_with_one_line_and_cleans_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/stages/featurize.py"])
    previous = signal.getsignal(signal.SIGTERM)

    def main():
        with saving.atomic_path(tmp_path / "model.keras") as tmp:
            tmp.write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives first

    try:
        with pytest.raises(SystemExit) as stopped:
            runner.run(main)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143
    assert capsys.readouterr().err.startswith("featurize: stopped (SIGTERM); nothing unfinished was kept")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_named_as_such(capsys):
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "data/prepared/x.jpg")

    with pytest.raises(SystemExit) as stopped:
        runner.run(main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: no space left on the disk writing data/prepared/x.jpg. Free some space (`df -h` shows where)"
    )


def test_what_an_interrupted_run_left_is_removed_by_the_next_and_ignored_by_git(tmp_path):
    (tmp_path / ".tmp-prepared.abc123").mkdir()
    (tmp_path / ".tmp-prepared.abc123" / "x.jpg").write_bytes(b"x")
    (tmp_path / ".tmp-model.keras.xyz.keras").write_bytes(b"x")
    (tmp_path / ".tmp-other.json.q.json").write_bytes(b"someone else's")
    with saving.atomic_dir(tmp_path / "prepared") as tmp:
        (tmp / "done.jpg").write_bytes(b"y")
    saving.write_json(tmp_path / "model.keras", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other.json.q.json", "model.keras", "prepared"]
    left = ["data/.tmp-prepared.abc123/x.jpg", "models/.tmp-top.keras.a.keras"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *left], cwd=ROOT, capture_output=True, check=False)
    assert ignored.stdout.decode().split() == left


@pytest.mark.slow
def test_ctrl_c_during_prepare_prints_one_line_not_a_traceback_per_worker(tmp_path):
    raw = tmp_path / "raw"
    synthetic.generate(raw, SyntheticParams(classes=2, images_per_class=400, size=256), seed=0)
    (tmp_path / "params.yaml").write_text("data:\n  split: {train: 0.5, validation: 0.25, test: 0.25}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TRACKING": "off"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.prepare", "raw", "prepared", "data.json"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert process.stderr is not None
    seen = ""
    while "decoding:" not in seen and process.poll() is None:  # the workers are busy
        seen += process.stderr.read(1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert (
        rest.strip().splitlines()[-1]
        == "prepare: interrupted (Ctrl-C); nothing unfinished was kept: run it again to redo it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


def test_a_file_the_user_may_not_read_is_one_line_naming_it(capsys):
    """As another user than the file's owner (root reads everything, so the error is raised here)."""

    def main():
        raise PermissionError(errno.EACCES, "Permission denied", "models/classes.json")

    with pytest.raises(SystemExit) as stopped:
        runner.run(main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: permission denied on models/classes.json: Permission denied. Give your user access to it "
        "(`ls -l` shows its owner and mode), or run as the user who owns it.\n"
    )
