"""Where and in what precision the models run: every GPU there is (one replica each), else the CPU.

`precision: auto` (params.yaml) computes in float16 on NVIDIA GPUs with tensor cores (compute
capability 7.0 or newer, with loss scaling, which Keras adds at compile time), in bfloat16 on CPUs
that have it natively (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo), and in float32 elsewhere;
`float32`, `bfloat16` or `float16` force one. PIPELINE_CPU_FLAGS, when set, stands for the CPU's flags
(`PIPELINE_CPU_FLAGS=none`: act as a CPU without bfloat16; `=avx512_bf16`: as one with it), so that
either kind of machine can be tried on the other. Variables stay float32 under every policy, and every
saved model computes in float32: `computing_in` makes a copy of a saved model that computes in
another precision, with the same weights. Several devices are used through a MirroredStrategy;
the same code path runs on several logical CPU devices, which is how the tests exercise it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

#: The `precision` param's forced values -> Keras dtype policies.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
#: The CPU flags `auto` sees instead of the CPU's (space or comma separated; `none` for none).
CPU_FLAGS_VARIABLE = "PIPELINE_CPU_FLAGS"


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


def _gpu_compute_capability(device: tf.config.PhysicalDevice) -> tuple[int, int]:
    capability = tf.config.experimental.get_device_details(device).get("compute_capability")
    return (int(capability[0]), int(capability[1])) if capability else (0, 0)


def precision_policy(precision: str, flags: frozenset[str] | None = None) -> str:
    """The Keras dtype policy for the `precision` param on this machine (`flags`: the CPU's flags,
    by default `machine_flags()`)."""
    if precision != "auto":
        return POLICIES[precision]
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        fast = all(_gpu_compute_capability(gpu) >= (7, 0) for gpu in gpus)
        return "mixed_float16" if fast else "float32"
    return "mixed_bfloat16" if (machine_flags() if flags is None else flags) & BF16_CPU_FLAGS else "float32"


def device_name() -> str:
    """What the models run on, for messages: 'CPU', 'GPU' or '2 GPUs'."""
    count = len(tf.config.list_logical_devices("GPU"))
    return "CPU" if not count else "GPU" if count == 1 else f"{count} GPUs"


def strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """A MirroredStrategy over `devices` (default: all GPUs) when there are several, else the default."""
    names = devices if devices is not None else [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(names) > 1:
        log.info("training on %d devices: %s", len(names), ", ".join(names))
        return tf.distribute.MirroredStrategy(names)
    log.info("training on %s", names[0] if names else "the CPU")
    return tf.distribute.get_strategy()


def set_determinism(on: bool) -> None:
    """TensorFlow's op determinism (`deterministic` in params.yaml): every op takes a deterministic
    implementation (an op without one fails rather than vary), so that a GPU, like the CPU, gives
    the same bytes for the same inputs, params and seeds. It stays on for the rest of the process."""
    if on:
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
