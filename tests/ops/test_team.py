"""The team stack for real: PostgreSQL, the S3 store and the MLflow server with logins, with two
members who ran the tiny pipeline against it at the same time (tests/teamstack.py: `team_stack`,
`team_members`). The tests run in file order, each building on what the previous left in alice's
clone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from classifier.errors import StageError
from classifier.metrics import ranking
from ops.team import postgres, processes, services, state
from tests.teamstack import OPERATOR_SECRETS, PROJECT, member_env, query, team_cli
from tests.workspace import STAGES, WAIT_FOR_RELEASE, dvc, locked_hashes, ran_stages, released_together, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("team"),
]  # one worker: the team stack and its members, shared with tests/e2e/test_caching.py


def test_up_prints_what_members_need_with_a_new_admin_password_and_restarts_nothing(team_stack):
    s, root = team_stack["stack"], team_stack["root"]
    out = team_stack["up"]
    assert f"MLflow tracking URI  http://127.0.0.1:{s.ports['mlflow']}" in out
    assert f"S3 endpoint          http://127.0.0.1:{s.ports['s3']}" in out
    assert f"admin login          admin, password in {root / 'members' / 'admin.env'}" in out
    assert s.secrets["admin_password"] not in out
    assert oct((root / "secrets.json").stat().st_mode & 0o777) == "0o600"
    assert oct((root / "members" / "admin.env").stat().st_mode & 0o777) == "0o600"
    assert oct((root / "s3").stat().st_mode & 0o777) == "0o700", "the store's files are the stack user's alone"
    # the admin's password is the generated one; MLflow's old default opens nothing
    assert services.api(s, "GET", "users/get?username=admin")["user"]["is_admin"] is True
    for password in ("password1234", "wrong"):
        bad = state.Stack(**{**s.__dict__, "secrets": {**s.secrets, "admin_password": password}})
        with pytest.raises(StageError, match="HTTP 401"):
            services.api(bad, "GET", "users/get?username=admin")
    pids = {service: processes.service_pid(s, service) for service in state.SERVICES}
    again = team_cli(root, "up")
    assert {service: processes.service_pid(s, service) for service in state.SERVICES} == pids
    assert f"http://127.0.0.1:{s.ports['mlflow']}" in again.stdout
    status = team_cli(root, "status").stdout
    for service in state.SERVICES:
        assert re.search(rf"^{service}\s+running, pid {pids[service]}$", status, re.MULTILINE)


def test_two_members_at_once_lose_nothing_and_leave_one_champion(team_members):
    alice, bob, then = team_members["alice"], team_members["bob"], team_members["snapshot"]
    assert ran_stages(alice["log"]) == STAGES and ran_stages(bob["log"]) == STAGES
    assert then["hashes"]["alice"] == then["hashes"]["bob"], "two clean clones write the same bytes"
    # every run is in PostgreSQL, finished, under its member's login: seven stages and a pipeline version each
    for name in ("alice", "bob"):
        stages = sorted(value for user, status, value in then["runs"] if user == name and status == "FINISHED")
        assert stages == sorted(["download", "prepare", "featurize", "train_top", "finetune", "evaluate", "audit"])
    assert [v for _, _, v in then["runs"] if v == "pipeline"] == ["pipeline", "pipeline"]
    assert all(status == "FINISHED" for _, status, _ in then["runs"])
    # their artifacts are in the object store, through the server
    assert len(then["evaluate_runs"]) == 2
    for run_id in then["evaluate_runs"]:
        assert any(k.startswith("artifacts/") and f"/{run_id}/artifacts/reports/evaluate/" in k for k in then["keys"])
    assert sum(k.endswith("/MLmodel") for k in then["keys"]) == 4, "both members' two models"
    # four versions registered (each member's frozen-backbone and fine-tuned models); exactly one
    # champion, the best by the ranking rule (test accuracy, then log loss; of equals, the earliest)
    assert sorted(then["versions"]) == [1, 2, 3, 4]
    accuracy, log_loss = then["accuracy"], then["log_loss"]
    assert then["champion"] == [min(accuracy, key=lambda v: (*ranking.sort_key(accuracy[v], log_loss.get(v)), v))]


def test_concurrent_evaluations_leave_the_best_version_champion(team_stack):
    """Five registrations at the same moment, each moving the alias when its read says so."""
    s = team_stack["stack"]
    env = member_env(team_stack["root"] / "members" / "admin.env")
    accuracies = [0.70, 0.90, 0.85, 0.90, 0.60]
    script = (
        "import mlflow\n"
        "from ops.serving import registry\n"
        "with mlflow.start_run() as run:\n"
        "    model = mlflow.create_external_model(name='race')\n"
        + WAIT_FOR_RELEASE
        + "version, outcome = registry.register(model.model_uri, 'race', {accuracy}, 'abc.dir', run.info.run_id)\n"
        "print('outcome', version, outcome)\n"
    )
    outputs = released_together([script.format(accuracy=a) for a in accuracies], PROJECT, env)
    outcomes = [line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("outcome ")]
    tags = query(s, "SELECT version, value FROM model_version_tags WHERE name = 'race' AND key = 'test.accuracy'")
    assert sorted(float(a) for _, a in tags) == sorted(accuracies)
    best = max(tags, key=lambda t: (float(t[1]), -t[0]))[0]  # 0.90, the earlier of the two
    assert query(s, "SELECT version FROM registered_model_aliases WHERE name = 'race' AND alias = 'champion'") == [
        (best,)
    ]
    said = dict(o.split(" ", 1) for o in outcomes)
    assert said[str(best)].startswith(f"race v{best}: candidate and champion (test accuracy 0.9000"), said


def test_stages_logging_the_same_input_at_one_instant_all_finish_with_it(team_stack, team_members, tmp_path):
    """MLflow's server checks whether a dataset exists, then inserts it: two stages logging the same
    input at once (teammates running the same stage on the same data) race, and PostgreSQL refuses
    the later insert. Three times, eight runs, opened first, log one new input at the same instant
    (without the retry, about one round in three lost a run here); every run ends FINISHED with it,
    and the dataset is stored once."""
    env = {**member_env(team_stack["root"] / "members" / "alice.env"), "PYTHONPATH": str(PROJECT)}
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_top": {"cmd": "true", "deps": ["data/f"]}}}))
    script = (
        "import mlflow\n"
        "from ops import tracking\nfrom ops.tracking import runs\n"
        "mlflow.set_tracking_uri(tracking.tracking_uri())\n"
        "run = runs._open_run('train_top', tags={'race': 'inputs'})\n"
        + WAIT_FOR_RELEASE
        + "runs._log_inputs('train_top')\n"
        "mlflow.end_run()\n"
        "print('run', run.info.run_id)\n"
    )
    s = team_stack["stack"]
    for _ in range(3):
        digest = os.urandom(16).hex()  # a dataset the server has never seen: every writer tries to insert it
        lock = {"schema": "2.0", "stages": {"featurize": {"cmd": "true", "outs": [{"path": "data/f", "md5": digest}]}}}
        (project / "dvc.lock").write_text(yaml.safe_dump(lock))
        outputs = released_together([script] * 8, project, env)
        runs = [line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("run ")]
        assert len(set(runs)) == 8
        listed = ", ".join(f"'{r}'" for r in runs)
        assert query(s, f"SELECT status FROM runs WHERE run_uuid IN ({listed})") == [("FINISHED",)] * 8
        datasets = query(s, f"SELECT dataset_uuid FROM datasets WHERE digest = '{digest}'")
        assert len(datasets) == 1
        inputs = query(s, f"SELECT destination_id FROM inputs WHERE source_id = '{datasets[0][0]}'")
        assert sorted(r for (r,) in inputs) == sorted(runs)


def test_each_service_gets_only_what_it_needs_of_the_environment(team_stack):
    """As root, PostgreSQL runs as `nobody`, whose other processes could read its environment: no
    service is given the operator's logins and keys, only PATH, the locale and its own settings."""
    s = team_stack["stack"]
    pids = {name: processes.service_pid(s, name) for name in ("postgres", "s3", "mlflow")}
    own = {
        "postgres": set(),
        "s3": {"HOME", "TMPDIR", "WEED_MASTER_VOLUME_GROWTH_COPY_1"},
        "mlflow": {"HOME", "PGPASSFILE", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        | {"AWS_DEFAULT_REGION", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD"}
        | {"MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_DISABLE_TELEMETRY"},
    }
    for name, pid in pids.items():
        assert pid is not None, name
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
        given = dict(line.split("=", 1) for line in environ if "=" in line)
        # PostgreSQL adds settings of its own to its environment once started (PG*, LC_*), and pg_ctl
        # starts it through a shell (PWD)
        theirs = {k for k in given if not (name == "postgres" and (k.startswith(("PG", "LC_")) or k == "PWD"))}
        assert theirs <= set(processes.PASSED_ENV) | own[name], (name, sorted(theirs))
        assert not set(OPERATOR_SECRETS.values()) & set(given.values()), name
        if name == "s3":  # a bucket grows by one volume at a time (services.start_s3)
            assert given["WEED_MASTER_VOLUME_GROWTH_COPY_1"] == "1"


def test_credentials_appear_in_no_log_tag_param_lock_or_commit(team_stack, team_members):
    s = team_stack["stack"]
    logins = [member_env(team_stack["root"] / "members" / f"{name}.env") for name in ("alice", "bob")]
    secrets = {login["MLFLOW_TRACKING_PASSWORD"] for login in logins} | {s.secrets["s3_dvc_secret"]}
    rows = query(
        s, "SELECT value FROM tags UNION ALL SELECT value FROM params UNION ALL SELECT value FROM model_version_tags"
    )
    places = {"tags, params": "\n".join(v for (v,) in rows)}
    for name in ("alice", "bob"):
        m = team_members[name]
        workspace = m["path"]
        run(["git", "add", "-A"], workspace, m["env"])
        run(["git", "commit", "-qm", "reproduced", "--allow-empty"], workspace, m["env"])
        places[f"{name}'s dvc repro"] = m["log"]
        places[f"{name}'s dvc.lock"] = (workspace / "dvc.lock").read_text()
        places[f"{name}'s git"] = run(["git", "log", "-p", "--all"], workspace, m["env"]).stdout
        places[f"{name}'s .dvc/config"] = (workspace / ".dvc" / "config").read_text()
    assert not [(where, secret[:4]) for where, text in places.items() for secret in secrets if secret in text]
    assert s.secrets["s3_dvc_secret"] in (team_members["bob"]["path"] / ".dvc" / "config.local").read_text()
    bob = team_members["bob"]
    assert run(["git", "check-ignore", ".dvc/config.local"], bob["path"], bob["env"]).returncode == 0


def test_a_wrong_password_fails_the_stage_at_its_start_and_runs_nothing(team_stack, team_members):
    s, alice = team_stack["stack"], team_members["alice"]
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


def test_a_stopped_store_fails_logging_and_push_then_both_complete_when_it_returns(team_stack, team_members):
    s, root, alice = team_stack["stack"], team_stack["root"], team_members["alice"]
    workspace, env = alice["path"], alice["env"]
    assert "s3: stopped" in team_cli(root, "stop", "s3").stdout
    try:
        pushed = dvc("push", cwd=workspace, env=env, check=False)
        assert pushed.returncode != 0
        assert f'Could not connect to the endpoint URL: "{s.s3_endpoint}/dvc/image-classifier/' in pushed.stderr
        # the store stops while prepare works: its run opens (PostgreSQL is up), its artifacts cannot be stored
        failed = dvc("repro", "--force", "-s", "prepare", cwd=workspace, env=env, check=False)
    finally:
        team_cli(root, "up")
    # the instant `up` returns, both buckets take writes (the restarted store answers a listing seconds
    # before its volume server has registered, and a write in between fails with InternalError)
    client = services._s3_client(s)
    for bucket in ("mlflow", state.DVC_BUCKET):
        client.put_object(Bucket=bucket, Key="probe/after-restart.txt", Body=b"written")
        client.delete_object(Bucket=bucket, Key="probe/after-restart.txt")
        assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=services.READY_PROBE)
    assert failed.returncode != 0
    assert "The prepare stage finished its work and saved its outputs, but logging its outputs" in failed.stderr
    run_id = re.search(r"python -m ops\.tracking log prepare --run-id (\w+)", failed.stderr)
    assert run_id and "dvc commit prepare" in failed.stderr
    assert (workspace / "data" / "prepared" / "manifest.csv").is_file()
    # as the message says
    relogged = run([sys.executable, "-m", "ops.tracking", "log", "prepare", "--run-id", run_id[1]], workspace, env)
    assert f"as run {run_id[1]}" in relogged.stderr
    dvc("commit", "-f", "prepare", cwd=workspace, env=env)
    assert query(s, f"SELECT status FROM runs WHERE run_uuid = '{run_id[1]}'") == [("FINISHED",)]
    pages = services._s3_client(s).get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    stored = {o["Key"] for page in pages for o in page.get("Contents", [])}
    assert any(k.endswith(f"/{run_id[1]}/artifacts/reports/data.json") for k in stored)
    assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."
    # the push, retried
    dvc("push", cwd=workspace, env=env)


def test_a_stopped_server_mid_stage_keeps_the_outputs_and_says_how_to_log_them(team_stack, team_members):
    s, root, alice = team_stack["stack"], team_stack["root"], team_members["alice"]
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
        # The run is open once its inputs are logged (the last of what opening it writes): from then
        # on the stage trains, and the server stops under it.
        while not query(
            s,
            "SELECT 1 FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'pipeline.stage' "
            "AND t.value = 'finetune' JOIN inputs i ON i.destination_id = r.run_uuid WHERE r.status = 'RUNNING'",
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
    run_id = re.search(r"python -m ops\.tracking log finetune --run-id (\w+)", err)
    assert run_id, err[-3000:]
    assert (workspace / "models" / "model.keras").is_file()
    run([sys.executable, "-m", "ops.tracking", "log", "finetune", "--run-id", run_id[1]], workspace, env)
    dvc("commit", "-f", "finetune", cwd=workspace, env=env)
    assert query(s, f"SELECT status FROM runs WHERE run_uuid = '{run_id[1]}'") == [("FINISHED",)]
    metrics = {k for (k,) in query(s, f"SELECT key FROM latest_metrics WHERE run_uuid = '{run_id[1]}'")}
    assert "finetune.val_accuracy" in metrics
    assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."


def test_a_fresh_clone_pulls_everything_and_reproduces_nothing(team_stack, team_members, tmp_path):
    alice, bob = team_members["alice"], team_members["bob"]
    run(["git", "push", "-q", "origin", "HEAD:shared"], alice["path"], alice["env"], check=False)
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(alice["path"]), str(fresh)], tmp_path, bob["env"])
    env = member_env(team_stack["root"] / "members" / "bob.env")
    dvc("pull", cwd=fresh, env=env)
    assert dvc("status", cwd=fresh, env=env).stdout.strip() == "Data and pipelines are up to date."
    assert ran_stages(dvc("repro", cwd=fresh, env=env).stdout) == []
    assert locked_hashes(fresh) == locked_hashes(alice["path"])
    assert yaml.safe_load((fresh / "dvc.lock").read_text()) == yaml.safe_load((alice["path"] / "dvc.lock").read_text())
    assert json.loads((fresh / "reports" / "metrics.json").read_text()) == json.loads(
        (alice["path"] / "reports" / "metrics.json").read_text()
    )
    assert os.path.getsize(fresh / "models" / "model.keras") > 0


