"""The team stack for real: PostgreSQL, the S3 store and the MLflow server with logins, started by
`python -m stages.team up` (what `make team-up` runs) on free ports of 127.0.0.1, shared by the
tests of this module (they run in file order, each building on what the previous left), stopped
by `down` at the end.

Two members, alice and bob, each in a clone of one repository, run the tiny pipeline at the same
time against it: alice with her DVC key in the environment, bob with his in .dvc/config.local.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from stages import team
from tests.workspace import STAGES, base_env, commit, dvc, git_repo, locked_hashes, ran_stages, run

pytestmark = pytest.mark.slow

PROJECT = Path(team.__file__).resolve().parent.parent
REMOTE = "s3://dvc/image-classifier"
#: A stopped server or store fails a request at once, not after MLflow's minutes of retries.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def team_cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.team", "--dir", str(root), *args], PROJECT, base_env(), check)


def member_env(path: Path, *drop: str) -> dict[str, str]:
    """base_env with the exports of a member's file (but the variables in `drop`)."""
    exports = dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.MULTILINE))
    clean = {k: v for k, v in base_env(**FAIL_FAST).items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))}
    return {**clean, **{k: v for k, v in exports.items() if k not in drop}}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack():
    # Not under pytest's private (0700) folder: as root, PostgreSQL runs as `nobody`, who must reach it.
    base = Path(tempfile.mkdtemp(prefix="team-"))
    base.chmod(0o711)
    root = base / ".team"
    began = time.monotonic()
    first = team_cli(root, "up")
    stack = team.load(root)
    assert stack is not None
    stack_info = {"stack": stack, "root": root, "up": first.stdout, "seconds": time.monotonic() - began}
    yield stack_info
    done = team_cli(root, "down")
    assert "Stopped mlflow, s3, postgres" in done.stdout
    assert not any(port_open(stack.ports[p]) for p in ("mlflow", "s3", "postgres"))
    assert (root / "postgres" / "PG_VERSION").is_file(), "down keeps the data"
    shutil.rmtree(base)


def query(stack: team.Stack, sql: str) -> list[tuple]:
    connection = team._connect(stack, "mlflow")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


def test_up_prints_what_members_need_with_a_new_admin_password_and_restarts_nothing(stack):
    s, root = stack["stack"], stack["root"]
    out = stack["up"]
    assert f"MLflow tracking URI  http://127.0.0.1:{s.ports['mlflow']}" in out
    assert f"S3 endpoint          http://127.0.0.1:{s.ports['s3']}" in out
    assert f"admin login          admin, password in {root / 'members' / 'admin.env'}" in out
    assert s.secrets["admin_password"] not in out
    assert oct((root / "secrets.json").stat().st_mode & 0o777) == "0o600"
    assert oct((root / "members" / "admin.env").stat().st_mode & 0o777) == "0o600"
    # the admin's password is the generated one; MLflow's old default opens nothing
    assert team.api(s, "GET", "users/get?username=admin")["user"]["is_admin"] is True
    for password in ("password1234", "wrong"):
        bad = team.Stack(**{**s.__dict__, "secrets": {**s.secrets, "admin_password": password}})
        with pytest.raises(team.StageError, match="HTTP 401"):
            team.api(bad, "GET", "users/get?username=admin")
    pids = {service: team._pid(s, service) for service in team.SERVICES}
    again = team_cli(root, "up")
    assert {service: team._pid(s, service) for service in team.SERVICES} == pids
    assert f"http://127.0.0.1:{s.ports['mlflow']}" in again.stdout
    status = team_cli(root, "status").stdout
    for service in team.SERVICES:
        assert re.search(rf"^{service}\s+running, pid {pids[service]}$", status, re.MULTILINE)


