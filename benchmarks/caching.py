"""What `dvc repro` runs, and how long it takes, when little or nothing changed.

    python benchmarks/caching.py              # the generated stripes, random weights (a few minutes for the first run)
    python benchmarks/caching.py --tiny       # the test suite's tiny config (about a minute)

Builds the pipeline in a temporary git repository (tracking to an sqlite store there), runs it
once, commits, then times, each from the state the previous one left:

- a no-op `dvc repro`;
- `dvc repro` after a comment is added to the MLflow code (ops/tracking/runs.py): nothing runs;
- `dvc repro` after a comment is added to the figures' code (classifier/metrics/figures.py): evaluate;
- `dvc exp run` with another finetune.learning_rate, then back to the committed one;
- `dvc repro --force --single-item train_top` (a retrain with identical params), then `dvc repro`.

Prints a table of the stages each command ran and restored from the run-cache, and its wall
time. Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# The checkout, for its tests/ and benchmarks/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import demo
from tests.conftest import TINY
from tests.workspace import GIT_ENV, ran_stages, restored_stages


def timed(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def summary(output: str) -> tuple[str, str]:
    return ", ".join(ran_stages(output)) or "none", ", ".join(restored_stages(output)) or "none"


#: The config the tables of docs/parameters.md and docs/experiments.md were measured on: the generated
#: stripes at 96x96, VGG16 and an ensemble of VGG16 and MobileNetV2, all with random weights.
STRIPES: dict = demo.merge(
    demo.DEMO_GENERATED,
    {
        "model": {"backbone": "vgg16", "weights": None},
        "ensemble": {"backbones": ["vgg16", "mobilenet_v2"], "weights": None},
    },
)


def git(args: list[str], cwd: Path, env: dict) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny config instead of STRIPES")
    args = parser.parse_args()
    overrides = TINY if args.tiny else STRIPES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = demo.make_workspace(Path(tmp) / "repo", overrides, git=True)
        env = demo.pipeline_env(**GIT_ENV, MLFLOW_TRACKING_URI=f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        git(["add", "-A"], workspace, env)
        git(["commit", "-qm", "pipeline"], workspace, env)
        rate = yaml.safe_load((workspace / "params.yaml").read_text())["finetune"]["learning_rate"]

        def measure(what: str, command: list[str]) -> None:
            seconds, output = timed(command, workspace, env)
            rows.append((what, *summary(output), seconds))
            print(f"{what}: {seconds:.1f} s", file=sys.stderr)

        measure("first dvc repro", demo.DVC + ["repro"])
        git(["add", "-A"], workspace, env)
        git(["commit", "-qm", "reproduced"], workspace, env)
        measure("no-op dvc repro", demo.DVC + ["repro"])
        for module in ("ops/tracking/runs.py", "classifier/metrics/figures.py"):
            source = workspace / module
            source.write_text(source.read_text() + "\n# a comment\n")
            measure(f"comment in {module}", demo.DVC + ["repro"])
            git(["checkout", module], workspace, env)
            measure("dvc repro, the comment taken back", demo.DVC + ["repro"])
        measure(
            f"exp run finetune.learning_rate={rate * 2:g}",
            demo.DVC + ["exp", "run", "-S", f"finetune.learning_rate={rate * 2:g}"],
        )
        measure(f"exp run back to {rate:g}", demo.DVC + ["exp", "run", "-S", f"finetune.learning_rate={rate:g}"])
        measure("repro --force --single-item train_top", demo.DVC + ["repro", "--force", "--single-item", "train_top"])
        measure("dvc repro after it", demo.DVC + ["repro"])

    width, ran_width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'command':<{width}}  {'ran':<{ran_width}}  {'restored from run-cache':<24}  {'wall (s)':>8}")
    for what, ran, restored, seconds in rows:
        print(f"{what:<{width}}  {ran:<{ran_width}}  {restored:<24}  {seconds:>8.1f}")


if __name__ == "__main__":
    main()
