"""MLflow tracking: runs hold what dvc.yaml declares, failures are fast and lose no work, sqlite is shared safely."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from classifier import config
from ops import tracking
from ops.code import ROOT
from ops.tracking import lineage, locations, runs, store, worker
from ops.tracking.metrics import history_rows
from tests.workspace import GIT_ENV

PIPELINE = {
    "stages": {
        "train_top": {
            "cmd": "python -m stages.train_top",
            "deps": ["data/features", "stages/train_top.py"],
            "params": ["seed", "top"],
            "outs": [
                "models/top.keras",
                "reports/train_top/history.csv",
            ],
            "metrics": [{"reports/train_top/metrics.json": {"cache": False}}],
        }
    }
}
LOCK = {
    "schema": "2.0",
    "stages": {
        "featurize": {"outs": [{"path": "data/features", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"}]}
    },
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a one-stage dvc.yaml and a dvc.lock, tracking to sqlite inside it."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    (tmp_path / "data" / "features").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def save_outputs(root: Path) -> None:
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "top.keras").write_bytes(b"model")
    (root / "reports" / "train_top").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "train_top" / "history.csv").write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy\n1,0.9,0.5,1.0,0.4\n2,0.5,0.75,0.6,0.8\n"
    )
    (root / "reports" / "train_top" / "metrics.json").write_text(
        json.dumps({"top": {"val_accuracy": 0.8, "loss": 0.5}})
    )


def record_train_top(root: Path) -> None:
    """Record in dvc.lock what train_top wrote, as DVC does after the stage."""
    lock = copy.deepcopy(LOCK)
    outs = [
        {"path": p, "hash": "md5", "md5": tracking.dvc_hash(root / p)} for p in PIPELINE["stages"]["train_top"]["outs"]
    ]
    lock["stages"]["train_top"] = {"outs": outs}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_stage_run_logs_what_dvc_yaml_declares_and_writes_no_file(project):
    import mlflow

    params = config.parse({"top": {"units": 32}})
    with tracking.stage_run("train_top", params) as run_id:
        save_outputs(project)
    assert not (project / "reports" / "runs").exists()
    logged = mlflow.MlflowClient().get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "train_top"
    assert logged.data.params["top.units"] == "32" and "data.source" not in logged.data.params
    assert logged.data.metrics == {"top.val_accuracy": 0.8, "top.loss": 0.5}
    assert logged.data.tags["pipeline.stage"] == "train_top"
    experiment = mlflow.get_experiment(logged.info.experiment_id)
    assert experiment.artifact_location == (project / "mlartifacts").as_uri(), "beside the store, not the cwd"
    assert logged.data.tags["dvc.in.data/features"] == "0123456789abcdef0123456789abcdef.dir"
    (dataset,) = logged.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("data/features", "0123456789abcdef0123456789abcdef.dir")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reports/train_top")}
    assert artifacts == {"reports/train_top/history.csv", "reports/train_top/metrics.json"}
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "models")] == ["models/top.keras"]
    # the DVC hashes of what it wrote, and the one query that finds the run from them
    assert logged.data.tags["dvc.out.models/top.keras"] == hashlib.md5(b"model").hexdigest()
    assert logged.data.tags["dvc.out.reports/train_top/metrics.json"] == tracking.dvc_hash(
        project / "reports/train_top/metrics.json"
    )
    found = tracking.runs_that_wrote({"models/top.keras": hashlib.md5(b"model").hexdigest()})
    assert [r.info.run_id for r in found] == [run_id]
    assert tracking.runs_that_wrote({"models/top.keras": "0" * 32}) == []


def test_dvc_hash_is_the_hash_dvc_records(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = tmp_path / "out"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "a.txt").write_text("text\n")
    (folder / "sub" / "b.csv").write_bytes(b"x,y\r\n1,2\r\n")  # DVC 3 hashes bytes as they are
    (folder / "sub" / "deeper" / "c.bin").write_bytes(bytes(range(256)) * 5000)
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    for path in (folder, folder / "sub" / "b.csv"):
        _, _, obj = build(odb, str(path), fs, "md5")
        assert tracking.dvc_hash(path) == obj.hash_info.value


def test_a_failing_stage_ends_its_run_failed(project):
    import mlflow

    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("train_top", config.parse({})) as run_id:
        raise RuntimeError("boom")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"


def test_logging_failure_after_the_work_keeps_outputs_and_says_how_to_log_them(project, monkeypatch):
    import mlflow

    def unavailable(*args, **kwargs):
        raise ConnectionError("tracking store went away")

    with monkeypatch.context() as patched:
        patched.setattr(mlflow, "log_metrics", unavailable)
        stage = tracking.stage_run("train_top", config.parse({}))
        with pytest.raises(tracking.TrackingError) as err, stage as run_id:
            save_outputs(project)
    message = str(err.value)
    assert "finished its work and saved its outputs" in message and "tracking store went away" in message
    assert f"python -m ops.tracking log train_top --run-id {run_id}" in message
    assert "dvc commit train_top" in message
    assert (project / "models/top.keras").read_bytes() == b"model", "the work is kept"

    # ... and that command logs them, into the same run, with the per-epoch history
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (project / "params.yaml").write_text("seed: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "ops.tracking", "log", "train_top", "--run-id", run_id],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert f"as run {run_id}" in done.stderr
    latest = {}
    for m in sorted(client.get_metric_history(run_id, "top.val_accuracy"), key=lambda m: m.timestamp):
        latest[m.step] = m.value
    assert latest == {1: 0.4, 2: 0.8}, "the per-epoch history, from history.csv, at the steps of its epochs"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_historys_steps_are_its_epochs_counted_from_1_within_the_stage(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_accuracy,stage\n1,0.9,0.4,top\n2,0.5,0.8,top\n")
    assert history_rows(path) == [(1, {"loss": 0.9, "val_accuracy": 0.4}), (2, {"loss": 0.5, "val_accuracy": 0.8})]
    path.write_text("epoch,loss\n3,0.9\n4,0.5\n")
    assert [step for step, _ in history_rows(path)] == [3, 4], "the epoch column, not the row"
    path.write_text("loss\n0.9\n0.5\n")
    assert history_rows(path) == [(1, {"loss": 0.9}), (2, {"loss": 0.5})], "no epoch column: the row, from 1"
    path.write_text("epoch,loss\n")
    assert history_rows(path) == []


def test_the_epoch_logger_logs_keras_epoch_k_at_step_k_plus_1_as_history_csv_counts_it(project):
    """Keras numbers epochs from 0; the live curve, history.csv and metrics.json from 1."""
    import keras
    import mlflow
    import numpy as np

    x, y = np.zeros((4, 2)), np.zeros((4, 1))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with tracking.stage_run("train_top", config.parse({})) as run_id:
        model.fit(x, y, epochs=2, verbose=0, validation_data=(x, y), callbacks=[tracking.epoch_logger("top.")])
        save_outputs(project)  # a history.csv of two epochs
    client = mlflow.MlflowClient()
    for name in ("top.loss", "top.val_loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2], name
    assert [step for step, _ in history_rows(project / "reports/train_top/history.csv")] == [1, 2]


def test_unreachable_server_fails_in_seconds_naming_it(project, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    worked = []
    started = time.monotonic()
    stage = tracking.stage_run("train_top", config.parse({}))
    with pytest.raises(tracking.TrackingError, match=f"The MLflow tracking server {uri} is not reachable"), stage:
        worked.append(True)
    assert time.monotonic() - started < 5 and not worked


def test_a_refused_login_or_a_password_in_the_uri_fails_before_any_work(project, monkeypatch):
    import http.server
    import threading

    seen = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    home = project / "home"
    monkeypatch.setenv("HOME", str(home))  # no ~/.mlflow/credentials at first
    worked = []
    try:
        for user, password, who in (
            ("", "", "no user name and password"),
            ("ann", "pw", "user 'ann' with the password given"),
            ("", "", "user 'bob' with the password given"),  # from ~/.mlflow/credentials, as MLflow reads it
        ):
            if "bob" in who:
                (home / ".mlflow").mkdir(parents=True, exist_ok=True)
                (home / ".mlflow" / "credentials").write_text(
                    "[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = pw\n"
                )
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            refused = f"The MLflow tracking server {uri} refused the login ({who}). Set MLFLOW_TRACKING_USERNAME"
            with (
                pytest.raises(tracking.TrackingError, match=re.escape(refused)),
                tracking.stage_run("train_top", config.parse({})),
            ):
                worked.append(True)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [None, "Basic YW5uOnB3", "Basic Ym9iOnB3"] and not worked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:secret@127.0.0.1:1")
    with pytest.raises(tracking.TrackingError, match="MLFLOW_TRACKING_URI holds a password") as refused:
        tracking.check_server()
    assert "secret" not in str(refused.value)


def test_default_store_is_in_the_project_even_from_a_queued_experiment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"


def _log_many(args: tuple[str, int]) -> int:
    uri, worker = args
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    for i in range(3):
        with tracking.store_lock():
            mlflow.set_experiment("parallel")
            mlflow.start_run(run_name=f"w{worker}-{i}")
        for step in range(5):
            tracking.log_metrics({"x": step}, step=step)
        with tracking.store_lock():
            mlflow.end_run()
    return worker


def test_parallel_writers_share_the_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert sorted(pool.map(_log_many, [(uri, w) for w in range(3)])) == [0, 1, 2]
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert len(runs) == 9 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "x")) == 5 for r in runs)


def test_tracking_off_runs_the_work_and_logs_nothing(project, monkeypatch):
    monkeypatch.setenv("PIPELINE_TRACKING", "off")
    with tracking.stage_run("train_top", config.parse({})) as run_id:
        save_outputs(project)
    assert run_id is None
    assert not (project / "mlflow.db").exists() and not (project / "reports" / "runs").exists()


def test_champion_is_only_compared_on_the_same_test_set(tmp_path):
    import mlflow

    from ops.serving import registry

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient(tracking.tracking_uri())
    source = (tmp_path / "model").as_uri()

    def new_version(accuracy: float, test_set: str | None, log_loss: float | None = None) -> str:
        return registry.register(source, "clf", accuracy, test_set, run_id="r", log_loss=log_loss)[1]

    def champion() -> str:
        return str(client.get_model_version_by_alias("clf", "champion").version)

    assert new_version(0.80, "aaa.dir") == "clf v1: candidate and champion (test accuracy 0.8000, the first champion)"
    assert "does not beat champion v1's test accuracy 0.8000" in new_version(0.75, "aaa.dir") and champion() == "1"
    assert "beats v1's test accuracy 0.8000" in new_version(0.90, "aaa.dir") and champion() == "3"
    # a higher accuracy on another test set is not comparable: the champion stays, and says why
    outcome = new_version(0.99, "bbb.dir")
    assert "candidate only" in outcome and "test set bbb.dir" in outcome
    assert "v3 was scored on test set aaa.dir" in outcome
    assert champion() == "3"
    assert str(client.get_model_version_by_alias("clf", "candidate").version) == "4"
    assert client.get_model_version("clf", "4").tags[registry.TEST_SET] == "bbb.dir"
    assert "candidate only" in new_version(0.99, None) and champion() == "3", "an unknown test set is not compared"
    assert client.get_registered_model("clf").description == registry.REGISTERED_MODEL_DESCRIPTION


def test_a_tie_in_test_accuracy_goes_to_the_lower_log_loss_and_else_stays_with_the_earlier(tmp_path):
    import mlflow

    from ops.serving import registry

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient(tracking.tracking_uri())
    source = (tmp_path / "model").as_uri()

    def new_version(accuracy: float, log_loss: float | None) -> str:
        return registry.register(source, "tie", accuracy, "aaa.dir", run_id="r", log_loss=log_loss)[1]

    def champion() -> str:
        return str(client.get_model_version_by_alias("tie", "champion").version)

    new_version(0.9, 0.30)
    outcome = new_version(0.9, 0.20)
    assert champion() == "2", outcome
    assert "(test accuracy 0.9000, log loss 0.2000 beats v1's test accuracy 0.9000, log loss 0.3000)" in outcome
    assert "does not beat champion v2" in new_version(0.9, 0.20) and champion() == "2", "of equals, the earlier"
    assert "does not beat" in new_version(0.9, None) and champion() == "2", "an unknown log loss ranks after"
    assert client.get_model_version("tie", "2").tags["test.log_loss"] == "0.2"


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True)


def test_a_version_is_named_by_its_commit_and_what_it_changed_and_spans_its_stages(project, monkeypatch):
    import mlflow

    (project / "params.yaml").write_text("top:\n  units: 32\n")
    git("init", "-q", cwd=project)
    git("add", "params.yaml", cwd=project)
    git("commit", "-qm", "params", cwd=project)
    commit = tracking.git_commit()[0][:7]
    params = config.parse({"top": {"units": 64, "dropout": 0.25}})
    with tracking.stage_run("train_top", params) as run_id:
        save_outputs(project)
    assert tracking.version_name(params) == f"{commit} top.units=64 top.dropout=0.25"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-4b2c1")
    assert tracking.version_name(config.parse({"top": {"units": 32}})) == "exp-4b2c1"

    # DVC records what train_top wrote; the last stage, which has no run, then logs the version
    record_train_top(project)
    version_id = tracking.log_pipeline_version(params, stage="compare")
    client = mlflow.MlflowClient()
    version = client.get_run(version_id)
    assert version.info.run_name == "exp-4b2c1 top.units=64 top.dropout=0.25"
    assert version.info.start_time == client.get_run(run_id).info.start_time, "spans its stages' work"
    assert version.data.tags["run.train_top"] == run_id
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == version_id
    # the per-epoch curves of the training stage, named after it, on the version's row
    curve = sorted((m.step, m.value) for m in client.get_metric_history(version_id, "top.val_accuracy"))
    assert curve == [(1, 0.4), (2, 0.8)], "at the steps of history.csv's epochs"
    assert version.data.params["top.units"] == "64"


def test_versions_are_ranked_and_one_is_compared_with_the_version_its_committed_dvc_lock_records(project, caplog):
    import mlflow

    from ops.tracking import views

    def version(units: int, log_loss: float) -> str:
        params = config.parse({"top": {"units": units}})
        with tracking.stage_run("train_top", params):
            save_outputs(project)
            (project / "models" / "top.keras").write_bytes(f"model {units}".encode())
            scores = {"top": {"val_accuracy": 0.8}, "test": {"accuracy": 0.9, "log_loss": log_loss}}
            (project / "reports" / "train_top" / "metrics.json").write_text(json.dumps(scores))
        record_train_top(project)
        return tracking.log_pipeline_version(params, stage="compare")

    (project / "params.yaml").write_text("top:\n  units: 32\n")
    git("init", "-q", cwd=project)
    first = version(32, log_loss=0.3)
    git("add", "params.yaml", "dvc.lock", cwd=project)
    git("commit", "-qm", "the first version", cwd=project)
    with caplog.at_level("INFO"):
        second = version(64, log_loss=0.2)  # as accurate, surer: it ranks first
    client = mlflow.MlflowClient()
    name = client.get_run(first).info.run_name
    assert [client.get_run(v).data.metrics["rank"] for v in (first, second)] == [2, 1]
    assert client.get_run(second).data.tags["pipeline.outputs"] != client.get_run(first).data.tags["pipeline.outputs"]
    printed = re.search(rf"compared with the version it came from, {re.escape(name)}: (\S+)", caplog.text)
    assert printed, caplog.text
    assert printed.group(1).endswith(f"?viewStateShareKey={second}&workflowType=machine_learning")
    experiment = client.get_experiment_by_name(tracking.experiment_name())
    view = views.decode(experiment.tags[views.SHARE_TAG + second])
    found = client.search_runs([experiment.experiment_id], view["searchFilter"], order_by=["metrics.`rank` ASC"])
    assert [run.info.run_id for run in found] == [second, first]
    assert "params.`top.units`" in view["selectedColumns"]
    assert "every version, best first: http://127.0.0.1:5000/#/experiments/" in caplog.text
    mlflow_ui = Path(sys.executable).parent / "mlflow"
    assert f"start the MLflow UI first: {mlflow_ui} ui --backend-store-uri {tracking.tracking_uri()}\n" in caplog.text


def test_a_failed_stage_stands_under_a_failed_row_of_its_attempt(project):
    import mlflow

    params = config.parse({"top": {"units": 8}})
    with tracking.stage_run("train_top", params):
        save_outputs(project)  # a first stage of the attempt that worked
    with pytest.raises(RuntimeError, match="bad data"), tracking.stage_run("train_top", params) as failed:
        raise RuntimeError("bad data")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("image-classifier")
    (row,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'pipeline'")
    assert row.info.status == "FAILED" and row.info.run_name == "pipeline (failed at train_top)"
    assert row.data.tags["pipeline.failed_stage"] == "train_top" and row.data.params["top.units"] == "8"
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'train_top'")
    assert len(runs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {row.info.run_id}, "the attempt's runs nest under it"
    assert client.get_run(failed).info.status == "FAILED"


def test_the_experiment_opens_as_model_training_in_the_ui(project):
    import mlflow

    with tracking.stage_run("train_top", config.parse({})):
        save_outputs(project)
    experiment = mlflow.MlflowClient().get_experiment_by_name("image-classifier")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


STAGE_WITH_WORKER = """
import os, sys, time
from pathlib import Path
from classifier import config
from ops import tracking
from ops.tracking import worker
tracking.start_worker("train_top")  # as `python -m stages.train_top` does once its params are read
params = config.parse({"top": {"units": 8}})
with tracking.stage_run("train_top", params):
    tracking.log_metrics({"top.loss": 0.5}, step=0)
    run_id = worker.in_worker(tracking.active_run_id)()  # the run its worker opened
    print(run_id, os.getpid(), worker._worker.process.pid, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), 9)
    if sys.argv[1] == "killpg":  # the stage and its worker at once: nothing is left to end the run
        os.killpg(0, 9)
    if sys.argv[1] == "ctrl-c":  # to the whole process group, as a terminal sends it
        os.killpg(0, 2)
        time.sleep(5)
    Path("models").mkdir()
    Path("models/top.keras").write_bytes(b"model")
