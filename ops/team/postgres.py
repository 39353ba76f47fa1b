"""The stack's PostgreSQL, from the pgserver wheel; as root it runs as an unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from classifier.errors import StageError
from ops.team.processes import check_port_free, service_env, service_pid
from ops.team.state import DIR_VARIABLE, UNPRIVILEGED, Stack, write_private


def postgres_bin(stack: Stack, name: str) -> str:
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


def start_postgres(stack: Stack) -> None:
    data = stack.path("postgres")
    _check_reachable_unprivileged(data)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(mode=0o700, exist_ok=True)
        _chown_unprivileged(data)
        pwfile = stack.path(".pwfile")  # initdb reads the password from a file, as PostgreSQL's user
        write_private(pwfile, stack.secrets["postgres_password"])
        _chown_unprivileged(pwfile)
        try:
            run_pg(
                [postgres_bin(stack, "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}"]
                + ["--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"]
            )
        finally:
            pwfile.unlink()
    if service_pid(stack, "postgres") is None:
        port = stack.ports["postgres"]
        check_port_free(port)
        logs = stack.path("logs")
        logs.mkdir(exist_ok=True)
        (logs / "postgres.log").touch()
        _chown_unprivileged(logs / "postgres.log")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        run_pg(
            [postgres_bin(stack, "pg_ctl"), "-D", str(data), "-l", str(logs / "postgres.log"), "-w", "-t", "60"]
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


def run_pg(args: list[str]) -> None:
    env = service_env()
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
