"""The pipeline against plain Keras (and plain Pillow, plain DVC) on this machine: one markdown table.

    python benchmarks/bench.py                 # make bench: about 5 minutes on an idle 2-core CPU
    python benchmarks/bench.py --quick         # 64x64, fewer images, one round: checks every row, 2-3 minutes
    python benchmarks/bench.py --device gpu    # the low precision is float16 instead of bfloat16

Every figure comes with a reference measured in the same run, and their ratio:

- featurize: `featurize.write_features` reading the prepared JPEG files (tf.data decoding and
  resizing, `predict_on_batch`, the features streamed to disk) vs `model.predict` on the same
  images already decoded into a numpy array; VGG16 at 150x150, random weights, batch 32.
- finetune: `model.fit` on the stage's `images.dataset` (shuffled, decoded on the fly) vs
  `model.fit(x, y)` on the same images in memory; the same model (`finetune.assemble`: backbone,
  head, augmentation, block5 unfrozen, SGD), batch 16. The first batch (graph building) is not timed.
- low precision (mixed_bfloat16 on a CPU, mixed_float16 on a GPU) vs float32: plain predict and
  plain fit, and how far the low-precision features are from the float32 ones.
- prepare: the stage on generated 500x375 photos, all cores, vs a one-process Pillow loop
  (open, convert to RGB, thumbnail, save as JPEG) on the same files; and their peak memory.
- no-op `dvc repro` on the tests' tiny pipeline vs `dvc --version` (DVC's fixed start-up cost).
- the tiny pipeline's first `dvc repro` with MLflow tracking on vs PIPELINE_TRACKING=off.

The TensorFlow figures are the best of interleaved rounds (pipeline, plain float32, plain low
precision, in turn), so that load from elsewhere on the machine weighs on all of them alike.
TensorFlow op determinism is on, as in the stages (params.yaml: deterministic: true). Progress goes
to stderr; the header line and the table to stdout. Nothing here is a pass/fail threshold: the
targets are shown in a column, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Only modules without TensorFlow here: prepare's worker processes are spawned, and each one
# imports this script again. TensorFlow, Keras and the test helpers are imported where used.
# The checkout, for its tests/ and benchmarks/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model
from benchmarks.prepare import generate
from classifier import config
from classifier.data import cleaning, pictures

BACKBONE = "vgg16"
PHOTO_SIZE = (500, 375)  # generated photos, as in benchmarks/prepare.py
LOW_PRECISION = {"cpu": "mixed_bfloat16", "gpu": "mixed_float16"}
TARGET = "≥ 0.95"


@dataclass(frozen=True)
class Sizes:
    image_size: int  # the model's input side: the stage's default, 150 (smaller with --quick)
    photos: int  # generated for prepare; its train split (half of them) feeds featurize and finetune
    featurize_images: int  # timed per round, for the pipeline, float32 predict and low-precision predict each
    finetune_batches: int  # timed per round and way of training, after one untimed warm-up batch
    rounds: int  # interleaved rounds of the TensorFlow measurements; the best counts
    repeats: int  # of each DVC command of the no-op row (median)


FULL = Sizes(image_size=150, photos=400, featurize_images=64, finetune_batches=3, rounds=2, repeats=3)
QUICK = Sizes(image_size=64, photos=128, featurize_images=32, finetune_batches=2, rounds=1, repeats=1)


@dataclass(frozen=True)
class Row:
    figure: str
    reference: str
    ratio: float
    note: str  # what the reference is, the unit, anything to read the figures by
    target: str = "—"


@dataclass
class Bench:
    """What the rows share: the prepared photos, the model's parts, and the float32 figures the
    low-precision rows compare with."""

    sizes: Sizes
    device: str
    work: Path
    params: config.Params
    prepared: Path | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def low(self) -> str:
        return LOW_PRECISION[self.device]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.sizes.image_size, self.sizes.image_size)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_params(sizes: Sizes) -> config.Params:
    """The defaults (batch sizes, augmentation, SGD, op determinism), VGG16 with random weights, and
    half of each class's photos to train (which featurize and finetune read), a fifth each to
    validate and test."""
    per_class = sizes.photos // 2
    data = {
        "image_size": [sizes.image_size, sizes.image_size],
        "split": {"train": per_class // 2, "validation": per_class // 5, "test": per_class // 5},
    }
    return config.parse({"model": {"backbone": BACKBONE, "weights": None}, "data": data})


# --- memory -------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Linux: the peak RSS (VmHWM) starts again from the current RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak RSS since `reset_peak_rss` (since it started where that is not possible)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- prepare ------------------------------------------------------------------------------------


def pillow_loop(files: list[Path], out: Path, max_side: int) -> None:
    """The plain reference: open, RGB, shrink, JPEG, one file after the other in one process."""
    out.mkdir(parents=True)
    for i, path in enumerate(files):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        image.thumbnail((max_side, max_side))
        image.save(out / f"{i:05d}.jpg", quality=pictures.JPEG_QUALITY)


def prepare_rows(bench: Bench) -> tuple[Row, Row]:
    """Speed and peak memory of the prepare stage vs a plain Pillow loop. Runs first: no child
    process has run yet (the workers' peak RSS is the largest child's) and TensorFlow is not loaded."""
    raw = bench.work / "raw"
    progress(f"prepare: generating {bench.sizes.photos} photos of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}")
    generate(raw, bench.sizes.photos, PHOTO_SIZE)
    files = sorted(raw.rglob("*.jpg"))
    data = bench.params.data
    reset_peak_rss()
    started = time.perf_counter()
    pillow_loop(files, bench.work / "pillow", data.max_side)
    plain = len(files) / (time.perf_counter() - started)
    plain_peak = peak_rss_mb()
    progress(f"prepare: Pillow loop {plain:.0f} img/s")
    workers = os.cpu_count() or 1
    bench.prepared = bench.work / "prepared"
    reset_peak_rss()
    started = time.perf_counter()
    report = cleaning.prepare(raw, bench.prepared, data, data.seed, workers=workers)
    stage = len(files) / (time.perf_counter() - started)
    main_peak = peak_rss_mb()
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    progress(f"prepare: the stage {stage:.0f} img/s ({report['images_kept']} kept)")
    staging = bench.work / "staging"
    staging.mkdir()
    started = time.perf_counter()
    for path in files:  # the stage's work on each file, without the worker processes
        cleaning.clean_file(path, path.parent.name, raw, staging, data)
    per_file = len(files) / (time.perf_counter() - started)
    progress(f"prepare: prepare.clean_file alone, in this process, {per_file:.0f} img/s")
    total = main_peak + workers * worker_peak
    speed = Row(
        f"{stage:.0f} img/s",
        f"{plain:.0f} img/s",
        stage / plain,
        f"{len(files)} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, stage with {workers} worker processes (spawned) vs "
        "Pillow open/convert/thumbnail/save in 1 process; the stage keeps a JPEG already within max_side as it is "
        f"(no re-encoding) but decodes it fully and hashes its pixels; its per-file work (prepare.clean_file) alone "
        f"in 1 process: {per_file:.0f} img/s",
    )
    memory = Row(
        f"{total:.0f} MB",
        f"{plain_peak:.0f} MB",
        total / plain_peak,
        f"peak RSS: stage = main {main_peak:.0f} + {workers} × largest worker {worker_peak:.0f} MB (peaks added: "
        "an upper bound); reference = the Pillow loop's process; each includes its Python + imports",
    )
    return speed, memory


# --- TensorFlow ---------------------------------------------------------------------------------


def first_images(bench: Bench, count: int) -> Any:
    """The first `count` images of the prepared train split, as an `images.Split`."""
    from classifier.model import images

    assert bench.prepared is not None, "prepare runs first"
    split = images.load_split(bench.prepared, "train")
    if len(split) < count:
        sys.exit(f"the train split has {len(split)} images, {count} are needed: generate more photos")
    return images.Split(split.paths[:count], split.labels[:count], split.classes)


def finetune_images(bench: Bench) -> int:
    """Images of one `fit` call: one warm-up batch, then the timed ones."""
    return (1 + bench.sizes.finetune_batches) * bench.params.finetune.batch_size


def setup_models(bench: Bench) -> None:
    """Import TensorFlow; build the feature extractor; save its backbone's weights and a head for
    `finetune.assemble`; decode the images the plain references get into memory (untimed)."""
    progress(f"importing TensorFlow, building {BACKBONE} at {bench.image_size[0]}x{bench.image_size[1]}")
    import keras

    from classifier.model import backbones, devices, heads, images

    devices.set_determinism(bench.params.deterministic)
    keras.utils.set_random_seed(bench.params.seed)
    base = backbones.build_backbone(BACKBONE, None, bench.image_size)
    extractor = backbones.feature_extractor(base, BACKBONE)
    weights = bench.work / "backbone.weights.h5"
    base.save_weights(weights)
    pool = heads.head_pool(bench.params.top, BACKBONE)
    top = heads.build_head(tuple(base.output_shape[1:]), 2, bench.params.top, pool)
    split = first_images(bench, max(bench.sizes.featurize_images, finetune_images(bench)))
    batch = bench.params.featurize.batch_size
    x = np.concatenate([np.asarray(b) for b in images.images_only(split.paths, bench.image_size, batch)])
    bench.shared.update(extractor=extractor, weights=weights, top=top, x=x.astype(np.float32), y=split.labels)


@dataclass
class Speed:
    """The best of the rounds: images/s by the wall clock, and CPU time per image (every thread of
    this process: the model's and tf.data's), which load from elsewhere on the machine hardly changes."""

    images_per_second: float = 0.0
    cpu_ms: float = math.inf

    def add(self, images: int, wall: float, cpu: float) -> float:
        self.images_per_second = max(self.images_per_second, images / wall)
        self.cpu_ms = min(self.cpu_ms, 1000 * cpu / images)
        return images / wall


def cpu_note(speeds: dict[str, Speed], *names: str) -> str:
    return "CPU time per image: " + ", ".join(f"{name} {speeds[name].cpu_ms:.0f} ms" for name in names)


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """The global dtype policy while building, compiling and training, as `finetune.finetune` sets it."""
    from classifier.model import devices

    devices.set_policy(policy)
    try:
        yield
    finally:
        devices.set_policy("float32")


def measure_inference(bench: Bench) -> None:
    """Images/s of featurize's loop, plain predict in float32 and plain predict in low precision, on
    the same images: one warm-up batch each, then rounds that run each in turn (the best round counts,
    so load from elsewhere on the machine weighs on all three alike)."""
    from classifier.model import bottleneck, devices

    batch, count = bench.params.featurize.batch_size, bench.sizes.featurize_images
    size, extractor = bench.image_size, bench.shared["extractor"]
    split, x = first_images(bench, count), bench.shared["x"][:count]
    low_model = devices.computing_in(extractor, bench.low)
    progress(f"featurize: warm-up (one batch each of the pipeline, float32 and {bench.low} predict)")
    bottleneck.write_features(extractor, first_images(bench, batch), size, batch, bench.work / "warm.npz")
    extractor.predict(x[:batch], batch_size=batch, verbose=0)
    low_model.predict(x[:batch], batch_size=batch, verbose=0)
    runs: dict[str, Callable[[], Any]] = {
        "pipeline": lambda: bottleneck.write_features(extractor, split, size, batch, bench.work / "train.npz"),
        "plain": lambda: extractor.predict(x, batch_size=batch, verbose=0),
        "low": lambda: low_model.predict(x, batch_size=batch, verbose=0),
    }
    speeds = {name: Speed() for name in runs}
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(bench.sizes.rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name] = run()
            speed = speeds[name].add(count, time.perf_counter() - wall, time.process_time() - cpu)
            progress(f"featurize round {round_ + 1}/{bench.sizes.rounds}: {name} {speed:.2f} img/s")
    fp32, low = (np.asarray(outputs[name], dtype=np.float32) for name in ("plain", "low"))
    bench.shared["inference"] = speeds
    bench.shared["low_difference"] = float(np.linalg.norm(low - fp32) / np.linalg.norm(fp32))


def training_model(bench: Bench, policy: str) -> Any:
    """The fine-tuning model as the stage assembles and compiles it, in `policy`."""
    import keras

    from classifier.model import finetuning, heads

    p = bench.params.finetune
    keras.utils.set_random_seed(bench.params.seed)
    with dtype_policy(policy):
        model, _ = finetuning.assemble(bench.params, bench.shared["weights"], bench.shared["top"], 2)
        heads.compile_classifier(model, keras.optimizers.SGD(learning_rate=p.learning_rate, momentum=p.momentum), 2)
    return model


def fit_once(bench: Bench, model: Any, policy: str, pipeline: bool) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of `fit` after its first batch: on the stage's
    tf.data input (`pipeline`, with the stage's ETA callback) or on in-memory arrays (plain Keras)."""
    import keras

    from classifier.model import devices, eta, images

    p = bench.params.finetune
    count = finetune_images(bench)
    ends: list[tuple[float, float]] = []
    clock = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append((time.perf_counter(), time.process_time()))
    )
    with dtype_policy(policy):
        if pipeline:
            split = first_images(bench, count)
            left = eta.TimeLeft("finetune", 1, count, p.batch_size, devices.device_name(), policy)
            data = images.dataset(split, bench.image_size, p.batch_size, shuffle=True, seed=bench.params.seed)
            model.fit(data, epochs=1, shuffle=False, callbacks=[left, clock], verbose=0)
        else:
            x, y = bench.shared["x"][:count], bench.shared["y"][:count]
            model.fit(x, y, batch_size=p.batch_size, epochs=1, callbacks=[clock], verbose=0)
    return p.batch_size * (len(ends) - 1), ends[-1][0] - ends[0][0], ends[-1][1] - ends[0][1]


