"""The recipe on real ImageNet weights and real pictures: Fashion-MNIST with EfficientNet-Lite.

    python benchmarks/real.py                      # 100 and 1000 training pictures per class (half an hour on 2 cores)
    python benchmarks/real.py --per-class 100      # one size (about 6 minutes)
    python benchmarks/real.py --quick              # 30 per class, 2 epochs: checks every row in about 3 minutes

For each size, in a temporary copy of the pipeline (`ops.demo.make_workspace`), with params.yaml's
defaults but for REAL below (the data, EfficientNet-Lite0 at 64x64, the ensemble of Lite0/1/2, no
exports; at 1000 per class fewer epochs for fine-tuning and the baseline, see `overrides`):

- every stage run on its own (`dvc repro --single-item`, in dvc.yaml's order), timed as a whole
  process: the time each stage takes on this machine, fixed costs included;
- test accuracy, log loss and ECE of the four models (reports/models.csv), and of each ensemble
  member alone (the ensemble's head trained on that member's features only);
- featurize and fine-tuning pictures per second (MLflow's `images_per_second` of featurize; the
  fine-tuning epochs' span in MLflow) against plain Keras on the same pictures held in memory
  (`model.predict` of the same extractor; `model.fit` of the same fine-tuning model, second epoch);
- the label audit's precision at N: N labels of the training and validation pictures moved to
  another class at random before `prepare`, and how many of the audit's N most suspect pictures are
  those (1.0: each one found; chance is N / pictures audited).

Prints one markdown table per size (docs/real.md keeps them). Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# The checkout, for its tests/ and benchmarks/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model
from classifier.data import fashion_mnist, pictures
from ops import demo
from tests.workspace import GIT_ENV

#: What the measured pipelines change in params.yaml, whatever the size.
REAL: dict[str, Any] = demo.merge(
    demo.FASHION_MNIST_64,
    {
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet"},
        "ensemble": {
            "backbones": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
            "weights": "imagenet",
        },
        "evaluate": {"registered_model": None},
        "export": {"formats": []},
    },
)

#: The four models of reports/models.csv, in the table's order.
MODELS = ("baseline", "top", "finetuned", "ensemble")


def overrides(per_class: int, quick: bool) -> dict[str, Any]:
    """REAL at `per_class` training pictures per class, validation and test 40% of that each."""
    held = max(2, round(per_class * 0.4))
    out = demo.merge(
        REAL,
        {
            "data": {
                "split": {"train": per_class, "validation": held, "test": held},
                "fashion_mnist": {"per_class": per_class + 2 * held},
            }
        },
    )
    if per_class >= 1000:  # 50 epochs of 10,000 pictures would take hours on a CPU
        out = demo.merge(out, {"finetune": {"epochs": 10}, "baseline": {"epochs": 20}})
    if quick:
        out = demo.merge(out, {"top": {"epochs": 2}, "finetune": {"epochs": 2}, "baseline": {"epochs": 2}})
    return out


def dvc(workspace: Path, env: dict, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=workspace, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"dvc {' '.join(args)} failed in {workspace}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def stage_names(workspace: Path, env: dict) -> list[str]:
    """Every stage, foreach items expanded, in dvc.yaml's order (which is the pipeline's)."""
    listed = dvc(workspace, env, "stage", "list", "--name-only").split()
    return [name for name in listed if name]


def run_stages(workspace: Path, env: dict) -> dict[str, float]:
    """Each stage run on its own, in order: {stage: wall seconds}."""
    seconds = {}
    for name in stage_names(workspace, env):
        started = time.perf_counter()
        dvc(workspace, env, "repro", "--single-item", name)
        seconds[name] = time.perf_counter() - started
        print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
    return seconds


def mlflow_rows(workspace: Path, query: str, *args: Any) -> list[tuple]:
    with sqlite3.connect(workspace / "mlflow.db") as db:
        return db.execute(query, args).fetchall()


def stage_metric(workspace: Path, stage: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp in ms) of a metric of the stage's MLflow run."""
    return mlflow_rows(
        workspace,
        "SELECT m.step, m.value, m.timestamp FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
        "WHERE r.name = ? AND m.key = ? ORDER BY m.step",
        stage,
        key,
    )


