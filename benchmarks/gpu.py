"""The GPU check: the pipeline's featurize, fine-tuning and evaluation against plain Keras on this
machine's accelerator, for VGG16 and ResNet50 with random weights, in one markdown table.

    python benchmarks/gpu.py                       # sized for under 8 minutes on an NVIDIA H200 (JAX, mixed_bfloat16)
    python benchmarks/gpu.py --quick               # 32x32, 12 pictures per class, VGG16 only: under a minute on a CPU
    python benchmarks/gpu.py --out table.md        # also writes the header and the table to table.md

It needs only `classifier`, Keras, JAX (or TensorFlow), numpy, Pillow, PyYAML, tqdm and scikit-learn
(which `classifier.inference` scores with): nothing of `ops/`, `stages/`, MLflow or DVC, so that it
runs on a GPU machine where only the JAX path is installed. The backend is chosen as the stages
choose it (`--backend auto`: KERAS_BACKEND when set, else JAX on an NVIDIA GPU), and the precision
is `precision: auto` (mixed_bfloat16 on an A100/H100/H200, `devices.precision_policy`).

The data: 2 classes of generated patterns (`classifier.data.synthetic`: horizontal vs vertical
stripes, random colours, frequency, phase and noise), 256 px, prepared by `cleaning.prepare`; per
class 600 pictures, 400 to train, 100 to validate, 100 to test (`--images-per-class` scales all
three). The model sees them at 224x224. Params are the defaults with the overrides of `overrides`,
parsed by `classifier.config` as params.yaml is.

Each row is one backbone (`model.weights: null`, random init: no network is needed), and its columns:

- featurize img/s (pipeline): `bottleneck.featurize` end to end over all three splits (build the
  backbone, read the JPEG files, decode and resize them, predict, write <split>.npz), its second run:
  the first run (its time is in the header) compiles the XLA programs, which the second finds in
  JAX's compilation cache (a new model object is traced again, but not compiled again). On
  TensorFlow nothing is cached: the second run builds its graph again, as each stage run does.
  The images/s count every picture of the three splits.
- plain predict img/s: `model.predict(x, batch_size=featurize.batch_size)` of the same extractor
  (`backbones.feature_extractor` of featurize's backbone, `devices.computing_in` the same policy) on
  the same pictures already decoded into one array on the device (`jax.device_put`; a tensor on
  TensorFlow), timed on its second call (the first compiles). Ratio = pipeline / plain.
- fine-tune img/s (pipeline): `finetuning.finetune` (augmentation, the last block and the head
  trainable, SGD), training images/s over the epochs after the first (which compiles), measured by a
  callback from the start of each epoch to the start of its validation; plain fit img/s: the same
  assembled and compiled model (`finetuning.assemble`, `heads.compile_classifier` with finetune's
  SGD, the same policy) fitted with `model.fit(x, y, batch_size=finetune.batch_size)` on the train split's pictures
  decoded in memory on the device, first epoch excluded too. Ratio = pipeline / plain.
- target: each ratio should be at least 0.7 (the pipeline's input keeps the accelerator at least
  70% as busy as arrays already on it). Shown, never asserted: nothing here fails on a figure.
- head val accuracy: `training.train_top` on the cached features, the last epoch's validation accuracy.
- test accuracy: the fine-tuned model saved (`saving.save_model`), loaded back by
  `inference.load_model(path, "auto")` and scored by `inference.evaluate` on the test split.

Learning rates: with random weights the recipe's fine-tuning rate (SGD 1e-4, made to nudge ImageNet
weights) hardly moves the model in a few epochs; here fine-tuning uses SGD at 1e-3 (momentum 0.9) and
the head the default RMSprop 1e-3, which separate the two stripe patterns clearly above chance (0.5)
from random features (VGG16 on a 2-core CPU, 80 training pictures per class at 224 px: head 0.70 and
fine-tuning 0.90-0.95 validation accuracy after 5 epochs; the head's validation accuracy swings from epoch to
epoch on so few). ResNet50's random features are far larger (its BatchNorm layers hold their
initial statistics), and on 24 training pictures per class its head reached only 0.58 and one
fine-tuning epoch 0.50: whether 400 per class lift it clearly above chance is for the GPU run to show.
`--quick` (a check that every step runs) gives accuracies near chance.

Batch sizes: featurize and evaluate 64, fine-tuning 32 (the stages default to 32 and 16, small for
an H200). Progress goes to stderr; the header line and the table to stdout (and `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Nothing here imports Keras at the top: the backend is selected first (main), and prepare's worker
# processes are spawned, each importing this script again. The checkout, so that
# `python benchmarks/gpu.py` finds `classifier` without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model
from classifier import config
from classifier.data import cleaning, synthetic
from classifier.data.layout import SPLITS
from classifier.model import backend

BACKBONES = ("vgg16", "resnet50")
TARGET = 0.7
#: The columns of the table, in order.
COLUMNS = (
    "backbone",
    "featurize img/s (pipeline)",
    "plain predict img/s",
    "ratio",
    "fine-tune img/s (pipeline)",
    "plain fit img/s",
    "ratio",
    f"target (>= {TARGET})",
    "head val accuracy",
    "test accuracy",
)


@dataclass(frozen=True)
class Mode:
    image_size: int  # the model's input side
    synthetic_size: int  # side of the generated pictures
    images_per_class: int  # generated; 2/3 train, 1/6 validation, 1/6 test
    top_epochs: int
    finetune_epochs: int  # the first is not timed
    plain_epochs: int  # of the plain fit reference; the first is not timed
    featurize_batch: int
    finetune_batch: int
    backbones: tuple[str, ...]


FULL = Mode(224, 256, 600, 15, 5, 3, 64, 32, BACKBONES)
QUICK = Mode(32, 40, 12, 2, 2, 2, 8, 8, ("vgg16",))


def progress(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def overrides(mode: Mode, backbone: str, precision: str) -> dict[str, Any]:
    """What the check changes from the defaults of params.yaml (config.parse takes the rest)."""
    per_class = mode.images_per_class
    test = max(1, per_class // 6)
    return {
        "seed": 42,
        "deterministic": False,
        "precision": precision,
        "data": {
            "source": "synthetic",
            "seed": 42,
            "image_size": [mode.image_size, mode.image_size],
            "max_side": max(mode.image_size, mode.synthetic_size),
            "min_side": 16,
            "split": {"train": per_class - 2 * test, "validation": test, "test": test},
            "synthetic": {"classes": 2, "images_per_class": per_class, "size": mode.synthetic_size},
        },
        "model": {"backbone": backbone, "weights": None},
        "featurize": {"batch_size": mode.featurize_batch},
        "top": {"epochs": mode.top_epochs, "batch_size": 32},
        "finetune": {"learning_rate": 1e-3, "epochs": mode.finetune_epochs, "batch_size": mode.finetune_batch},
        "evaluate": {"batch_size": mode.featurize_batch},
        "baseline": {"enabled": False},
        "ensemble": {"backbones": []},
    }


@dataclass
class Result:
    backbone: str
    featurize: float = 0.0  # img/s
    predict: float = 0.0
    finetune: float = 0.0
    fit: float = 0.0
    head_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    cold_featurize_s: float = 0.0  # the first featurize run, compiling


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    ended: list[float] = []
    try:
        yield lambda: (ended[0] if ended else time.perf_counter()) - started
    finally:
        ended.append(time.perf_counter())


def on_device(array: np.ndarray) -> Any:
    """`array` put on the accelerator (the default device): a JAX array, or a tensor on TensorFlow."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.device_put(array)
    return keras.ops.convert_to_tensor(array)