"""


def run_stage_with_worker(end: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", STAGE_WITH_WORKER, end],
        start_new_session=True,  # a process group of its own, for Ctrl-C
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # a stage's process
@pytest.mark.parametrize("end", ["done", "kill", "ctrl-c"])
def test_a_stage_logs_through_its_worker_which_ends_a_killed_stage_run_failed(project, end):
    import mlflow

    done = run_stage_with_worker(end)
    run_id, stage_pid, worker_pid = done.stdout.split()
    assert worker_pid != stage_pid
    client = mlflow.MlflowClient(tracking.tracking_uri())
    if end == "done":
        assert done.returncode == 0, done.stderr
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["top.units"] == "8"
        assert run.data.tags["dvc.out.models/top.keras"] == hashlib.md5(b"model").hexdigest()
        assert run.data.tags["pipeline.attempt"].startswith(f"{stage_pid}."), "the stage's process, not the worker's"
        assert [m.value for m in client.get_metric_history(run_id, "top.loss")] == [0.5]
        return
    assert done.returncode == (-9 if end == "kill" else -2)  # -2: Python ends itself by the SIGINT it got
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_run(run_id).info.status == "FAILED"
    experiment = client.get_experiment_by_name("image-classifier")
    (row,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'pipeline'")
    assert row.info.run_name == "pipeline (failed at train_top)"


@pytest.mark.slow  # a stage's process
def test_a_run_whose_stage_and_worker_were_killed_together_is_ended_failed_by_the_next_run(project):
    import mlflow

    killed = run_stage_with_worker("killpg")
    assert killed.returncode == -9
    run_id, stage_pid, _ = killed.stdout.split()
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING", "nothing was left to end it"
    assert run.data.tags["pipeline.process"].startswith(f"{socket.gethostname()}:{stage_pid}.")

    done = run_stage_with_worker("done")
    assert done.returncode == 0, done.stderr
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["pipeline.ended"]) == ("FAILED", runs.ORPHANED)
    assert client.get_run(done.stdout.split()[0]).info.status == "FINISHED"


def test_a_run_whose_process_still_runs_is_left_running():
    """The process tag of this test's own process (alive), of another start of the same process id,
    of another machine, and of a machine without /proc: only the second is gone."""
    own = lineage.process()
    host, ident = own.rsplit(":", 1)
    pid, start = ident.split(".")
    assert not lineage.process_gone(own)
    assert lineage.process_gone(f"{host}:{pid}.{int(start) + 1}")
    assert not lineage.process_gone(f"another-machine:{pid}.{int(start) + 1}")
    assert not lineage.process_gone(f"{host}:{pid}.?")


def test_a_foreach_stage_is_read_as_the_stages_dvc_makes_of_it(tmp_path, monkeypatch):
    """ensemble_features is one stage per item of a params.yaml list: its runs, params and outputs
    are those of `ensemble_features@<item>`."""
    pipeline = {
        "stages": {
            "members": {
                "foreach": "${ensemble.backbones}",
                "do": {
                    "cmd": "python -m stages.ensemble_features ${item} data/prepared data/ensemble/${item}",
                    "deps": ["data/prepared"],
                    "params": ["ensemble.image_size"],
                    "outs": ["data/ensemble/${item}"],
                },
            },
            "listed": {"foreach": ["a", "b"], "do": {"cmd": "echo ${item}", "outs": ["out/${item}"]}},
        }
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (tmp_path / "params.yaml").write_text("ensemble:\n  backbones: [resnet50, xception]\n")
    monkeypatch.chdir(tmp_path)
    assert list(lineage.dvc_stages()) == ["members@resnet50", "members@xception", "listed@a", "listed@b"]
    assert tracking.stage_outputs("members@xception") == ["data/ensemble/xception"]
    assert tracking.data_deps("members@resnet50") == ["data/prepared"]
    assert tracking.stage_param_keys("members@resnet50") == ["ensemble.image_size"]
    assert tracking.stage_outputs("listed@b") == ["out/b"]


def test_switched_off_stages_link_no_run_and_a_failed_model_log_says_to_run_the_stage_again():
    assert tracking.switched_off(config.parse({"baseline": {"enabled": False}, "ensemble": {"backbones": []}})) == {
        "baseline",
        "ensemble",
    }
    assert tracking.switched_off(config.parse({})) == set()
    err = tracking.logging_failed("ensemble", "logging the model", RuntimeError("gone"))
    assert "log everything, the model included, with\n    dvc repro --force ensemble\n" in str(err)
    assert "(it trains the head again, in seconds, on the cached features)" in str(err)
    err = tracking.logging_failed("compare", "logging the pipeline version", RuntimeError("gone"))
    assert "log everything with\n    dvc repro --force compare\n(it reads the metrics files again)" in str(err)


def test_a_write_refused_for_a_row_another_writer_inserted_meanwhile_is_sent_again(monkeypatch):
    """What PostgreSQL answers the loser of two concurrent inserts of one dataset: sent again, it
    finds the row; any other refusal is raised at once, and a conflict that never ends after the
    last attempt."""
    import mlflow

    monkeypatch.setattr(store.time, "sleep", lambda seconds: None)
    refused = (
        'BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"'
    )
    calls = []

    def log_input(name, context):
        calls.append((name, context))
        if len(calls) < 3:
            raise mlflow.exceptions.MlflowException(refused)
        return "logged"

    assert tracking.retry_conflicts(log_input, "data/features", context="train_top") == "logged"
    assert calls == [("data/features", "train_top")] * 3

    def other():
        calls.append("other")
        raise mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    calls.clear()
    with pytest.raises(mlflow.exceptions.MlflowException, match="no such run"):
        tracking.retry_conflicts(other)
    assert calls == ["other"]

    def always():
        calls.append("always")
        raise mlflow.exceptions.MlflowException(refused)

    calls.clear()
    with pytest.raises(mlflow.exceptions.MlflowException, match="dataset_pk"):
        tracking.retry_conflicts(always)
    assert len(calls) == tracking.CONFLICT_ATTEMPTS


def test_the_worker_is_a_child_of_its_stage_in_its_folder_and_environment(tmp_path, monkeypatch):
    """Its calls come over the two pipes between the stage and its own child: nothing under a shared
    folder that another user could reach."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WHICH_STAGE", "prepare")
    child = worker._Worker("prepare")
    try:
        assert child.call(os.getppid, (), {}) == os.getpid()
        assert child.call(os.getcwd, (), {}) == str(tmp_path)
        assert child.call(os.getenv, ("WHICH_STAGE",), {}) == "prepare"
        assert child.call(os.getenv, (tracking.STAGE_PID,), {}) == str(os.getpid())
    finally:
        child.called = True  # ends at the end of its input, as after a stage's run
        child.close()
    assert child.process.returncode == 0


