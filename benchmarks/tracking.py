"""What MLflow logging adds to `dvc repro`, per stage, the ways a stage can log.

    python benchmarks/tracking.py                 # the tiny config; prints a table
    python benchmarks/tracking.py --demo          # and the generated stripes' config (benchmarks/caching.py, minutes)
    python benchmarks/tracking.py --team          # and a team stack (ops/team), the tiny config

The ways: `off` (PIPELINE_TRACKING=off, nothing logged), `in-process` (the stage imports MLflow
itself when its run opens: the stages' `tracking.start_worker` calls removed from the workspace's
copy) and `worker` (what the stages do: a child process imports MLflow while the stage works and
does its logging). Each way runs a first `dvc repro`, which makes the store, then `--rounds` times
`dvc repro --force` on that existing store; the table gives the mean of those, and what logging
adds per stage run against `off`. The tiny config (32x32 images, random weights, 1-2 epochs) is
where the fixed costs of logging weigh the most. Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The checkout, for its tests/ and benchmarks/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.caching import STRIPES
from ops import demo
from ops.code import ROOT
from tests.conftest import TINY

WAYS = ("off", "in-process", "worker")


def repro(workspace: Path, way: str, force: bool, login: dict[str, str] | None = None) -> tuple[float, int]:
    """Seconds of one `dvc repro` in `workspace` and the number of stages it ran."""
    env = demo.pipeline_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}", PIPELINE_TRACKING="off" if way == "off" else "on"
    )
    env.update(login or {})
    started = time.perf_counter()
    done = subprocess.run(
        demo.DVC + ["repro", *(["--force"] if force else [])],
        cwd=workspace,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - started, len(re.findall(r"^Running stage ", done.stdout, re.MULTILINE))


def workspace_for(where: Path, way: str, overrides: dict) -> Path:
    """The pipeline in `where`; for `in-process`, its stages start no worker."""
    workspace = demo.make_workspace(where, overrides)
    if way == "in-process":
        for stage in (workspace / "stages").glob("*.py"):
            text = stage.read_text()
            stage.write_text(text.replace("tracking.start_worker(", "(lambda stage: None)("))
    return workspace


def team_login(tmp: Path) -> dict[str, str]:
    """A team stack brought up in `tmp` and a login on it: the exports of the member's file."""
    root = tmp / ".team"
    tmp.chmod(0o711)  # as root, PostgreSQL runs as another user, who must reach its folder
    for args in (["up"], ["add-user", "bench"]):
        command = [sys.executable, "-m", "ops.team", "--dir", str(root), *args]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return dict(re.findall(r"^export (\w+)=(.*)$", (root / "members" / "bench.env").read_text(), re.MULTILINE))


def measure(tmp: Path, config: str, overrides: dict, rounds: int, login: dict[str, str] | None) -> list[tuple]:
    rows = []
    for way in WAYS:
        workspace = workspace_for(tmp / f"{config}-{way}".replace(" ", "-"), way, overrides)
        first, _ = repro(workspace, way, force=False, login=login)
        again = [repro(workspace, way, force=True, login=login) for _ in range(rounds)]
        rows.append((config, way, first, statistics.mean(s for s, _ in again), again[0][1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="also the stripes' config (a few minutes a run)")
    parser.add_argument("--team", action="store_true", help="also the tiny config logging to a team stack")
    parser.add_argument("--rounds", type=int, default=2, help="`dvc repro --force` runs per way (default 2)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    rows = []
    try:
        rows += measure(tmp, "tiny", TINY, args.rounds, None)
        if args.demo:
            rows += measure(tmp, "demo", STRIPES, 1, None)
        if args.team:
            rows += measure(tmp, "tiny, team", TINY, args.rounds, team_login(tmp))
    finally:
        if args.team and (tmp / ".team").exists():
            subprocess.run(
                [sys.executable, "-m", "ops.team", "--dir", str(tmp / ".team"), "down"], cwd=ROOT, check=False
            )
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| config | logging | first repro (s) | repro --force (s) | stages | added per stage (s) |")
    print("|---|---|---:|---:|---:|---:|")
    off = {config: again for config, way, _, again, _ in rows if way == "off"}
    for config, way, first, again, stages in rows:
        added = (again - off[config]) / stages if stages else 0.0
        print(f"| {config} | {way} | {first:.1f} | {again:.1f} | {stages} | {added:+.2f} |")


if __name__ == "__main__":
    main()