def measure_training(bench: Bench) -> None:
    """Training images/s on the pipeline's input, plain in float32 and plain in low precision: one
    model each, then rounds that train each in turn (the best round counts)."""
    progress("finetune: assembling and compiling three models (pipeline, plain float32, plain low precision)")
    models = {
        "pipeline": ("float32", training_model(bench, "float32"), True),
        "plain": ("float32", training_model(bench, "float32"), False),
        "low": (bench.low, training_model(bench, bench.low), False),
    }
    speeds = {name: Speed() for name in models}
    for round_ in range(bench.sizes.rounds):
        for name, (policy, model, pipeline) in models.items():
            speed = speeds[name].add(*fit_once(bench, model, policy, pipeline))
            progress(f"finetune round {round_ + 1}/{bench.sizes.rounds}: {name} ({policy}) {speed:.2f} img/s")
    bench.shared["training"] = speeds


def speed_row(bench: Bench, measured: str, figure: str, reference: str, note: str, target: str = "—") -> Row:
    """`figure` against `reference`, two of the ways `measured` ("inference" or "training") ran."""
    speeds: dict[str, Speed] = bench.shared[measured]
    rounds = f"best of {bench.sizes.rounds} interleaved rounds" if bench.sizes.rounds > 1 else "one round"
    return Row(
        f"{speeds[figure].images_per_second:.2f} img/s",
        f"{speeds[reference].images_per_second:.2f} img/s",
        speeds[figure].images_per_second / speeds[reference].images_per_second,
        f"{note}; {rounds}; {cpu_note(speeds, figure, reference)}",
        target,
    )


