"""What MLflow logging adds to a tiny `dvc repro`: the same pipeline with tracking on and off.

    python benchmarks/tracking.py            # both, in temporary projects; prints a table
    python benchmarks/tracking.py --team     # and a third, logging to a team stack (stages/team.py)

Tracking on logs to an sqlite store in the project (the default); off is PIPELINE_TRACKING=off.
With --team, a new team stack (PostgreSQL, S3, the MLflow server with logins) is brought up in a
temporary folder, a login made for the run, and the stack stopped at the end.
Both run the test suite's tiny configuration (32x32 images, random weights, 1-2 epochs), where
the fixed costs of logging weigh the most. Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import demo
from tests.conftest import TINY

ROOT = demo.ROOT


def repro(workspace: Path, tracking: bool, login: dict[str, str] | None = None) -> float:
    """Seconds of a first `dvc repro` in `workspace`; `login`: the exports of a team member's file."""
    env = demo.pipeline_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}", PIPELINE_TRACKING="on" if tracking else "off"
    )
    env.update(login or {})
    started = time.perf_counter()
    subprocess.run(demo.DVC + ["repro", "-q"], cwd=workspace, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def team_login(tmp: Path) -> dict[str, str]:
    """A team stack brought up in `tmp` and a login on it: the exports of the member's file."""
    root = tmp / ".team"
    tmp.chmod(0o711)  # as root, PostgreSQL runs as another user, who must reach its folder
    for args in (["up"], ["add-user", "bench"]):
        command = [sys.executable, "-m", "stages.team", "--dir", str(root), *args]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return dict(re.findall(r"^export (\w+)=(.*)$", (root / "members" / "bench.env").read_text(), re.MULTILINE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--team", action="store_true", help="also log to a team stack brought up for the run")
    args = parser.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    try:
        for name in ("off", "sqlite") + (("team server",) if args.team else ()):
            login = team_login(tmp) if name == "team server" else None
            workspace = demo.make_workspace(tmp / name.replace(" ", "-"), TINY)
            rows.append((name, repro(workspace, name != "off", login)))
    finally:
        if args.team and (tmp / ".team").exists():
            subprocess.run(
                [sys.executable, "-m", "stages.team", "--dir", str(tmp / ".team"), "down"], cwd=ROOT, check=False
            )
        shutil.rmtree(tmp, ignore_errors=True)
    off = rows[0][1]
    print(f"\n{'tracking':<13}{'dvc repro (s)':>15}{'added (s)':>11}")
    for name, seconds in rows:
        print(f"{name:<13}{seconds:>15.1f}{seconds - off:>+11.1f}   ({(seconds - off) / off:+.0%})")
    print("six stage runs, a pipeline version, a registered model; baseline and ensemble switched off")


if __name__ == "__main__":
    main()
