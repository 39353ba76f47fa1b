"""The stack's services started and stopped: the S3 store, the MLflow server with logins, and the
whole stack (`up`, `down`); member logins (`add_user`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from classifier.data import fetch
from classifier.errors import StageError
from ops.team import security
from ops.team.postgres import postgres_bin, run_pg, start_postgres
from ops.team.processes import (
    GRACE,
    check_port_free,
    group_alive,
    service_env,
    service_pid,
    spawn_service,
    venv_tool,
    wait_until_ready,
)
from ops.team.state import (
    ADMIN,
    ARTIFACTS,
    DVC_BUCKET,
    SERVICES,
    Stack,
    create,
    exclusive,
    load,
    new_secret,
    write_config,
    write_member,
)

#: The object each bucket is written with, and emptied of, when the store starts.
READY_PROBE = ".team-ready"


def _s3_client(stack: Stack):
    """boto3's S3 client, with the MLflow server's key."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=stack.local_s3,
        aws_access_key_id=stack.secrets["s3_server_key"],
        aws_secret_access_key=stack.secrets["s3_server_secret"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=30),
    )


def start_s3(stack: Stack) -> None:
    if service_pid(stack, "s3") is None:
        p = stack.ports
        for name in ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"):
            check_port_free(p[name])
        stack.path("s3").mkdir(exist_ok=True)
        stack.path("s3").chmod(0o700)  # the store's files (every artifact and DVC object): its user's alone
        args = [
            venv_tool("weed"),
            "server",
            f"-dir={stack.path('s3')}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.ip.bind={stack.bind}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # as many volumes as the disk holds
            "-volume.preStopSeconds=1",  # stop in a second, not ten
            "-master.volumeSizeLimitMB=1024",
            "-master.electionTimeout=1s",  # its only master: no peer to wait for (10 s by default)
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={stack.path('s3.json')}",
            # Below S3, nothing without a key (stages/storesecurity.py): no HTTP API on the master and
            # the filer, certificates on every gRPC port, signed requests on the volume server's.
            "-disableHttp",
            "-filer.disableHttp",
            *security.socket_flags(stack.path("s3")),
        ]
        # TMPDIR: where it puts its gRPC unix sockets, in its private folder rather than /tmp
        private = str(stack.path("s3"))
        # WEED_MASTER_VOLUME_GROWTH_COPY_1: a bucket grows by one volume when it needs one, not seven at once;
        # with "as many volumes as the disk holds", seven per bucket left a disk with a few GiB free
        # none to give the second bucket, whose every write then failed
        growth = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        process = spawn_service(stack, "s3", args, service_env(HOME=str(stack.root), TMPDIR=private, **growth))
    else:
        process = None
    client = _s3_client(stack)

    def stores() -> bool:
        """Both buckets take a write. Listing them is not enough: after a restart the S3 gateway answers
        while its master elects itself and the volume server registers (seconds to tens of seconds),
        and every write in that time fails with InternalError ("Not enough data nodes found")."""
        have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in ("mlflow", DVC_BUCKET):
            if bucket not in have:
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=READY_PROBE, Body=b"ready")
            client.delete_object(Bucket=bucket, Key=READY_PROBE)
        return True

    try:
        wait_until_ready(stores, stack, "s3", process)
    except StageError as err:
        raise StageError(f"{err}{_low_disk(stack.path('s3'))}") from err


#: Below this much free space the store may have no room for a bucket's next volume.
LOW_DISK = 4 * 2**30


def _low_disk(folder: Path) -> str:
    """What to say of the free space of `folder`'s disk when the store did not start: nothing, unless
    it is low."""
    free = shutil.disk_usage(folder).free
    if free >= LOW_DISK:
        return ""
    return (
        f"\nThe disk holding {folder} has {free / 2**30:.1f} GiB free: the store makes a volume of up to 1 GiB "
        'for each bucket, and refuses every write to a bucket it has no room for ("no free volumes left" in '
        "its log). Free some space, or move the stack to a larger disk (TEAM_DIR), then `make team-up` again."
    )