def featurize_row(bench: Bench) -> Row:
    return speed_row(
        bench,
        "inference",
        "pipeline",
        "plain",
        f"featurize.write_features over {bench.sizes.featurize_images} prepared JPEGs vs extractor.predict on them "
        f"decoded in memory; float32, batch {bench.params.featurize.batch_size}",
        TARGET,
    )


def finetune_row(bench: Bench) -> Row:
    return speed_row(
        bench,
        "training",
        "pipeline",
        "plain",
        "fit on images.dataset (the JPEG files, shuffled) vs fit(x, y) in memory; the same assembled model "
        f"(augmentation, block5 + head trainable, SGD), float32, batch {bench.params.finetune.batch_size}, "
        f"{bench.sizes.finetune_batches} batches timed after 1 warm-up batch",
        TARGET,
    )


def low_predict_row(bench: Bench) -> Row:
    return speed_row(
        bench,
        "inference",
        "low",
        "plain",
        f"plain predict, {bench.low} (devices.computing_in) vs float32; the features differ by "
        f"‖f_low − f_fp32‖ / ‖f_fp32‖ = {bench.shared['low_difference']:.2%}",
    )


def low_finetune_row(bench: Bench) -> Row:
    return speed_row(
        bench,
        "training",
        "low",
        "plain",
        f"plain fit(x, y), {bench.low} (devices.set_policy before assemble, as the stage) vs float32",
    )


