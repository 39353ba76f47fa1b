"""What each stage pays before its work: its imports and its MLflow worker, on the tests' tiny pipeline.

    python -m benchmarks.stages            # about 6 minutes on 2 cores; prints a markdown table

Builds the tests' tiny pipeline in a temporary git repository, reproduces it once, then runs each
stage's own command (`dvc.yaml`'s cmd) again in it, three ways, each the median of --rounds:

- wall: the stage as DVC runs it, tracking on (its MLflow worker started beside it);
- tracking off: the same with PIPELINE_TRACKING=off (no worker, no MLflow);
- imports: what `python -X importtime` counts for the stage's process (cumulative, top-level
  packages), and whether TensorFlow and Keras are among them.

The difference between the first two is what logging costs the stage; a stage that computes nothing
with Keras should import neither TensorFlow nor Keras.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ops import demo
from tests.conftest import TINY
from tests.workspace import GIT_ENV

#: Packages whose import time the table shows.
HEAVY = ("tensorflow", "keras", "mlflow", "jax", "sklearn", "pandas", "matplotlib", "PIL")


def commands(workspace: Path) -> dict[str, list[str]]:
    """Each stage's command, as dvc.yaml gives it (foreach stages have none in the tiny pipeline)."""
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    return {name: shlex.split(spec["cmd"]) for name, spec in stages.items() if "cmd" in spec}


def timed(command: list[str], workspace: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stderr


def imports(stderr: str) -> dict[str, float]:
    """Seconds of cumulative import time of each top-level package in HEAVY, from -X importtime."""
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)$", line)
        if match and match.group(3) in HEAVY:
            found[match.group(3)] = max(found.get(match.group(3), 0.0), int(match.group(1)) / 1e6)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = demo.make_workspace(Path(tmp) / "repo", TINY, git=True)
        env = demo.pipeline_env(**GIT_ENV, MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
        subprocess.run(["git", "add", "-A"], cwd=workspace, env=env, check=True)
        subprocess.run(["git", "commit", "-qm", "pipeline"], cwd=workspace, env=env, check=True)
        subprocess.run(demo.DVC + ["repro"], cwd=workspace, env=env, check=True, capture_output=True)
        off = env | {"PIPELINE_TRACKING": "off"}
        print(
            "| stage | wall, tracking on | tracking off | logging costs | TensorFlow + Keras imported | MLflow, off |"
        )
        print("|---|---|---|---|---|---|")
        for name, command in commands(workspace).items():
            command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
            on = statistics.median(timed(command, workspace, env)[0] for _ in range(args.rounds))
            without = statistics.median(timed(command, workspace, off)[0] for _ in range(args.rounds))
            _, stderr = timed([command[0], "-X", "importtime", *command[1:]], workspace, off)
            seen = imports(stderr)
            keras = seen.get("tensorflow", 0.0) + seen.get("keras", 0.0)
            print(
                f"| {name} | {on:.1f} s | {without:.1f} s | {on - without:+.1f} s | "
                f"{f'{keras:.1f} s' if keras else 'no'} | {'imported' if 'mlflow' in seen else 'no'} |"
            )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
