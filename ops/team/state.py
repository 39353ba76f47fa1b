"""The stack's folder (TEAM_DIR, default .team): its ports, secrets, config files and member files,
written private; and the lock that makes up, down and stop one at a time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from classifier import saving
from classifier.errors import StageError
from ops.team import security

DIR_VARIABLE = "TEAM_DIR"


SERVICES = ("postgres", "s3", "mlflow")


PORTS = ("postgres", "mlflow", "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")


ARTIFACTS = "s3://mlflow/artifacts"


DVC_BUCKET = "dvc"


ADMIN = "admin"


#: PostgreSQL refuses to run as root: then it runs as this user.
UNPRIVILEGED = "nobody"


def default_dir() -> Path:
    return Path(os.environ.get(DIR_VARIABLE) or saving.project_root() / ".team")


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


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by its owner only (also while it is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def new_secret(length: int) -> str:
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
            "postgres_password": new_secret(32),
            "admin_password": new_secret(32),
            "flask_secret_key": secrets.token_hex(32),
            "s3_server_key": "mlflow-" + secrets.token_hex(6),
            "s3_server_secret": new_secret(40),
            "s3_dvc_key": "dvc-" + secrets.token_hex(6),
            "s3_dvc_secret": new_secret(40),
            **{name: new_secret(40) for name in security.JWT_SECRETS},
        },
    )
    stack.path("stack.json").write_text(
        json.dumps({"bind": stack.bind, "public_host": stack.public_host, "ports": stack.ports}, indent=2) + "\n"
    )
    write_private(stack.path("secrets.json"), json.dumps(stack.secrets, indent=2) + "\n")
    write_config(stack)
    write_member(stack, ADMIN, stack.secrets["admin_password"])
    return stack


def write_config(stack: Stack) -> None:
    s = stack.secrets
    missing = [name for name in security.JWT_SECRETS if name not in s]
    if missing:  # a stack made before the store had keys below S3
        s.update({name: new_secret(40) for name in missing})
        write_private(stack.path("secrets.json"), json.dumps(s, indent=2) + "\n")
    security.write(stack.root, s, write_private)
    write_private(stack.path("pgpass"), f"127.0.0.1:{stack.ports['postgres']}:*:mlflow:{s['postgres_password']}\n")
    write_private(
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
    write_private(stack.path("s3.json"), json.dumps({"identities": identities}, indent=2) + "\n")


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
    write_private(
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
                "Each member gets a login with `python -m ops.team add-user NAME` "
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
