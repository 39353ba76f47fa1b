"""Where training runs: every GPU there is (one replica each), mixed precision on GPUs, else the CPU.

`finetune.mixed_precision: auto` turns mixed precision on exactly when a GPU is used: float16
compute on GPUs (with loss scaling, which Keras adds at compile time), bfloat16 where forced on a
CPU. Several devices are used through a MirroredStrategy; the same code path runs on several
logical CPU devices, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def precision_policy(mixed_precision: str) -> str:
    """The Keras dtype policy for `finetune.mixed_precision` on this machine."""
    gpus = tf.config.list_logical_devices("GPU")
    if mixed_precision == "off" or (mixed_precision == "auto" and not gpus):
        return "float32"
    return "mixed_float16" if gpus else "mixed_bfloat16"


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
