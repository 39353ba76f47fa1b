"""How a stage or tool runs (`run`): a problem the user can fix is one line and exit 2, a
signal cleans up unfinished writes, and log lines read `12:34:56 module: message`."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classifier.errors import StageError


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that unfinished writes are cleaned up."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def configure_logging() -> None:
    """INFO and above to stderr, as `12:34:56 classifier.model.bottleneck: message`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


#: Defaults (a value already in the environment wins) that keep noise out of a user's terminal, set
#: before TensorFlow or MLflow load: TensorFlow's C++ start-up notices (oneDNN, CPU instructions,
#: absl) and MLflow's artifact-transfer progress bars; and MLflow's usage telemetry, which calls out
#: to the network, off. None of them changes what a stage computes.
QUIET = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def run(main: Callable[[], None]) -> None:
    """Run a stage's or tool's main() with logging set up and QUIET's defaults (the processes it
    starts inherit them); known problems exit 2 with their message only.

    Ctrl-C and SIGTERM stop it with one line (exit 130 and 143): nothing unfinished is kept, since
    outputs get their names only when complete. A full disk is reported as such.
    """
    from classifier.config import ParamsError

    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    configure_logging()
    signal.signal(signal.SIGTERM, _terminate)
    name = Path(sys.argv[0]).stem
    try:
        main()
    except (StageError, ParamsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except PermissionError as err:
        what = err.filename or "a file"
        print(
            f"error: permission denied on {what}: {err.strerror}. Give your user access to it (`ls -l` shows its "
            "owner and mode), or run as the user who owns it.",
            file=sys.stderr,
        )
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as err:
        how = "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else "stopped (SIGTERM)"
        print(f"{name}: {how}; nothing unfinished was kept: run it again to redo it", file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"error: no space left on the disk{where}. Free some space (`df -h` shows where), "
            "then run again; nothing unfinished was kept.",
            file=sys.stderr,
        )
        sys.exit(2)
