"""Where an sqlite store's artifacts are: in mlartifacts/ beside its database file, never outside its folder.

MLflow writes artifact locations into the database as absolute paths or file URIs (experiments,
runs, logged models, model versions, traces), so a project folder that was copied or moved would
still point at the folder it was made in: a copy would write its new artifacts into the original, a
moved one would not find its own. `relocate` points those locations at the store's own mlartifacts/.
A store from someone else may hold locations anywhere: a model version whose storage is another
folder makes the served model run that folder's code, an experiment located elsewhere makes every
stage write there. `check` refuses a store with a location outside its folder in one line, before
anything reads or writes through it. `own_store` does both, as the stages (store.store_uri), the
demo and the served model open a store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import urllib.parse
from pathlib import Path

from classifier.errors import StageError
from ops.tracking import lock

log = logging.getLogger(__name__)


class ForeignStore(StageError):
    """An sqlite store that cannot be used as it is: its locations leave its folder, or it cannot be read."""


def own_store(path: Path) -> None:
    """The sqlite store at `path` pointed at its own mlartifacts/ (`relocate`), then `check`ed."""
    relocate(path)
    check(path)


#: Where MLflow's sqlite schema holds an absolute artifact location: table, column, and which of its
#: rows (the trace tags hold other values too).
LOCATIONS = (
    ("experiments", "artifact_location", ""),
    ("runs", "artifact_uri", ""),
    ("logged_models", "artifact_location", ""),
    ("model_versions", "storage_location", ""),
    ("model_versions", "source", ""),
    ("trace_tags", "value", " AND key = 'mlflow.artifactLocation'"),
    ("workspaces", "default_artifact_root", ""),
    ("workspaces", "trace_archival_location", ""),
)

#: An experiment's location in an mlartifacts/ folder: the folder itself or its subfolder for one
#: experiment (MLflow's Default experiment), as a file URI or a plain absolute path.
_ARTIFACTS_ROOT = re.compile(r"^((?:file://)?/.*/mlartifacts)(?:/\d+)?/?$")


def relocate(path: Path) -> bool:
    """Point the artifact locations of the sqlite store at `path` at its own mlartifacts/ folder, when
    they name the mlartifacts/ folder of another place (the folder the store was made in, before it
    was copied or moved); return whether anything changed.

    By this project's rule an sqlite store's artifacts live in mlartifacts/ beside it, so a copied or
    moved project folder finds its own artifacts and never writes into the original. The other place
    is read from the experiments' locations (one small query when there is nothing to do); every
    location under it, as a file URI or a plain path, is rewritten, in every table and column of
    `LOCATIONS` (experiments, runs, logged models, model versions' sources and storage, traces,
    workspaces), in one transaction under the store's lock. Locations elsewhere (a server's
    mlflow-artifacts:, s3://, a folder of one's own that is not an mlartifacts/ folder) are left as
    they are."""
    own = path.absolute().parent / "mlartifacts"
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            moved = _moved_from(db, own)
            if not moved:
                return False
            with lock.held(path):
                db.execute("BEGIN IMMEDIATE")
                moved = _moved_from(db, own)  # again: another process may have done it meanwhile
                changed: dict[str, int] = {}
                for found, old in moved:
                    for before, after in _spellings(found, old, own):
                        for table, column, rows in _present(db):
                            done = db.execute(
                                f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", length(?) + 1) '
                                f'WHERE ("{column}" = ? OR substr("{column}", 1, length(?) + 1) = ? || \'/\'){rows}',
                                (after, before, before, before, before),
                            ).rowcount
                            if done:
                                changed[f"{table}.{column}"] = changed.get(f"{table}.{column}", 0) + done
                db.commit()
    except sqlite3.Error as err:
        raise ForeignStore(f"Could not point the MLflow store {path} at its own {own}: {err}") from err
    if not changed:
        return False
    log.info(
        "the MLflow store %s was made in %s: its artifact locations now point at %s (%s)",
        path,
        ", ".join(str(old.parent) for _, old in moved),
        own,
        ", ".join(f"{where} {count}" for where, count in changed.items()),
    )
    return True


def _moved_from(db: sqlite3.Connection, own: Path) -> list[tuple[str, Path]]:
    """The mlartifacts/ folders of other places that the store's experiments are located in: each as
    the store writes it, and as a path."""
    try:
        locations = [row[0] for row in db.execute("SELECT DISTINCT artifact_location FROM experiments")]
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):
            return []  # not an MLflow store (yet)
        raise
    folders: list[tuple[str, Path]] = []
    for location in locations:
        match = _ARTIFACTS_ROOT.match(location or "")
        if match is None:
            continue
        root = match.group(1)
        folder = Path(urllib.parse.unquote(root[len("file://") :])) if root.startswith("file://") else Path(root)
        if folder == own or any(folder == seen for _, seen in folders):
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(folder.parent, own.parent):
                continue  # the same folder by another name (a symbolic link)
        folders.append((root, folder))
    return folders


def _spellings(found: str, old: Path, own: Path) -> list[tuple[str, str]]:
    """(old prefix, new prefix) for each way MLflow may write a location: as the experiment has it, a
    file URI, a plain path."""
    pairs = [(found, own.as_uri() if found.startswith("file://") else str(own))]
    return pairs + [pair for pair in ((old.as_uri(), own.as_uri()), (str(old), str(own))) if pair[0] != found]


def _present(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """The `LOCATIONS` this store's schema has (an older MLflow's has fewer)."""
    columns: dict[str, set[str]] = {}
    for table in {table for table, _, _ in LOCATIONS}:
        columns[table] = {row[1] for row in db.execute(f"PRAGMA table_info('{table}')")}
    return [(table, column, rows) for table, column, rows in LOCATIONS if column in columns[table]]


#: Locations that are references through the store itself (a model version's source), not places.
REFERENCES = ("models:/", "runs:/")


def check(path: Path) -> None:
    """Refuse with one line (ForeignStore) the sqlite store at `path` if any of its `LOCATIONS` is
    outside the folder that holds it: another folder, a file URI of another machine, an object store or
    a named server (stores with artifacts elsewhere are tracking servers, MLFLOW_TRACKING_URI=http://...).
    `mlflow-artifacts:/...` with no host is the artifacts of whichever server opens the store."""
    if not path.is_file():
        return
    folder = path.absolute().parent
    outside: list[str] = []
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            for table, column, rows in _present(db):
                query = f'SELECT DISTINCT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL{rows}'
                outside += [
                    f"{table}.{column} {value!r}" for (value,) in db.execute(query) if not _inside(value, folder)
                ]
    except sqlite3.Error as err:
        raise ForeignStore(f"Could not read the MLflow store {path}: {err}") from err
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise ForeignStore(
            f"The MLflow store {path} keeps artifacts outside {folder} ({shown}): reading or writing them would "
            "reach a place this project did not make. If the store is yours, move those artifacts into "
            f"{folder / 'mlartifacts'} and correct the store; if not, delete mlflow.db and mlartifacts/ to start "
            "a new store. Nothing was run."
        )


def _inside(location: str, own: Path) -> bool:
    """Whether an artifact location is empty, a reference through the store, or a place in `own`."""
    if not location or location.startswith(REFERENCES):
        return True
    if location.startswith("mlflow-artifacts:") and not urllib.parse.urlsplit(location).netloc:
        return True  # the server's own artifacts (`mlflow ui` locates its Default experiment there); no host
    if location.startswith("file:"):
        parts = urllib.parse.urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            return False
        location = urllib.parse.unquote(parts.path)
    if not location.startswith("/"):
        return False  # s3://, mlflow-artifacts:, http://, a path relative to wherever MLflow runs
    place = os.path.normpath(location)
    if os.path.commonpath([place, str(own)]) == str(own):
        return True
    real_own = os.path.realpath(own)  # the same folder by another name (a symbolic link)
    return os.path.commonpath([os.path.realpath(place), real_own]) == real_own