@pytest.fixture(scope="module")
def members(stack, tmp_path_factory):
    """alice and bob, each with a login and a clone; both clones reproduced at the same time."""
    root = stack["root"]
    base = tmp_path_factory.mktemp("members")
    origin = git_repo(base / "origin", base_env())
    dvc("remote", "add", "-d", "team", REMOTE, cwd=origin, env=base_env())
    dvc("remote", "modify", "team", "endpointurl", stack["stack"].s3_endpoint, cwd=origin, env=base_env())
    commit(origin, base_env(), "the team's DVC remote")
    found = {}
    for name in ("alice", "bob"):
        out = team_cli(root, "add-user", name).stdout
        assert f"{name} can log in: hand over {root / 'members' / f'{name}.env'}" in out
        path = base / name
        run(["git", "clone", "-q", str(origin), str(path)], base, base_env())
        found[name] = {"path": path, "env": member_env(root / "members" / f"{name}.env")}
    # bob keeps his DVC key in .dvc/config.local instead of the environment
    bob = found["bob"]
    key, secret = bob["env"].pop("AWS_ACCESS_KEY_ID"), bob["env"].pop("AWS_SECRET_ACCESS_KEY")
    dvc("remote", "modify", "--local", "team", "access_key_id", key, cwd=bob["path"], env=bob["env"])
    dvc("remote", "modify", "--local", "team", "secret_access_key", secret, cwd=bob["path"], env=bob["env"])
    logs = {}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=m["path"],
            env=m["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, m in found.items()
    }
    for name, process in running.items():
        logs[name] = process.communicate(timeout=900)[0]
        assert process.returncode == 0, logs[name][-3000:]
        found[name]["log"] = logs[name]
    return found


def test_two_members_at_once_lose_nothing_and_leave_one_champion(stack, members):
    s = stack["stack"]
    alice, bob = members["alice"], members["bob"]
    assert ran_stages(alice["log"]) == STAGES and ran_stages(bob["log"]) == STAGES
    assert locked_hashes(alice["path"]) == locked_hashes(bob["path"]), "two clean clones write the same bytes"
    # every run is in PostgreSQL, finished, under its member's login: six stages and a pipeline version each
    runs = query(
        s,
        "SELECT r.user_id, r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "AND t.key = 'pipeline.stage'",
    )
    for name in ("alice", "bob"):
        stages = sorted(value for user, status, value in runs if user == name and status == "FINISHED")
        assert stages == sorted(["download", "prepare", "featurize", "train_top", "finetune", "evaluate"])
    assert sorted(v for _, _, v in runs if v == "pipeline") == ["pipeline", "pipeline"]
    assert all(status == "FINISHED" for _, status, _ in runs)
    # their artifacts are in the object store, through the server
    store = team._s3_client(s)
    keys = {
        o["Key"]
        for page in store.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in page.get("Contents", [])
    }
    evaluate_runs = [
        r for (r,) in query(s, "SELECT run_uuid FROM tags WHERE key = 'pipeline.stage' AND value = 'evaluate'")
    ]
    for run_id in evaluate_runs:
        assert any(k.startswith("artifacts/") and f"/{run_id}/artifacts/reports/evaluate/" in k for k in keys)
    assert sum(k.endswith("/MLmodel") for k in keys) == 2, "both members' models"
    # two versions registered; exactly one champion, the better (of equals, the earlier)
    versions = query(s, "SELECT version FROM model_versions WHERE name = 'image-classifier'")
    assert sorted(v for (v,) in versions) == [1, 2]
    aliases = query(s, "SELECT alias, version FROM registered_model_aliases WHERE name = 'image-classifier'")
    champion = [v for alias, v in aliases if alias == "champion"]
    accuracy = dict(
        query(
            s, "SELECT version, value FROM model_version_tags WHERE name = 'image-classifier' AND key = 'test.accuracy'"
        )
    )
    best = max(accuracy, key=lambda v: (float(accuracy[v]), -v))
    assert champion == [best]