def test_postgresql_runs_from_a_copy_in_the_stack_when_its_user_cannot_reach_the_venv(tmp_path, monkeypatch):
    """As root in a clone only root can enter (under /root, or a `mktemp -d` folder), `nobody` cannot
    reach the venv's PostgreSQL: its binaries and libraries are copied into the stack's folder once,
    and run from there."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.submodule_search_locations
    venv_copy = Path(spec.submodule_search_locations[0])
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 0)
    monkeypatch.setattr(postgres, "_blocked_folder", lambda path: path if venv_copy in path.parents else None)
    stack = state.Stack(root=tmp_path / ".team", bind="127.0.0.1", public_host="127.0.0.1", ports={}, secrets={})
    initdb = Path(postgres.postgres_bin(stack, "initdb"))
    assert initdb == tmp_path / ".team" / "postgres-bin" / "pgserver" / "pginstall" / "bin" / "initdb"
    done = run([str(initdb), "--version"], tmp_path, {"PATH": os.environ["PATH"]})
    assert done.stdout.startswith("initdb (PostgreSQL)")
    before = initdb.stat().st_mtime_ns
    assert Path(postgres.postgres_bin(stack, "pg_ctl")).is_file() and initdb.stat().st_mtime_ns == before, "copied once"


def test_a_stack_in_a_folder_its_database_user_cannot_pass_says_so_in_one_line(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="team-"))  # not under pytest's own folder, which only root passes
    try:
        base.chmod(0o711)
        private = base / "private"
        (private / ".team").mkdir(parents=True)
        private.chmod(0o700)
        monkeypatch.setattr(postgres.os, "geteuid", lambda: 0)
        postgres._check_reachable_unprivileged(base / ".team" / "postgres")  # passable: no error
        with pytest.raises(StageError, match=rf"who cannot pass through {private} \(mode 0o700\)\. Put the"):
            postgres._check_reachable_unprivileged(private / ".team" / "postgres")
    finally:
        shutil.rmtree(base)


def test_a_store_that_did_not_start_on_a_nearly_full_disk_says_how_much_is_free(tmp_path, monkeypatch):
    free = {"free": 5 * 2**30}
    monkeypatch.setattr(services.shutil, "disk_usage", lambda folder: type("Usage", (), free)())
    assert services._low_disk(tmp_path) == ""
    free["free"] = int(2.5 * 2**30)
    said = services._low_disk(tmp_path)
    assert f"The disk holding {tmp_path} has 2.5 GiB free" in said
    assert "no free volumes left" in said and "`make team-up` again" in said


def test_a_group_whose_leader_has_ended_is_alive_while_another_of_its_processes_runs():
    """What `stop` waits for: every process of the service's group (MLflow's workers, a process whose
    main thread has ended before its others), not its first process alone."""
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert leader.stdout is not None
    worker = int(leader.stdout.readline())
    leader.wait(timeout=10)  # the leader has ended and is reaped: only its child runs on in the group
    try:
        assert not Path(f"/proc/{leader.pid}").exists()
        assert processes.group_alive(leader.pid)
    finally:
        os.kill(worker, 9)
    deadline = time.monotonic() + 10
    while processes.group_alive(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes.group_alive(leader.pid)


def test_a_second_up_on_the_same_stack_says_it_waits_for_the_first(tmp_path):
    """Two first `make team-up` at once on a new folder would both create the stack: the second waits
    for the first's lock, saying so, then finds the stack made (and its services running)."""
    root = tmp_path / ".team"
    script = (
        "from pathlib import Path\nfrom ops.team import state\nwith state.exclusive(Path('.team')):\n    print('in')\n"
    )
    with state.exclusive(root):
        second = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert second.stdout is not None
        said = second.stdout.readline()
        assert said == "another `team up`, `down` or `stop` is running on .team: waiting for it to finish\n"
        time.sleep(0.5)
        assert second.poll() is None, "it waits while the first holds the lock"
    out, _ = second.communicate(timeout=60)
    assert (out, second.returncode) == ("in\n", 0)


