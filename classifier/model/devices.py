"""Where and in what precision the models run: every GPU there is, else the CPU; on JAX, every
device of every process of the stage too (`classifier.model.backend` chooses the backend).

`precision: auto` (params.yaml) computes in bfloat16 on NVIDIA GPUs that have it (compute capability
8.0 or newer: A100, H100, H200...), in float16 with loss scaling (which Keras adds at compile time) on
older ones with tensor cores (7.x), in bfloat16 on CPUs that have it natively (`avx512_bf16` or
`amx_bf16` in /proc/cpuinfo), and in float32 elsewhere; `float32`, `bfloat16` or `float16` force one.
PIPELINE_CPU_FLAGS, when set, stands for the CPU's flags (`PIPELINE_CPU_FLAGS=none`: act as a CPU
without bfloat16; `=avx512_bf16`: as one with it), so that either kind of machine can be tried on the
other. Variables stay float32 under every policy, and every saved model computes in float32:
`computing_in` makes a copy of a saved model that computes in another precision, with the same weights.

Several devices: on TensorFlow a MirroredStrategy; on JAX Keras's DataParallel distribution, over the
devices of every process (`keras.distribution.initialize` joins them, `start`). Prediction runs in
each process over its own devices (`predict_batch`); `gather` brings every process's part to all.
The same code paths run on several logical CPU devices, which is how the tests exercise them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from classifier.errors import StageError
from classifier.model import backend

log = logging.getLogger(__name__)

#: The `precision` param's forced values -> Keras dtype policies.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
#: The CPU flags `auto` sees instead of the CPU's (space or comma separated; `none` for none).
CPU_FLAGS_VARIABLE = "PIPELINE_CPU_FLAGS"


def on_jax() -> bool:
    return keras.backend.backend() == "jax"


def machine_flags() -> frozenset[str]:
    """The flags `auto` goes by: PIPELINE_CPU_FLAGS when it is set, else this CPU's."""
    override = os.environ.get(CPU_FLAGS_VARIABLE)
    if override is not None:
        return frozenset(override.replace(",", " ").split()) - {"none"}
    return cpu_flags()


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags; none where the system does not list them (not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return frozenset()


def gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU this process uses (none on a CPU)."""
    if on_jax():
        import jax

        return [
            tuple(int(part) for part in str(getattr(d, "compute_capability", "0.0")).split(".")[:2])  # type: ignore[misc]
            for d in jax.local_devices()
            if d.platform == "gpu"
        ]
    import tensorflow as tf

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append((int(capability[0]), int(capability[1])) if capability else (0, 0))
    return found


def precision_policy(precision: str, flags: frozenset[str] | None = None) -> str:
    """The Keras dtype policy for the `precision` param on this machine (`flags`: the CPU's flags,
    by default `machine_flags()`)."""
    if precision != "auto":
        return POLICIES[precision]
    gpus = gpu_capabilities()
    if gpus:
        oldest = min(gpus)
        return "mixed_bfloat16" if oldest >= (8, 0) else "mixed_float16" if oldest >= (7, 0) else "float32"
    return "mixed_bfloat16" if (machine_flags() if flags is None else flags) & BF16_CPU_FLAGS else "float32"


def local_gpus() -> int:
    """How many GPUs this process computes on."""
    if on_jax():
        import jax

        return sum(device.platform == "gpu" for device in jax.local_devices())
    import tensorflow as tf

    return len(tf.config.list_logical_devices("GPU"))


def device_name() -> str:
    """What the models run on, for messages: 'CPU', 'GPU', '2 GPUs', '2 processes x 8 GPUs'."""
    gpus = local_gpus()
    here = "CPU" if not gpus else "GPU" if gpus == 1 else f"{gpus} GPUs"
    processes = backend.cluster().count
    return here if processes == 1 else f"{processes} processes x {here}"


def start(deterministic: bool) -> backend.Cluster:
    """What a stage does first once Keras is loaded: join the other processes of the stage (JAX only),
    then ask for deterministic kernels (`set_determinism`); returns the cluster."""
    cluster = backend.cluster()
    if cluster.several:
        if not on_jax():
            raise StageError(
                f"{cluster.count} processes need the JAX backend (Keras's distribution API is JAX's alone): "
                "set backend: auto or jax in params.yaml"
            )
        keras.distribution.initialize()
        log.info("process %d of %d joined", cluster.index, cluster.count)
    set_determinism(deterministic)
    return cluster


class _OneDevice:
    """The strategy of one device: nothing to distribute."""

    def scope(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def strategy(devices: list[str] | None = None) -> Any:
    """What training runs under (`with strategy().scope():` around building, compiling and fitting):
    on TensorFlow a MirroredStrategy over `devices` (default: all GPUs) when there are several; on
    JAX the DataParallel distribution over every device of every process when there are several.
    Each process then feeds its own part of each batch (`images.dataset` takes `Cluster`'s)."""
    if on_jax():
        import jax

        if len(jax.devices()) > 1:
            log.info("training on %d devices of %d process(es)", len(jax.devices()), jax.process_count())
            return keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
        return _OneDevice()
    import tensorflow as tf

    names = devices if devices is not None else [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(names) > 1:
        log.info("training on %d devices: %s", len(names), ", ".join(names))
        return tf.distribute.MirroredStrategy(names)
    log.info("training on %s", names[0] if names else "the CPU")
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def predicting() -> Iterator[None]:
    """The scope to build or load a model in and predict with `predict_batch`: on JAX with several
    local devices, Keras's DataParallel over them, so that each batch is split across them."""
    if on_jax():
        import jax

        if len(jax.local_devices()) > 1:
            with keras.distribution.DataParallel(devices=jax.local_devices()).scope():
                yield
            return
    yield


def predict_batch(model: keras.Model, batch: Any) -> np.ndarray:
    """`model`'s output for one batch, as float32 numpy, split across this process's devices (in
    `predicting()`). A batch that does not divide evenly among them is padded, and the padding dropped."""
    distribution = keras.distribution.distribution() if on_jax() else None
    if distribution is None:
        return np.asarray(model.predict_on_batch(batch), dtype=np.float32)
    batch = np.asarray(batch)
    count = len(batch)
    devices = int(np.prod(distribution.device_mesh.shape))
    if count % devices:
        batch = np.concatenate([batch, np.repeat(batch[-1:], devices - count % devices, axis=0)])
    batch = keras.distribution.distribute_tensor(batch, distribution.get_data_layout(batch.shape))
    return np.asarray(model.predict_on_batch(batch), dtype=np.float32)[:count]


def gather(part: np.ndarray, total: int) -> np.ndarray:
    """Every process's `part` of a result, in process order (the parts of `Cluster.part`), to every
    process; `part` itself when the stage runs as one process. `total`: the whole result's length."""
    cluster = backend.cluster()
    if not cluster.several:
        return part
    from jax.experimental import multihost_utils

    longest = -(-total // cluster.count)
    padded = np.zeros((longest, *part.shape[1:]), dtype=part.dtype)
    padded[: len(part)] = part
    every = np.asarray(multihost_utils.process_allgather(padded))
    pieces = [every[i][: len(range(total)[cluster.part(total, i)])] for i in range(cluster.count)]
    return np.concatenate(pieces)


def set_determinism(on: bool) -> None:
    """Deterministic kernels (`deterministic` in params.yaml): the same inputs, params and seeds give
    the same bytes on a GPU too. TensorFlow: op determinism (an op without a deterministic
    implementation fails rather than vary), on for the rest of the process. JAX: XLA's
    deterministic GPU ops, which `backend.select` asks for before JAX starts; JAX on a CPU is
    deterministic as it is."""
    if not on:
        return
    if on_jax():
        if backend.XLA_DETERMINISM not in os.environ.get("XLA_FLAGS", "").split():
            raise StageError(
                "deterministic: true on JAX needs XLA_FLAGS to hold "
                f"{backend.XLA_DETERMINISM} before JAX starts (backend.select sets it)"
            )
        log.info("XLA deterministic GPU ops: on")
        return
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    log.info("TensorFlow op determinism: on")


def set_policy(policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    log.info("dtype policy: %s", policy)


def _last_layer(model: keras.Model) -> keras.Layer:
    layer = model.layers[-1]
    return _last_layer(layer) if isinstance(layer, keras.Model) else layer


def computing_in(model: keras.Model, policy: str) -> keras.Model:
    """`model` itself for float32; else a copy computing in `policy`, with the same weights.

    The layer that makes the output stays float32, as in training: probabilities near 0 or 1 keep
    their digits (a log loss needs them)."""
    if policy == "float32":
        return model
    keep = _last_layer(model).name

    def clone(layer: keras.Layer) -> keras.Layer:
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name == keep else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
