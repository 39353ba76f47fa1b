"""What MLflow logging adds to a tiny `dvc repro`: the same pipeline with tracking on and off.

    python benchmarks/tracking.py            # both, in temporary projects; prints a table

Tracking on logs to an sqlite store in the project (the default); off is PIPELINE_TRACKING=off.
Both run the test suite's tiny configuration (32x32 images, random weights, 1-2 epochs), where
the fixed costs of logging weigh the most. Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import demo
from tests.conftest import TINY


def repro(workspace: Path, tracking: bool) -> float:
    env = demo.pipeline_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}", PIPELINE_TRACKING="on" if tracking else "off"
    )
    started = time.perf_counter()
    subprocess.run(demo.DVC + ["repro", "-q"], cwd=workspace, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tracking in (False, True):
            workspace = demo.make_workspace(Path(tmp) / ("on" if tracking else "off"), TINY)
            rows.append(("on" if tracking else "off", repro(workspace, tracking)))
    off, on = rows[0][1], rows[1][1]
    print(f"\n{'tracking':<10}{'dvc repro (s)':>15}")
    for name, seconds in rows:
        print(f"{name:<10}{seconds:>15.1f}")
    print(
        f"{'added':<10}{on - off:>15.1f}   ({(on - off) / off:+.0%}, "
        "six stage runs, a pipeline version, a registered model; baseline and ensemble switched off)"
    )


if __name__ == "__main__":
    main()
