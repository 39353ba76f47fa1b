"""How the stages write outputs: atomically (a temporary name, then a rename) and byte-stable.

The same inputs, params and seed give the same bytes, so DVC's content hashes and run-cache do
their job: a .keras file is rewritten without the time it was saved or memory addresses.

A stage run as several processes writes from process 0 alone: in the others, `atomic_path` and
`atomic_dir` hand out a private temporary place that is removed afterwards, so the same code runs
everywhere and nothing but process 0 touches an output (which may be on a filesystem they share).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from classifier.model import backend


def project_root() -> Path:
    """The project folder: DVC says where it is (a queued experiment runs in a temporary copy)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def keras_home() -> Path:
    """The folder Keras keeps what it downloads in, as Keras finds it: $KERAS_HOME, else ~/.keras,
    else /tmp/.keras where the home folder cannot be written (keras/src/backend/config.py)."""
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


#: Temporary files and folders of unfinished writes start with this (.gitignore ignores them).
TMP_PREFIX = ".tmp-"


def clear_stale(path: Path) -> None:
    """Remove what an interrupted earlier write of `path` left beside it."""
    for stale in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success rename it over `path`."""
    path = Path(path)
    if not backend.cluster().writes:
        with _discarded() as private:
            yield private / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as Keras want to create the file themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    if not backend.cluster().writes:
        with _discarded() as private:
            (private / path.name).mkdir()
            yield private / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def _discarded() -> Iterator[Path]:
    """A private temporary directory, removed afterwards: where a process other than 0 writes."""
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _number_shared_objects(config: Any, numbers: dict[Any, int]) -> Any:
    """`config` with each `shared_object_id` replaced by its order of first appearance (the same
    object keeps the same number, so sharing survives)."""
    if isinstance(config, dict):
        return {
            key: numbers.setdefault(value, len(numbers))
            if key == "shared_object_id"
            else _number_shared_objects(value, numbers)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_number_shared_objects(item, numbers) for item in config]
    return config


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


#: The model file in a stage's model folder (models/frozen, models/baseline, models/ensemble).
MODEL = "model.keras"


#: The timestamp every member of a saved model gets: the earliest a zip file can hold.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_model(model: Any, path: str | Path) -> None:
    """`model.save` to a temporary .keras file, made byte-stable, then renamed into place.

    Keras writes the time of saving into a .keras file (`date_saved` in metadata.json and the
    zip members' timestamps) and the memory addresses of shared objects into its config
    (`shared_object_id`): the same weights would get a new content hash on every save, and DVC
    would run everything downstream again. The file is rewritten without them.
    """
    with atomic_path(path) as tmp:
        model.save(tmp)
        with atomic_path(tmp) as stable:
            reproducible_keras_file(tmp, stable)


def reproducible_keras_file(source: Path, dest: Path) -> None:
    """Copy the .keras archive `source` to `dest` without the time it was saved, and with shared
    objects numbered in order of appearance instead of by memory address."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(_number_shared_objects(json.loads(data), {})).encode()
            member = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            member.compress_type = info.compress_type
            member.external_attr = info.external_attr
            zout.writestr(member, data)


#: The first characters that make a spreadsheet read a cell as a formula, and `'`, which it hides.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(text: str) -> str:
    """A cell of text from a data set (a class name, a file name), as written to a CSV file: text a
    spreadsheet would run as a formula (`=HYPERLINK(...)`, `+...`, `-...`, `@...`) starts with `'`,
    which spreadsheets show as text. `from_csv_text` reads it back."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def from_csv_text(cell: str) -> str:
    """The text `csv_text` wrote as `cell`."""
    return cell.removeprefix("'")