def plain_keras(workspace: Path, params: Any) -> dict[str, float]:
    """Pictures per second of plain Keras on the same pictures in memory: the same feature extractor's
    `predict`, and the same fine-tuning model's `fit` (its second epoch)."""
    import keras
    import numpy as np

    from classifier.model import backbones, devices, finetuning, images

    devices.start(params.deterministic)
    keras.utils.set_random_seed(params.seed)
    policy = devices.precision_policy(params.precision)
    train = images.load_split(workspace / "data" / "prepared", "train")
    x = np.concatenate(list(images.images_only(train.paths, params.data.image_size, 256)))
    devices.set_policy(policy)
    base = backbones.build_backbone(params.model.backbone, params.model.weights, params.data.image_size)
    extractor = backbones.feature_extractor(base, params.model.backbone)
    extractor.predict(x[:64], batch_size=params.featurize.batch_size, verbose=0)
    started = time.perf_counter()
    extractor.predict(x, batch_size=params.featurize.batch_size, verbose=0)
    featurize = len(x) / (time.perf_counter() - started)
    top = keras.saving.load_model(workspace / "models" / "top.keras")
    model, _ = finetuning.assemble(params, workspace / "models" / "backbone.weights.h5", top, len(train.classes))
    sgd = keras.optimizers.SGD(params.finetune.learning_rate, momentum=params.finetune.momentum)
    model.compile(sgd, "sparse_categorical_crossentropy")
    model.fit(x, train.labels, batch_size=params.finetune.batch_size, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(x, train.labels, batch_size=params.finetune.batch_size, epochs=1, verbose=0)
    fit = len(x) / (time.perf_counter() - started)
    devices.set_policy("float32")
    return {"featurize": featurize, "finetune": fit}


def member_scores(workspace: Path, params: Any) -> dict[str, dict[str, float]]:
    """Each ensemble member alone: the ensemble's head (train_top's params) on that member's cached
    features only, scored on the test split as the ensemble stage scores its own."""
    from classifier.model import bottleneck, training

    out = {}
    for backbone in params.ensemble.backbones:
        folder = workspace / "data" / "ensemble" / backbone
        classes = json.loads((folder / bottleneck.META).read_text())["classes"]
        data = [bottleneck.load_features(folder, split) for split in ("train", "validation", "test")]
        with contextlib.redirect_stdout(sys.stderr):  # Keras's epoch lines: progress, not the table
            head, _ = training.train_top(data[0], data[1], len(classes), params.top, params.seed, "flatten")
        _, metrics = training.score_head(head, data[2], classes, params.evaluate.threshold)
        out[backbone] = metrics["test"]
    return out


def pipeline_rates(workspace: Path, train_pictures: int) -> dict[str, float]:
    """The pipeline's own pictures per second: featurize's logged rate, and fine-tuning's epochs
    after the first (whose graph building is not counted), from their MLflow timestamps."""
    featurize = stage_metric(workspace, "featurize", "images_per_second")[-1][1]
    epochs = stage_metric(workspace, "finetune", "finetune.loss")
    seconds = (epochs[-1][2] - epochs[0][2]) / 1000
    return {"featurize": featurize, "finetune": train_pictures * (len(epochs) - 1) / seconds}


def audit_precision(root: Path, params_overrides: dict, env: dict, seed: int = 0) -> dict[str, float]:
    """Precision at N of the label audit, with labels moved at random before `prepare` (module doc)."""
    folder = root / "flipped"
    cache = root / "cache"
    per_class = params_overrides["data"]["fashion_mnist"]["per_class"]
    from classifier.params import FashionMnistParams

    fashion_mnist.lay_out(folder, FashionMnistParams(per_class), cache)
    files = sorted(p for p in folder.rglob("*.png"))
    rng = random.Random(seed)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    wrong = set()  # the moved pictures, by the sha256 prepare's manifest gives them
    for path in rng.sample(files, k=max(2, len(files) // 20)):  # 5% of the pictures
        other = rng.choice([c for c in classes if c != path.parent.name])
        path = path.rename(folder / other / path.name)
        wrong.add(pictures.sha256(pictures.decode(path, params_overrides["data"]["max_side"]).image))
    # Classes no longer hold the same number of pictures: the split's counts, as fractions.
    fractions = {name: n / per_class - 1e-4 for name, n in params_overrides["data"]["split"].items()}
    flipped_source = demo.merge(params_overrides, {"data": {"source": str(folder), "split": fractions}})
    workspace = demo.make_workspace(root / "audit", flipped_source, git=True)
    audit_env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    dvc(workspace, audit_env, "repro", "audit")
    with open(workspace / "reports" / "audit" / "suspects.csv", newline="", encoding="utf-8") as f:
        suspects = list(csv.DictReader(f))
    with open(workspace / "data" / "prepared" / "manifest.csv", newline="", encoding="utf-8") as f:
        sha_of = {Path(row["path"]).name: row["sha256"] for row in csv.DictReader(f)}  # names are unique
    moved = [sha_of[Path(row["picture"]).name] in wrong for row in suspects]
    n = sum(moved)
    found = sum(moved[:n])
    return {"flipped": n, "audited": len(suspects), "precision": found / n if n else float("nan")}


def measure(per_class: int, quick: bool) -> None:
    from classifier import config

    env = demo.pipeline_env(**GIT_ENV)
    with tempfile.TemporaryDirectory(prefix="real-") as tmp:
        root = Path(tmp)
        chosen = overrides(per_class, quick)
        workspace = demo.make_workspace(root / "pipeline", chosen, git=True)
        env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
        print(f"{per_class} per class: {workspace}", file=sys.stderr, flush=True)
        seconds = run_stages(workspace, env)
        params = config.parse(yaml.safe_load((workspace / "params.yaml").read_text()))
        with open(workspace / "reports" / "models.csv", newline="", encoding="utf-8") as f:
            rows = {row["model"]: row for row in csv.DictReader(f)}
        members = member_scores(workspace, params)
        ours = pipeline_rates(workspace, per_class * 10)
        plain = plain_keras(workspace, params)
        audit = audit_precision(root, chosen, env)
        shutil.rmtree(root / "audit", ignore_errors=True)

    split = chosen["data"]["split"]
    side = params.data.image_size[0]
    print(
        f"\n### {per_class} training pictures per class ({split['train']}/{split['validation']}/{split['test']} "
        f"per class, 10 classes, {side}x{side}, precision {params.precision})\n"
    )
    print("| model | test accuracy | test log loss | ECE |\n|---|---|---|---|")
    for name in MODELS:
        row = rows.get(name)
        if row:
            print(f"| {name} | {float(row['accuracy']):.3f} | {float(row['log_loss']):.3f} | {float(row['ece']):.3f} |")
    for backbone, m in members.items():
        print(f"| ensemble member {backbone} alone | {m['accuracy']:.3f} | {m['log_loss']:.3f} | {m['ece']:.3f} |")
    print(
        f"\nLabel audit: {audit['flipped']} of {audit['audited']} training and validation labels moved to another "
        f"class at random; precision at {audit['flipped']}: {audit['precision']:.2f} "
        f"(chance {audit['flipped'] / audit['audited']:.2f})\n"
    )
    print("| pictures per second | pipeline | plain Keras | ratio |\n|---|---|---|---|")
    for what in ("featurize", "finetune"):
        print(f"| {what} | {ours[what]:.0f} | {plain[what]:.0f} | {ours[what] / plain[what]:.2f} |")
    print("\n| stage | seconds |\n|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} |")
    print(f"| all | {sum(seconds.values()):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[100, 1000], help="training pictures per class")
    parser.add_argument("--quick", action="store_true", help="30 per class, 2 epochs: every row, in minutes")
    args = parser.parse_args()
    if fashion_mnist.local_copy() is None:  # each copy of the pipeline has a data/cache of its own
        sys.exit("needs Fashion-MNIST on this machine: apt-get install dataset-fashion-mnist")
    sizes = [30] if args.quick else args.per_class
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}\n")
    for per_class in sizes:
        measure(per_class, args.quick)


if __name__ == "__main__":
    main()