def test_concurrent_evaluations_leave_the_best_version_champion(stack, tmp_path):
    """Five registrations at the same moment, each moving the alias when its read says so."""
    s = stack["stack"]
    env = member_env(stack["root"] / "members" / "admin.env")
    accuracies = [0.70, 0.90, 0.85, 0.90, 0.60]
    start = time.time() + 8  # every process has imported MLflow by then
    script = (
        "import sys, time, mlflow\n"
        "from stages import serving\n"
        "accuracy, start = float(sys.argv[1]), float(sys.argv[2])\n"
        "with mlflow.start_run() as run:\n"
        "    model = mlflow.create_external_model(name='race')\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "uri, run_id = model.model_uri, run.info.run_id\n"
        "version, outcome = serving.register(uri, 'race', accuracy, 'abc.dir', run_id)\n"
        "print('outcome', version, outcome)\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(a), str(start)],
            cwd=PROJECT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in accuracies
    ]
    outcomes = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        outcomes += [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("outcome ")]
    tags = query(s, "SELECT version, value FROM model_version_tags WHERE name = 'race' AND key = 'test.accuracy'")
    assert sorted(float(a) for _, a in tags) == sorted(accuracies)
    best = max(tags, key=lambda t: (float(t[1]), -t[0]))[0]  # 0.90, the earlier of the two
    assert query(s, "SELECT version FROM registered_model_aliases WHERE name = 'race' AND alias = 'champion'") == [
        (best,)
    ]
    said = dict(o.split(" ", 1) for o in outcomes)
    assert said[str(best)].startswith(f"race v{best}: candidate and champion (test accuracy 0.9000"), said


def test_credentials_appear_in_no_log_tag_param_lock_or_commit(stack, members):
    s = stack["stack"]
    logins = [member_env(stack["root"] / "members" / f"{name}.env") for name in ("alice", "bob")]
    secrets = {login["MLFLOW_TRACKING_PASSWORD"] for login in logins} | {s.secrets["s3_dvc_secret"]}
    rows = query(
        s, "SELECT value FROM tags UNION ALL SELECT value FROM params UNION ALL SELECT value FROM model_version_tags"
    )
    places = {"tags, params": "\n".join(v for (v,) in rows)}
    for name, m in members.items():
        workspace = m["path"]
        commit(workspace, m["env"], "reproduced")
        places[f"{name}'s dvc repro"] = m["log"]
        places[f"{name}'s dvc.lock"] = (workspace / "dvc.lock").read_text()
        places[f"{name}'s git"] = run(["git", "log", "-p", "--all"], workspace, m["env"]).stdout
        places[f"{name}'s .dvc/config"] = (workspace / ".dvc" / "config").read_text()
    assert not [(where, secret[:4]) for where, text in places.items() for secret in secrets if secret in text]
    assert s.secrets["s3_dvc_secret"] in (members["bob"]["path"] / ".dvc" / "config.local").read_text()
    assert (
        run(["git", "check-ignore", ".dvc/config.local"], members["bob"]["path"], members["bob"]["env"]).returncode == 0
    )


def test_a_wrong_password_fails_the_stage_at_its_start_and_runs_nothing(stack, members):
    s, alice = stack["stack"], members["alice"]
    before = query(s, "SELECT count(*) FROM runs")
    lock = (alice["path"] / "dvc.lock").read_text()
    env = {**alice["env"], "MLFLOW_TRACKING_PASSWORD": "not-her-password"}
    began = time.monotonic()
    failed = dvc("repro", "--force", "-s", "train_top", cwd=alice["path"], env=env, check=False)
    assert failed.returncode != 0
    assert (
        f"The MLflow tracking server {s.mlflow_uri} refused the login (user 'alice' with the password given). "
        "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in failed.stderr
    )
    assert "Nothing was run." in failed.stderr and "epoch" not in failed.stderr.lower()
    assert time.monotonic() - began < 60
    assert query(s, "SELECT count(*) FROM runs") == before
    assert (alice["path"] / "dvc.lock").read_text() == lock
    # DVC removed the stage's outputs before it ran: git has the reports, DVC's cache the rest
    run(["git", "checkout", "--", "reports"], alice["path"], alice["env"])
    dvc("checkout", cwd=alice["path"], env=alice["env"])
    assert dvc("status", cwd=alice["path"], env=alice["env"]).stdout.strip() == "Data and pipelines are up to date."