def stage_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow  # a stage's process
def test_help_and_argument_errors_start_no_logging_and_make_no_store(tmp_path):
    helped = stage_command(["stages.prepare", "--help"], tmp_path)
    assert helped.returncode == 0 and "usage:" in helped.stdout
    wrong = stage_command(["stages.compare", "reports/models.csv", "--no-such-option"], tmp_path)
    assert wrong.returncode == 2 and "the following arguments are required: metrics" in wrong.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no store, no lock, nothing half-made"


#: Makes the store of MLFLOW_TRACKING_URI and is stopped dead (no clean-up) `argv[1]` seconds into it.
CUT_SHORT = """
import os, signal, sys
import mlflow.store.tracking.sqlalchemy_store  # imported before the clock starts
from ops import tracking
signal.signal(signal.SIGALRM, lambda *_: os._exit(9))
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
tracking.store_uri()
os._exit(0)
"""


def test_a_new_store_is_made_whole_or_not_at_all(project):
    """A first use of the store stopped dead at several points of its creation leaves either no
    store or a whole one: the stage after it works and loses no run."""
    import sqlite3

    import mlflow

    store = project / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ends, halves = [], []
    for cut in (0.01, 0.2, 0.5, 0.8, 1.1):
        done = subprocess.run(
            [sys.executable, "-c", CUT_SHORT, str(cut)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode in (0, 9), done.stderr
        ends.append(done.returncode)
        halves.append(len(list(project.glob(".tmp-mlflow.db.*"))))
        if store.exists():  # whole: every migration recorded
            with contextlib.closing(sqlite3.connect(store)) as db:
                assert len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
            store.unlink()  # cut the next creation short from the start again
    assert ends.count(9) >= 3 and any(halves), (ends, halves)  # cut short before, during, after the tables
    params = config.parse({"top": {"units": 8}})
    with tracking.stage_run("train_top", params) as run_id:
        save_outputs(project)
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert not list(project.glob(".tmp-*")), "what the creations cut short left is cleared"


def test_two_first_stages_at_one_instant_share_one_new_store(project):
    import mlflow

    from tests.workspace import WAIT_FOR_RELEASE, released_together

    script = (
        "from classifier import config\nfrom ops.tracking import runs\n"
        + WAIT_FOR_RELEASE
        + "run = runs._begin('train_top', config.parse({}), {'first': 'yes'})\n"
        "runs._end_run()\n"
        "print('run', run)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = released_together([script, script], project, env)
    runs = [line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("run ")]
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert [client.get_run(r).info.status for r in runs] == ["FINISHED", "FINISHED"]


def test_the_version_is_logged_to_a_store_that_has_no_experiment_yet(project, caplog):
    """Every stage restored by DVC (`dvc pull` on a new team server), then `dvc repro --force compare`
    as the README says to log the version afterwards: the experiment is made then, as a stage's run
    would have made it."""
    import mlflow

    params = config.parse({"top": {"units": 32}})
    with caplog.at_level("WARNING", logger="ops.tracking.runs"):
        version_id = tracking.log_pipeline_version(params, stage="compare")
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name("image-classifier")
    assert client.get_run(version_id).info.experiment_id == experiment.experiment_id
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (project / "mlartifacts").as_uri()
    assert "no run in" in caplog.text, "train_top ran nowhere it logs: said, and not linked"


class Echo:
    """The smallest python model: what it is given."""

    def predict(self, context, model_input, params=None):
        return model_input


def _store_with_a_run(folder: Path) -> tuple[str, str]:
    """A store in `folder` made as a stage makes it: the experiment, a run with an artifact file, a
    logged model registered as version 1 of "echo". Returns the run's id and the model's id."""
    import mlflow
    import mlflow.pyfunc

    client = mlflow.MlflowClient(store.store_uri())
    mlflow.set_tracking_uri(store.tracking_uri())
    mlflow.set_experiment(experiment_id=store.ensure_experiment(client).experiment_id)
    (folder / "note.txt").write_text("made in A")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(folder / "note.txt"), "notes")
        model = mlflow.pyfunc.log_model(
            name="echo",
            python_model=type("EchoModel", (Echo, mlflow.pyfunc.PythonModel), {})(),
            registered_model_name="echo",
            pip_requirements=[],
        )
    (folder / "note.txt").unlink()
    return run.info.run_id, model.model_id


@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_copied_or_moved_store_finds_and_writes_its_own_artifacts(tmp_path, monkeypatch, caplog, how):
    import shutil
    import sqlite3

    import mlflow

    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{a / 'mlflow.db'}")
    run_id, model_id = _store_with_a_run(a)
    if how == "copied":
        shutil.copytree(a, b)
        (a / "mlartifacts" / run_id / "artifacts" / "notes" / "note.txt").write_text("the original's")
    else:
        shutil.move(a, b)
    before = sorted(p.relative_to(a) for p in a.rglob("*")) if a.exists() else []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{b / 'mlflow.db'}")
    mlflow.set_tracking_uri(store.tracking_uri())
    with caplog.at_level("INFO", logger="ops.tracking"):
        store.store_uri()
    assert "now point at" in caplog.text and str(b / "mlartifacts") in caplog.text
    own = (b / "mlartifacts").as_uri()
    client = mlflow.MlflowClient(store.tracking_uri())
    assert client.get_experiment_by_name("image-classifier").artifact_location == own
    assert client.get_run(run_id).info.artifact_uri == f"{own}/{run_id}/artifacts"
    assert client.get_logged_model(model_id).artifact_location.startswith(f"{own}/")
    version = client.get_model_version("echo", "1")
    assert version.source == f"models:/{model_id}"
    with contextlib.closing(sqlite3.connect(b / "mlflow.db")) as db:
        storage = db.execute("SELECT storage_location FROM model_versions").fetchone()[0]
        everywhere = [
            row[0]
            for table, column, _ in locations.LOCATIONS
            for row in db.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" LIKE ?', (f"%{a}%",))
        ]
    assert storage.startswith(f"{own}/") and not everywhere
    note = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="notes/note.txt", dst_path=str(tmp_path))
    assert Path(note).read_text() == "made in A"
    assert mlflow.pyfunc.load_model("models:/echo/1").predict({"x": [1]}) == {"x": [1]}

    (b / "new.txt").write_text("made in B")
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("image-classifier").experiment_id) as new:
        mlflow.log_artifact(str(b / "new.txt"))
    assert (b / "mlartifacts" / new.info.run_id / "artifacts" / "new.txt").read_text() == "made in B"
    assert (sorted(p.relative_to(a) for p in a.rglob("*")) if a.exists() else []) == before, "A is left alone"
    assert a.exists() == (how == "copied")

    caplog.clear()
    with caplog.at_level("INFO", logger="ops.tracking"):
        store.store_uri()
        assert locations.relocate(b / "mlflow.db") is False
    assert not caplog.text, "once done, nothing more to do"


