"""What every stage's `main()` shares: logging, clear errors instead of tracebacks, atomic writes.

An output is first written under a temporary name next to its final place and then renamed, so
an interrupted stage never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """The project folder: DVC says where it is (a queued experiment runs in a temporary copy)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


class StageError(RuntimeError):
    """A problem the user can fix (bad input, missing data, no network); shown without a traceback."""


def run(main: Callable[[], None]) -> None:
    """Run a stage's main() with logging set up; known problems exit 2 with their message only."""
    from stages.config import ParamsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (StageError, ParamsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes), dir=path.parent)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: Any, path: str | Path) -> None:
    """`model.save` to a temporary .keras file, then rename into place."""
    with atomic_path(path) as tmp:
        model.save(tmp)