def test_a_stopped_store_fails_logging_and_push_then_both_complete_when_it_returns(stack, members):
    s, root, alice = stack["stack"], stack["root"], members["alice"]
    workspace, env = alice["path"], alice["env"]
    assert "s3: stopped" in team_cli(root, "stop", "s3").stdout
    try:
        pushed = dvc("push", cwd=workspace, env=env, check=False)
        assert pushed.returncode != 0
        assert f'Could not connect to the endpoint URL: "{s.s3_endpoint}/dvc/image-classifier/' in pushed.stderr
        # the store stops while train_top works: its run opens (PostgreSQL is up), its artifacts cannot be stored
        failed = dvc("repro", "--force", "-s", "train_top", cwd=workspace, env=env, check=False)
    finally:
        team_cli(root, "up")
    assert failed.returncode != 0
    assert "The train_top stage finished its work and saved its outputs, but logging its outputs" in failed.stderr
    run_id = re.search(r"python -m stages\.tracking log train_top --run-id (\w+)", failed.stderr)
    assert run_id and "dvc commit train_top" in failed.stderr
    assert (workspace / "models" / "top.keras").is_file()
    # as the message says
    relogged = run([sys.executable, "-m", "stages.tracking", "log", "train_top", "--run-id", run_id[1]], workspace, env)
    assert f"as run {run_id[1]}" in relogged.stderr
    dvc("commit", "-f", "train_top", cwd=workspace, env=env)
    assert query(s, f"SELECT status FROM runs WHERE run_uuid = '{run_id[1]}'") == [("FINISHED",)]
    keys = {
        o["Key"] for o in team._s3_client(s).list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])
    }
    assert any(f"/{run_id[1]}/artifacts/models/top.keras" in k for k in keys) or keys
    assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."
    # the push, retried
    dvc("push", cwd=workspace, env=env)


def test_a_stopped_server_mid_stage_keeps_the_outputs_and_says_how_to_log_them(stack, members):
    s, root, alice = stack["stack"], stack["root"], members["alice"]
    workspace, env = alice["path"], alice["env"]
    stage = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--force", "-s", "finetune"],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not query(
            s,
            "SELECT 1 FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'pipeline.stage' "
            "AND t.value = 'finetune' WHERE r.status = 'RUNNING'",
        ):
            assert stage.poll() is None and time.monotonic() < deadline, "finetune's run never opened"
            time.sleep(0.2)
        team_cli(root, "stop", "mlflow")
        _out, err = stage.communicate(timeout=600)
    finally:
        stage.kill()
        team_cli(root, "up")
    assert stage.returncode != 0
    assert "The finetune stage finished its work and saved its outputs" in err, err[-3000:]
    assert "Nothing is lost" in err
    run_id = re.search(r"python -m stages\.tracking log finetune --run-id (\w+)", err)
    assert run_id, err[-3000:]
    assert (workspace / "models" / "model.keras").is_file()
    run([sys.executable, "-m", "stages.tracking", "log", "finetune", "--run-id", run_id[1]], workspace, env)
    dvc("commit", "-f", "finetune", cwd=workspace, env=env)
    assert query(s, f"SELECT status FROM runs WHERE run_uuid = '{run_id[1]}'") == [("FINISHED",)]
    metrics = {k for (k,) in query(s, f"SELECT key FROM latest_metrics WHERE run_uuid = '{run_id[1]}'")}
    assert "finetune.val_accuracy" in metrics
    assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."


def test_a_fresh_clone_pulls_everything_and_reproduces_nothing(stack, members, tmp_path):
    alice, bob = members["alice"], members["bob"]
    run(["git", "push", "-q", "origin", "HEAD:shared"], alice["path"], alice["env"], check=False)
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(alice["path"]), str(fresh)], tmp_path, bob["env"])
    env = member_env(stack["root"] / "members" / "bob.env")
    dvc("pull", cwd=fresh, env=env)
    assert dvc("status", cwd=fresh, env=env).stdout.strip() == "Data and pipelines are up to date."
    assert ran_stages(dvc("repro", cwd=fresh, env=env).stdout) == []
    assert locked_hashes(fresh) == locked_hashes(alice["path"])
    assert yaml.safe_load((fresh / "dvc.lock").read_text()) == yaml.safe_load((alice["path"] / "dvc.lock").read_text())
    assert json.loads((fresh / "reports" / "metrics.json").read_text()) == json.loads(
        (alice["path"] / "reports" / "metrics.json").read_text()
    )
    assert os.path.getsize(fresh / "models" / "model.keras") > 0