def epoch_clock() -> Any:
    """A Keras callback that records, for each epoch, the seconds from its start to the start of its
    validation (to its end when there is none): the training part of the epoch."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._begin = 0.0
            self._trained: float | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._begin, self._trained = time.perf_counter(), None

        def on_test_begin(self, logs: Any = None) -> None:
            if self._trained is None:
                self._trained = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append((self._trained or time.perf_counter()) - self._begin)

    return EpochClock()


def training_speed(clock: Any, images: int) -> float:
    """Training images/s of the epochs after the first (which compiles)."""
    timed = clock.seconds[1:]
    if not timed:
        return float("nan")
    return images * len(timed) / sum(timed)


def decoded(prepared: Path, image_size: tuple[int, int], batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split's pictures decoded as the pipeline decodes them, in manifest order, with labels."""
    from classifier.model import images

    out = {}
    for name in SPLITS:
        split = images.load_split(prepared, name)
        batches = [np.asarray(b, dtype=np.float32) for b in images.images_only(split.paths, image_size, batch_size)]
        out[name] = (np.concatenate(batches), split.labels)
    return out


def check_backbone(name: str, mode: Mode, precision: str, prepared: Path, work: Path, pictures: dict) -> Result:
    import keras

    from classifier import inference, saving
    from classifier.model import backbones, bottleneck, devices, finetuning, heads, images, training

    params = config.parse(overrides(mode, name, precision))
    policy = devices.precision_policy(params.precision)
    result = Result(name)
    total = sum(len(labels) for _, labels in pictures.values())

    # featurize: a first run compiles (and fills JAX's compilation cache), the second is timed
    progress(f"{name}: featurize, first run ({total} pictures, compiling)")
    with timer() as elapsed:
        bottleneck.featurize(prepared, work / f"{name}-features-cold", params)
    result.cold_featurize_s = elapsed()
    progress(f"{name}: featurize, first run {result.cold_featurize_s:.1f} s; second run, timed")
    features = work / f"{name}-features"
    with timer() as elapsed:
        base, _ = bottleneck.featurize(prepared, features, params)
    result.featurize = total / elapsed()
    progress(f"{name}: featurize {result.featurize:.1f} img/s end to end")

    # plain predict of the same extractor on the same pictures, on the device
    x_all = np.concatenate([x for x, _ in pictures.values()])
    with devices.predicting():
        extractor = devices.computing_in(backbones.feature_extractor(base, name), policy)
        x_device = on_device(x_all)
        batch = params.featurize.batch_size
        extractor.predict(x_device, batch_size=batch, verbose=0)  # compiles
        with timer() as elapsed:
            np.asarray(extractor.predict(x_device, batch_size=batch, verbose=0))
    result.predict = total / elapsed()
    del x_device
    progress(f"{name}: plain predict {result.predict:.1f} img/s")

    # the head on the cached features
    progress(f"{name}: train_top, {params.top.epochs} epochs")
    head, history = training.train_top(
        bottleneck.load_features(features, "train"),
        bottleneck.load_features(features, "validation"),
        2,
        params.top,
        params.seed,
        heads.head_pool(params.top, name),
    )
    result.head_accuracy = float(history["val_accuracy"][-1])
    progress(f"{name}: head val accuracy {result.head_accuracy:.3f}")

    # fine-tuning: the pipeline, then plain fit of the same model on the pictures in memory on the device
    weights = work / f"{name}.weights.h5"
    base.save_weights(weights)
    train_count = len(pictures["train"][1])
    progress(f"{name}: finetune, {params.finetune.epochs} epochs")
    clock = epoch_clock()
    tuned = finetuning.finetune(prepared, weights, head, params, devices.strategy(), policy, callbacks=[clock])
    result.finetune = training_speed(clock, train_count)
    progress(f"{name}: finetune {result.finetune:.1f} img/s; epochs {', '.join(f'{s:.2f}' for s in clock.seconds)} s")

    p = params.finetune
    progress(f"{name}: plain fit, {mode.plain_epochs} epochs")
    devices.set_policy(policy)
    try:
        with devices.strategy().scope():
            keras.utils.set_random_seed(params.seed)
            model, _ = finetuning.assemble(params, weights, head, 2)
            heads.compile_classifier(model, keras.optimizers.SGD(learning_rate=p.learning_rate, momentum=p.momentum), 2)
            x_train, y_train = on_device(pictures["train"][0]), on_device(pictures["train"][1])
            clock = epoch_clock()
            model.fit(x_train, y_train, batch_size=p.batch_size, epochs=mode.plain_epochs, callbacks=[clock], verbose=0)
            del x_train, y_train
    finally:
        devices.set_policy("float32")
    result.fit = training_speed(clock, train_count)
    progress(f"{name}: plain fit {result.fit:.1f} img/s; epochs {', '.join(f'{s:.2f}' for s in clock.seconds)} s")

    # evaluate the saved fine-tuned model as the evaluate stage does
    saved = work / f"{name}.keras"
    saving.save_model(tuned.model, saved)
    _, metrics = inference.evaluate(
        inference.load_model(saved, params.precision), images.load_split(prepared, "test"), params
    )
    result.test_accuracy = float(metrics["test"]["accuracy"])
    progress(f"{name}: test accuracy {result.test_accuracy:.3f}")
    keras.backend.clear_session()
    return result


