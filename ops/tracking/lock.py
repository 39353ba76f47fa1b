"""The file lock that serialises writes to an sqlite store across processes (parallel experiments,
a stage and its worker share one store): `<store>.lock` beside it, held with flock."""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path

#: The stores whose lock this process holds, with the thread that took it.
_HELD: set[tuple[Path, int]] = set()


@contextlib.contextmanager
def held(path: Path | None) -> Iterator[None]:
    """Hold the lock of the sqlite store at `path` (None: no store to lock). A thread that holds it
    already takes it again at once (a second flock of the same file in one process would wait for
    itself)."""
    if path is None or (path, threading.get_ident()) in _HELD:
        yield
        return
    mine = (path, threading.get_ident())
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD.add(mine)
        try:
            yield
        finally:
            _HELD.discard(mine)
            fcntl.flock(handle, fcntl.LOCK_UN)
