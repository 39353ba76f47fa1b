"""The team stack for the tests, shared by the whole session: PostgreSQL, the S3 store and the
MLflow server with logins, started by `python -m ops.team up` (what `make team-up` runs) on free
ports of 127.0.0.1, stopped by `down` at the end; and two members, alice and bob, each with a login
and a clone of one repository, who ran the tiny pipeline at the same time against it: alice with
her DVC key in the environment, bob with his in .dvc/config.local.

tests/ops/test_team.py tests the stack with them; tests/e2e/test_caching.py goes on in bob's clone, which
saves the suite a run of the pipeline.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.team import postgres, services, state
from tests.workspace import base_env, commit, dvc, finish_repro, git_repo, locked_hashes, run, start_repro

PROJECT = Path(state.__file__).resolve().parents[2]
REMOTE = "s3://dvc/image-classifier"
#: A stopped server or store fails a request at once, not after MLflow's minutes of retries.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


#: In the environment of the operator who starts the stack: no service may be given it.
OPERATOR_SECRETS = {"AWS_SECRET_ACCESS_KEY": "operator-aws-secret", "MLFLOW_TRACKING_PASSWORD": "operator-password"}


def team_cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m ops.team --dir root ...`, as `make team-up` runs it, by an operator whose
    environment holds logins of its own (OPERATOR_SECRETS)."""
    command = [sys.executable, "-m", "ops.team", "--dir", str(root), *args]
    return run(command, PROJECT, base_env(**OPERATOR_SECRETS), check)


def member_env(path: Path) -> dict[str, str]:
    """base_env (and FAIL_FAST), with the exports of a member's file instead of any MLflow or AWS login."""
    exports = dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.MULTILINE))
    clean = {k: v for k, v in base_env(**FAIL_FAST).items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))}
    return {**clean, **exports}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stack() -> Iterator[dict]:
    """The `team_stack` fixture (tests/conftest.py): the stack, up until the session ends."""
    # Not under pytest's private (0700) folder: as root, PostgreSQL runs as `nobody`, who must reach it.
    base = Path(tempfile.mkdtemp(prefix="team-"))
    base.chmod(0o711)
    root = base / ".team"
    try:
        first = team_cli(root, "up")
        stack = state.load(root)
        assert stack is not None
        yield {"stack": stack, "root": root, "up": first.stdout}
    finally:  # whatever started is stopped, even after a failed `up`
        done = team_cli(root, "down", check=False)
    assert "Stopped mlflow, s3, postgres" in done.stdout
    assert not any(port_open(stack.ports[p]) for p in ("mlflow", "s3", "postgres"))
    assert (root / "postgres" / "PG_VERSION").is_file(), "down keeps the data"
    shutil.rmtree(base)


def query(stack: state.Stack, sql: str) -> list[tuple]:
    """Rows of `sql` in the MLflow database."""
    connection = postgres._connect(stack, "mlflow")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


def members(team_stack: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """alice and bob, each with a login and a clone; both clones reproduced at the same time.

    What the server and the store held right after is kept in "snapshot": tests/e2e/test_caching.py goes
    on working in bob's clone (logging more runs) before or after tests/ops/test_team.py looks."""
    stack = team_stack
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
    running = {name: start_repro(m["path"], m["env"]) for name, m in found.items()}
    for name, process in running.items():
        found[name]["log"] = finish_repro(process)
    s = stack["stack"]
    store = services._s3_client(s)
    found["snapshot"] = {
        "hashes": {name: locked_hashes(found[name]["path"]) for name in ("alice", "bob")},
        "runs": query(
            s,
            "SELECT r.user_id, r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "AND t.key = 'pipeline.stage'",
        ),
        "keys": {
            o["Key"]
            for page in store.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])
        },
        "evaluate_runs": [
            r for (r,) in query(s, "SELECT run_uuid FROM tags WHERE key = 'pipeline.stage' AND value = 'evaluate'")
        ],
        "versions": [v for (v,) in query(s, "SELECT version FROM model_versions WHERE name = 'image-classifier'")],
        "champion": [
            v
            for (v,) in query(
                s, "SELECT version FROM registered_model_aliases WHERE name = 'image-classifier' AND alias = 'champion'"
            )
        ],
        "accuracy": dict(
            query(
                s,
                "SELECT version, value FROM model_version_tags WHERE name = 'image-classifier' "
                "AND key = 'test.accuracy'",
            )
        ),
        "log_loss": dict(
            query(
                s,
                "SELECT version, value FROM model_version_tags WHERE name = 'image-classifier' "
                "AND key = 'test.log_loss'",
            )
        ),
    }
    return found