@pytest.mark.parametrize(
    ("table", "location"),
    [
        ("experiments", "s3://bucket/x"),
        ("experiments", "mlflow-artifacts://otherhost:5000/7"),
        ("experiments", "file:///data/mine"),
        ("experiments", "/data/mlartifacts-old"),
        ("experiments", "mlruns/0"),
        ("experiments", "file://otherhost{own}"),
        ("experiments", "{own}/../../elsewhere"),
        ("model_versions", "file:///home/someone/model"),
    ],
)
def test_a_store_with_artifacts_outside_its_folder_is_refused_in_one_line(project, table, location):
    """Whatever the place (a bucket, a server, another folder, another machine, `..`), reading or
    writing through it is refused before anything is; the store's own folder, by any name, is not."""
    import sqlite3

    import mlflow

    own = project / "mlartifacts"
    client = mlflow.MlflowClient(store.store_uri())
    experiment = store.ensure_experiment(client).experiment_id
    client.create_registered_model("echo")
    client.create_model_version(
        "echo", source=f"{own.as_uri()}/model", run_id=client.create_run(experiment).info.run_id
    )
    link = project.parent / f"{project.name}-link"
    link.symlink_to(project)
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as db:  # as `mlflow ui` creates it
        db.execute("UPDATE experiments SET artifact_location = 'mlflow-artifacts:/0' WHERE experiment_id = 0")
        db.commit()
    for place in (project, link):
        locations.check(place / "mlflow.db")  # its own locations, as a file URI and a path, under either name

    column = {"experiments": "artifact_location", "model_versions": "storage_location"}[table]
    hostile = location.format(own=own)
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as db:
        db.execute(f'UPDATE "{table}" SET "{column}" = ?', (hostile,))
        db.commit()
    with pytest.raises(locations.ForeignStore) as refused:
        locations.check(project / "mlflow.db")
    assert str(refused.value).startswith(
        f"The MLflow store {project / 'mlflow.db'} keeps artifacts outside {project} ({table}.{column} {hostile!r}): "
        "reading or writing them would reach a place this project did not make."
    )
    assert str(refused.value).endswith("Nothing was run.") and "\n" not in str(refused.value)