# --- DVC and MLflow -----------------------------------------------------------------------------


def tiny_workspace(bench: Bench, name: str) -> tuple[Path, dict]:
    """The tests' tiny pipeline in a new git repository (committed, nothing run), and its environment."""
    from benchmarks.caching import git
    from ops import demo
    from tests.conftest import TINY
    from tests.workspace import GIT_ENV

    workspace = demo.make_workspace(bench.work / name, TINY, git=True)
    env = demo.pipeline_env(**GIT_ENV, MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
    git(["add", "-A"], workspace, env)
    git(["commit", "-qm", "pipeline"], workspace, env)
    return workspace, env


def tracking_row(bench: Bench) -> Row:
    """Runs the tiny pipeline twice, tracking off then on; leaves the tracking-on workspace, reproduced,
    in bench.shared["tiny"] for `noop_row`."""
    from benchmarks.tracking import repro

    seconds = {}
    for tracking in (False, True):
        name = "tracking-on" if tracking else "tracking-off"
        workspace, env = tiny_workspace(bench, name)
        progress(f"first dvc repro of the tiny pipeline, {name}")
        seconds[tracking], _ = repro(workspace, "on" if tracking else "off", force=False)
        progress(f"{name}: {seconds[tracking]:.1f} s")
    bench.shared["tiny"] = (workspace, env)
    return Row(
        f"{seconds[True]:.1f} s",
        f"{seconds[False]:.1f} s",
        seconds[True] / seconds[False],
        "the tests' tiny config (nine stages, baseline and ensemble switched off; 32x32, 1-2 epochs): "
        "tracking on (sqlite store in the project) vs PIPELINE_TRACKING=off; ratio on / off (> 1: slower)",
    )


def noop_row(bench: Bench) -> Row:
    """After `tracking_row`: the reproduced pipeline committed, then timed as benchmarks/caching.py does."""
    from benchmarks.caching import git, summary, timed
    from ops import demo

    workspace, env = bench.shared["tiny"]
    git(["add", "-A"], workspace, env)
    git(["commit", "-qm", "reproduced"], workspace, env)
    times: dict[str, list[float]] = {"repro": [], "--version": [], "status": []}
    ran: set[str] = set()
    for _ in range(bench.sizes.repeats):
        for command, measured in times.items():
            seconds, output = timed(demo.DVC + [command], workspace, env)
            measured.append(seconds)
            if command == "repro":
                ran.add(summary(output)[0])
    repro, version, status = (statistics.median(times[c]) for c in ("repro", "--version", "status"))
    progress(f"no-op dvc repro {repro:.2f} s, dvc --version {version:.2f} s, dvc status {status:.2f} s")
    return Row(
        f"{repro:.2f} s",
        f"{version:.2f} s",
        repro / version,
        f"reference: `dvc --version` (DVC's fixed start-up cost); `dvc status` {status:.2f} s; median of "
        f"{bench.sizes.repeats}; stages run: {', '.join(sorted(ran))}; ratio repro / --version",
        "< 1 s",
    )


# --- the table ----------------------------------------------------------------------------------


def header(bench: Bench) -> str:
    import keras
    import tensorflow as tf

    from classifier.model import devices

    flags = sorted(devices.cpu_flags() & devices.BF16_CPU_FLAGS)
    gpus = tf.config.list_physical_devices("GPU")
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {len(gpus)} GPU(s); TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}; --device {bench.device}; precision_policy('auto') = "
        f"{devices.precision_policy('auto')}; bf16 CPU flags: {', '.join(flags) or 'none'} "
        f"(of {', '.join(sorted(devices.BF16_CPU_FLAGS))}); low precision measured: {bench.low}; op determinism on; "
        f"1-min load average {bench.shared['load']:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    )