def http_status(url: str, data: bytes | None = None, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def speak_tls_without_a_certificate(port: int, trusting) -> bytes:
    """What a gRPC port answers a client that trusts its authority but shows no certificate of its own."""
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        trusting.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return tls.recv(100)


def test_the_object_store_takes_nothing_without_a_key_below_s3(team_stack):
    """What a local user without the S3 keys tried: list the buckets, read an artifact, plant a file in
    the mlflow bucket, through the master's, the filer's and the volume server's own ports."""
    import socket
    import ssl

    s = team_stack["stack"]
    p = s.ports
    client = services._s3_client(s)
    client.put_object(Bucket="mlflow", Key="probe/artifact.txt", Body=b"an artifact")
    assert client.get_object(Bucket="mlflow", Key="probe/artifact.txt")["Body"].read() == b"an artifact"
    master, filer, volume = (f"http://127.0.0.1:{p[name]}" for name in ("master", "filer", "volume"))
    # the master's and the filer's HTTP APIs are off
    for url in (f"{master}/dir/assign", f"{master}/col/delete?collection=mlflow", f"{filer}/buckets/"):
        assert http_status(url) == 404, url
    assert http_status(f"{filer}/buckets/mlflow/probe/artifact.txt") == 404
    assert http_status(f"{filer}/buckets/mlflow/planted.txt", b"planted", "PUT") == 404
    # the volume server's data needs a JWT signed with the stack's keys
    assert http_status(f"{volume}/1,01637037d6") == 401
    assert http_status(f"{volume}/1,01637037d6", b"planted", "POST") == 401
    # every gRPC port: no answer in plain text, and TLS only with a certificate of the stack's authority
    trusting = ssl.create_default_context(cafile=str(s.root / "tls" / "ca.crt"))
    for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):
        with socket.create_connection(("127.0.0.1", p[name]), timeout=5) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            assert raw.recv(100) == b"", name
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
            speak_tls_without_a_certificate(p[name], trusting)
    # its unix sockets: in its private folder, or (gRPC's, which it always puts in /tmp) closed to other users
    assert {path.name for path in (s.root / "s3").glob("*.sock")} == {"filer.sock", "s3.sock"}
    for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):
        for path in Path("/tmp").glob(f"seaweedfs-*-{p[name]}.sock"):
            assert not path.stat().st_mode & 0o022, f"{path} lets other users connect"
    assert not (s.root / "s3").stat().st_mode & 0o077 and not (s.root / "tls").stat().st_mode & 0o077
    assert oct((s.root / "security.toml").stat().st_mode & 0o777) == "0o600"