def test_locations_that_are_no_mlartifacts_folder_are_left_alone(project, monkeypatch, caplog):
    """A server's, a bucket's, one's own folder: a copied store keeps them, and moves only mlartifacts/."""
    import shutil
    import sqlite3

    import mlflow

    client = mlflow.MlflowClient(store.store_uri())
    ours = store.ensure_experiment(client).experiment_id
    plain = client.create_experiment("plain", artifact_location=f"{project}/mlartifacts/plain")
    theirs = {"s3://bucket/x", "mlflow-artifacts:/7", "file:///data/mine", "/data/mlartifacts-old"}
    for n, location in enumerate(sorted(theirs)):
        client.create_run(client.create_experiment(f"other{n}", artifact_location=location))
    with contextlib.closing(sqlite3.connect(project / "mlflow.db")) as db:
        db.execute("UPDATE experiments SET artifact_location = 'file:///elsewhere/mlruns/0' WHERE experiment_id = 0")
        db.commit()
    caplog.clear()
    with caplog.at_level("INFO", logger="ops.tracking"):
        assert locations.relocate(project / "mlflow.db") is False
    assert not caplog.text, "at its own place: nothing to do"

    copy = project.parent / "copy"
    shutil.copytree(project, copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    assert locations.relocate(copy / "mlflow.db") is True
    with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as db:
        experiments = dict(db.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall())
        runs = {row[0] for row in db.execute("SELECT artifact_uri FROM runs")}
    assert experiments.pop(int(ours)) == (copy / "mlartifacts").as_uri()
    assert experiments.pop(int(plain)) == f"{copy}/mlartifacts/plain", "a plain path too"
    assert set(experiments.values()) == theirs | {"file:///elsewhere/mlruns/0"}
    assert {uri.rsplit("/", 2)[0] for uri in runs} == theirs


def test_the_store_lock_is_taken_again_at_once_by_the_thread_that_holds_it(project):
    import threading

    order = []

    def take() -> None:
        with store.store_lock():
            order.append("other")

    with store.store_lock():
        with store.store_lock():  # a second flock of the same file would wait for itself
            order.append("inner")
        other = threading.Thread(target=take)
        other.start()
        other.join(timeout=1)
        assert other.is_alive(), "another thread waits for the lock"
        order.append("released")
    other.join(timeout=10)
    assert order == ["inner", "released", "other"]