def api(stack: Stack, method: str, path: str, body: dict | None = None) -> dict:
    """Call the MLflow server's REST API as the admin; the JSON answer."""
    request = urllib.request.Request(
        stack.local_mlflow + "/api/2.0/mlflow/" + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json", **fetch.basic_auth(ADMIN, stack.secrets["admin_password"])},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise StageError(f"the MLflow server refused {path}: HTTP {err.code} {err.read()[:300]!r}") from err


def start_mlflow(stack: Stack) -> None:
    if service_pid(stack, "mlflow") is None:
        check_port_free(stack.ports["mlflow"])
        s = stack.secrets
        env = service_env(HOME=str(stack.root))
        env |= {
            "PGPASSFILE": str(stack.path("pgpass")),
            "MLFLOW_AUTH_CONFIG_PATH": str(stack.path("basic_auth.ini")),
            "MLFLOW_AUTH_ADMIN_PASSWORD": s["admin_password"],  # read on the first start only
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s["flask_secret_key"],
            "MLFLOW_S3_ENDPOINT_URL": stack.local_s3,
            "AWS_ACCESS_KEY_ID": s["s3_server_key"],
            "AWS_SECRET_ACCESS_KEY": s["s3_server_secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
            # MLflow's job runner (four more processes) serves GenAI features this pipeline does not use
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",  # no usage reports to MLflow's makers
        }
        args = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"]
        args += ["--host", stack.bind, "--port", str(stack.ports["mlflow"]), "--workers", "2"]
        args += ["--backend-store-uri", stack.database_uri, "--artifacts-destination", ARTIFACTS, "--serve-artifacts"]
        if stack.public_host not in ("127.0.0.1", "localhost"):
            # MLflow's default (this machine and private addresses), with the name members use
            private = ["10.*", "192.168.*", *(f"172.{i}.*" for i in range(16, 32))]
            hosts = [
                stack.public_host,
                f"{stack.public_host}:*",
                "localhost",
                "localhost:*",
                "127.0.0.1",
                "127.0.0.1:*",
            ]
            args += ["--allowed-hosts", ",".join(hosts + private)]
        process = spawn_service(stack, "mlflow", args, env)
    else:
        process = None

    def answers() -> bool:
        with urllib.request.urlopen(stack.local_mlflow + "/health", timeout=2) as answer:
            return answer.status == 200

    wait_until_ready(answers, stack, "mlflow", process)
    api(stack, "GET", f"users/get?username={ADMIN}")  # the admin's password works


def up(root: Path, bind: str | None = None, public_host: str | None = None) -> Stack:
    """Create the stack in `root` if there is none (listening on `bind`, 127.0.0.1 by default), and
    start whichever of its services is not running."""
    with exclusive(root):
        return _up(root, bind, public_host)


def _up(root: Path, bind: str | None, public_host: str | None) -> Stack:
    stack = load(root)
    if stack is None:
        stack = create(root, bind or "127.0.0.1", public_host)
    elif (bind or stack.bind, public_host or stack.public_host) != (stack.bind, stack.public_host):
        raise StageError(
            f"the stack in {root} serves on {stack.bind} as {stack.public_host}: edit its stack.json to change that"
        )
    else:
        write_config(stack)  # as this version of the code writes it
    start_postgres(stack)
    start_s3(stack)
    start_mlflow(stack)
    return stack


def down(stack: Stack) -> list[str]:
    """Stop every service (MLflow first, PostgreSQL last); the ones that were running."""
    return [service for service in reversed(SERVICES) if stop(stack, service)]


def add_user(stack: Stack, name: str) -> Path:
    """An MLflow login for `name` with a generated password, written to members/<name>.env."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise StageError(f"user name {name!r}: use letters, digits, '.', '-' and '_'")
    if stack.path("members", f"{name}.env").exists():
        raise StageError(f"{name} has a login already: {stack.path('members', f'{name}.env')}")
    password = new_secret(24)
    api(stack, "POST", "users/create", {"username": name, "password": password})
    return write_member(stack, name, password)


def stop(stack: Stack, service: str) -> bool:
    """Stop `service`; whether it was running."""
    pid = service_pid(stack, service)
    if pid is None:
        return False
    if service == "postgres":
        run_pg([postgres_bin(stack, "pg_ctl"), "-D", str(stack.path("postgres")), "-m", "fast", "-w", "stop"])
        return True
    # SIGKILL after the grace; until the killed processes are gone they hold their ports, and an `up`
    # right after would find them taken
    for signum, seconds in ((signal.SIGTERM, GRACE[service]), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)
        deadline = time.monotonic() + seconds
        while group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    stack.path(f"{service}.pid").unlink(missing_ok=True)
    return True
