"""What a run is traced to: dvc.yaml's deps, outs and params of a stage, dvc.lock's hashes, DVC's
hash of an output, the git commit and the attempt. Lineage points from MLflow to DVC, never back."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from classifier import config
from classifier.data import fetch
from classifier.model import backend

PIPELINE_FILE = Path("dvc.yaml")
#: Where the code a stage depends on lives: its deps there are code, not data.
CODE = ("stages/", "classifier/")


LOCK_FILE = Path("dvc.lock")


#: When this module was imported: with the pid, names this process where /proc cannot (see `attempt`).
_IMPORTED = f"{time.time():.0f}"


def dvc_stages() -> dict[str, Any]:
    """The stages of dvc.yaml in the current folder, read once per process and folder."""
    return _read_stages(PIPELINE_FILE.resolve())


@functools.cache
def _read_stages(pipeline: Path) -> dict[str, Any]:
    """dvc.yaml's stages, a `foreach` stage expanded as DVC does: `name@item` for each item of its
    list (given in place, or as `${key}` of a list in params.yaml), `${item}` replaced in its `do`."""
    if not pipeline.is_file():
        return {}
    stages: dict[str, Any] = {}
    for name, spec in (yaml.safe_load(pipeline.read_text(encoding="utf-8")).get("stages") or {}).items():
        if "foreach" not in spec:
            stages[name] = spec
            continue
        items = spec["foreach"]
        if isinstance(items, str):
            items = _param_value(pipeline.parent / config.PARAMS_FILE, items.strip().removeprefix("${").rstrip("}"))
        for item in items or []:
            stages[f"{name}@{item}"] = _with_item(spec["do"], str(item))
    return stages


def _param_value(params: Path, key: str) -> Any:
    value: Any = yaml.safe_load(params.read_text(encoding="utf-8")) if params.is_file() else {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _with_item(node: Any, item: str) -> Any:
    if isinstance(node, str):
        return node.replace("${item}", item)
    if isinstance(node, list):
        return [_with_item(v, item) for v in node]
    if isinstance(node, dict):
        return {_with_item(k, item): _with_item(v, item) for k, v in node.items()}
    return node


def dep_paths(entries: list) -> list[str]:
    """Paths of dvc.yaml deps/outs/metrics entries (plain strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def stage_param_keys(stage: str) -> list[str]:
    """The params a stage depends on, as dvc.yaml declares them (e.g. ['seed', 'top'])."""
    keys: list[str] = []
    for entry in dvc_stages().get(stage, {}).get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {params-file: [keys]}; {params-file: null} is all of them, as no keys at all
            for names in entry.values():
                keys.extend(names or [])
    return keys


def loggable_params(params: config.Params) -> dict[str, Any]:
    """All params, flattened, a URL's secrets redacted (`fetch.redact_url`)."""
    return {
        key: fetch.redact_url(value) if isinstance(value, str) and fetch.is_url(value) else value
        for key, value in config.flatten(params).items()
    }


def stage_params(stage: str, params: config.Params) -> dict[str, Any]:
    """Flattened values of the params `stage` depends on (all params if dvc.yaml is not here)."""
    flat = loggable_params(params)
    keys = stage_param_keys(stage)
    if not keys:
        return flat
    return {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}


def stage_outputs(stage: str) -> list[str]:
    """Everything dvc.yaml says `stage` writes: its outs, then its metrics."""
    spec = dvc_stages().get(stage, {})
    return dep_paths(spec.get("outs")) + dep_paths(spec.get("metrics"))


def data_deps(stage: str) -> list[str]:
    """What a stage reads that another stage wrote (data, features, models), per dvc.yaml."""
    return [p for p in dep_paths(dvc_stages().get(stage, {}).get("deps")) if not p.startswith(CODE)]


def locked_hashes(lock: Path = LOCK_FILE) -> dict[str, str]:
    """{path: DVC md5} of every stage output recorded in dvc.lock (directories end in .dir)."""
    if not lock.is_file():
        return {}
    return {path: md5 for outs in _locked_outs(lock.read_text(encoding="utf-8")).values() for path, md5 in outs.items()}


def outputs_digest(lock_text: str, last: str = "compare") -> str:
    """One hash of every output a dvc.lock (its text) records, but those of the stage `last` (which is
    running, not yet recorded, when it logs the version): two versions with the same digest are the
    same pipeline state."""
    outs = sorted(
        (path, md5) for name, found in _locked_outs(lock_text).items() if name != last for path, md5 in found.items()
    )
    return hashlib.md5(json.dumps(outs).encode("utf-8")).hexdigest()


def _locked_outs(lock_text: str) -> dict[str, dict[str, str]]:
    """{stage: {path: DVC md5}} of the outputs a dvc.lock's text records."""
    stages = (yaml.safe_load(lock_text) or {}).get("stages") or {}
    return {
        name: {out["path"]: out["md5"] for out in spec.get("outs", []) if "md5" in out} for name, spec in stages.items()
    }


def committed(path: Path | str) -> str | None:
    """The text of `path` (relative to the current folder) as git's HEAD has it; None outside git, or
    when it is not committed."""
    try:
        return subprocess.run(["git", "show", f"HEAD:./{path}"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def dvc_hash(path: Path) -> str:
    """The content hash DVC records in dvc.lock for a file or a folder: the md5 of a file; for a
    folder, the md5 of its listing (each file's md5 and path, sorted, as JSON) followed by `.dir`."""
    if not path.is_dir():
        return _md5(path)
    files = sorted(file for file in path.rglob("*") if file.is_file())
    listing = sorted(
        ({"md5": _md5(file), "relpath": file.relative_to(path).as_posix()} for file in files),
        key=lambda entry: entry["relpath"],
    )
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> tuple[str, bool]:
    """(HEAD's commit, whether the work tree has uncommitted changes); ('unknown', False) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return head, bool(dirty)


def attempt() -> str:
    """The `dvc repro` (or `dvc exp run`) this stage runs in, as `<pid>.<start>` of that process;
    the stage's own process when none is found. Tags runs so a failed attempt's runs stay together."""
    pid = _stage_pid()
    own = f"{pid}.{_IMPORTED}"
    for step in range(8):  # the stage's python, a shell, then DVC
        stat = _stat(pid)
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            break
        if stat is None:
            break
        here = f"{pid}.{stat[19]}"  # field 22 of /proc/<pid>/stat: the start time, against pid reuse
        own = here if step == 0 else own
        if any(os.path.basename(part) == b"dvc" for part in command[:3]):
            return here
        pid = int(stat[1])
    return own


def _stage_pid() -> int:
    """The stage's process id: this process's, or in a stage's MLflow worker the stage's."""
    return int(os.environ.get(STAGE_PID, os.getpid()))


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command's name (field 3 on); None if it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process() -> str:
    """`<host>:<pid>.<start>` of the stage's process: the run's tag PROCESS, which tells whether that
    process still runs (`process_gone`); `<start>` is `?` where /proc cannot be read."""
    pid = _stage_pid()
    stat = _stat(pid)
    return f"{socket.gethostname()}:{pid}.{stat[19] if stat else '?'}"


def process_gone(tag: str) -> bool:
    """Whether the process a PROCESS tag names has ended: on this machine, no process of that id runs,
    or one started at another time. False where that cannot be told (another machine, no /proc)."""
    host, _, ident = tag.rpartition(":")
    pid, _, start = ident.partition(".")
    if host != socket.gethostname() or not pid.isdigit() or start == "?" or _stat(os.getpid()) is None:
        return False
    stat = _stat(int(pid))
    return stat is None or stat[19] != start


#: The run tag naming the process that runs a stage (`process`).
PROCESS = "pipeline.process"


def lineage_tags(stage: str) -> dict[str, str]:
    commit, dirty = git_commit()
    tags = {
        "pipeline.stage": stage,
        "pipeline.attempt": attempt(),
        PROCESS: process(),
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("KERAS_BACKEND"):  # a stage that runs Keras: on what, as how many processes
        tags["pipeline.backend"] = os.environ["KERAS_BACKEND"]
        tags["pipeline.processes"] = str(backend.cluster().count)
    hashes = locked_hashes()
    for path in data_deps(stage):
        if path in hashes:
            tags[f"dvc.in.{path}"] = hashes[path]
    return tags


#: In the worker's environment: the stage's process id (see `attempt`).
STAGE_PID = "PIPELINE_STAGE_PID"