def table(rows: list[tuple[str, Row]]) -> str:
    lines = [
        "| measure | pipeline | reference | ratio | target | reference, notes |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, row in rows:
        lines.append(f"| {name} | {row.figure} | {row.reference} | {row.ratio:.2f} | {row.target} | {row.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(LOW_PRECISION), default="cpu", help="picks the low precision")
    parser.add_argument("--quick", action="store_true", help="fewer images: checks that every row works")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(sizes, args.device, Path(tmp), bench_params(sizes))
        bench.shared["load"] = os.getloadavg()[0]  # other work competing for the cores
        prepare_speed, prepare_memory = prepare_rows(bench)
        setup_models(bench)
        measure_inference(bench)
        measure_training(bench)
        low = bench.low.removeprefix("mixed_")
        side = sizes.image_size
        steps: list[tuple[str, Callable[[Bench], Row]]] = [
            (f"featurize, VGG16 {side}x{side}", featurize_row),
            (f"finetune, VGG16 {side}x{side}", finetune_row),
            (f"featurize in {low} vs float32", low_predict_row),
            (f"finetune in {low} vs float32", low_finetune_row),
        ]
        rows = [(name, step(bench)) for name, step in steps]
        rows += [("prepare, speed", prepare_speed), ("prepare, peak memory", prepare_memory)]
        tracking = tracking_row(bench)
        rows += [("no-op dvc repro", noop_row(bench)), ("first dvc repro, tracking on vs off", tracking)]
        line = header(bench)
    progress(f"done in {time.perf_counter() - started:.0f} s")
    print(line)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