def machine() -> str:
    """The accelerator the models run on (JAX's device kind, or TensorFlow's GPU name), else the CPU."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{len(jax.devices())} x {device.device_kind}"
    else:
        tf = sys.modules["tensorflow"]  # loaded by Keras
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def header(mode: Mode, policy: str, results: list[Result], seconds: float) -> str:
    import keras

    name = keras.backend.backend()
    framework = sys.modules["jax"] if name == "jax" else sys.modules["tensorflow"]
    per_class = mode.images_per_class
    test = max(1, per_class // 6)
    cold = ", ".join(f"{r.backbone} {r.cold_featurize_s:.1f} s" for r in results)
    return (
        f"GPU check, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Machine: {machine()}; "
        f"backend {name} ({'JAX' if name == 'jax' else 'TensorFlow'} {framework.__version__}), "
        f"Keras {keras.__version__}; policy {policy}; {mode.image_size}x{mode.image_size}, random weights; "
        f"2 classes x {per_class} pictures ({per_class - 2 * test} train, {test} validation, {test} test); "
        f"batch featurize {mode.featurize_batch}, finetune {mode.finetune_batch}; epochs head {mode.top_epochs}, "
        f"finetune {mode.finetune_epochs}, plain fit {mode.plain_epochs}; first featurize run (compiling): {cold}; "
        f"the whole check {seconds:.0f} s."
    )


def table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r.backbone} | {r.featurize:.1f} | {r.predict:.1f} | {r.featurize / r.predict:.2f} "
            f"| {r.finetune:.1f} | {r.fit:.1f} | {r.finetune / r.fit:.2f} | both ratios >= {TARGET} "
            f"| {r.head_accuracy:.3f} | {r.test_accuracy:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32x32, 12 pictures per class, vgg16: checks every step")
    parser.add_argument("--backend", choices=("auto", *backend.BACKENDS), default="auto")
    parser.add_argument("--backbones", nargs="+", choices=config.BACKBONES, help="default: vgg16 resnet50")
    parser.add_argument("--images-per-class", type=int, help="pictures generated per class (at least 6)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (at least 2: the first is not timed)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--out", type=Path, help="also write the header and the table to this file")
    args = parser.parse_args()
    backend.select(args.backend, deterministic=False)  # before Keras is imported
    mode = QUICK if args.quick else FULL
    if args.images_per_class is not None:
        if args.images_per_class < 6:
            parser.error("--images-per-class must be at least 6 (one each to validate and test)")
        mode = dataclasses.replace(mode, images_per_class=args.images_per_class)
    if args.epochs is not None:
        if args.epochs < 2:
            parser.error("--epochs must be at least 2: the first one compiles and is not timed")
        mode = dataclasses.replace(mode, finetune_epochs=args.epochs)
    if args.backbones:
        mode = dataclasses.replace(mode, backbones=tuple(args.backbones))

    started = time.perf_counter()
    # Keras's training logs go to stderr with the progress: stdout holds the header and the table alone.
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        params = config.parse(overrides(mode, mode.backbones[0], args.precision))
        progress(f"generating 2 x {mode.images_per_class} pictures of {mode.synthetic_size} px")
        synthetic.generate(work / "raw", params.data.synthetic, params.data.seed)
        prepared = work / "prepared"
        report = cleaning.prepare(
            work / "raw", prepared, params.data, params.data.seed, workers=1 if args.quick else None
        )
        progress(f"prepared {report['images_kept']} pictures")

        import keras

        from classifier.model import devices

        if keras.backend.backend() == "jax":
            import jax

            # The second featurize run finds the first one's XLA programs here instead of compiling them.
            jax.config.update("jax_compilation_cache_dir", str(work / "xla-cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        devices.start(params.deterministic)
        policy = devices.precision_policy(params.precision)
        progress(f"Keras on {keras.backend.backend()}, {devices.device_name()}, policy {policy}")
        pictures = decoded(prepared, params.data.image_size, params.featurize.batch_size)
        results = [check_backbone(name, mode, args.precision, prepared, work, pictures) for name in mode.backbones]
    seconds = time.perf_counter() - started
    progress(f"done in {seconds:.0f} s")
    text = f"{header(mode, policy, results, seconds)}\n\n{table(results)}\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
