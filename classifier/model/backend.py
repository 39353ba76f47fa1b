"""Which framework Keras runs on (`backend` in params.yaml), and the processes a stage runs as.

TensorFlow is the default on CPUs: it is what the pipeline has always run on there. JAX is the path
for NVIDIA GPUs and for several processes or machines: Keras's `keras.distribution` (data parallel
training over every device of every process) works on JAX alone, and a GPU machine then needs no
second framework. `auto` follows KERAS_BACKEND when it is set; else it takes JAX where the stage runs
as several processes, where TensorFlow is not installed, or where an NVIDIA GPU is and JAX is
installed; TensorFlow everywhere else. `select` must run before Keras is first imported: Keras reads
its backend once, at import.

Several processes: each process of a run has KERAS_DISTRIBUTION_NUM_PROCESSES, _PROCESS_ID and
_JOB_ADDRESSES (Keras's own variables, which `ops.launch` sets), or is a task of a Slurm job step
(a task `srun` started, whose variables JAX reads itself). Process 0 writes the outputs and logs; every process trains.
Nothing here imports Keras, TensorFlow or JAX.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from classifier.errors import StageError

BACKENDS = ("tensorflow", "jax")
#: Where Linux lists the NVIDIA GPUs its driver sees.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
#: XLA's flag that makes GPU kernels deterministic (JAX's counterpart of TensorFlow's op determinism).
XLA_DETERMINISM = "--xla_gpu_deterministic_ops=true"


@dataclass(frozen=True)
class Cluster:
    """The processes one stage runs as: `count` of them, this one number `index`."""

    count: int = 1
    index: int = 0

    @property
    def several(self) -> bool:
        return self.count > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs and logs (process 0)."""
        return self.index == 0

    def part(self, total: int, index: int | None = None) -> slice:
        """Process `index`'s (by default this one's) contiguous part of `total` items: the first
        ceil(total / count) to process 0, and so on (the last may be short, or empty)."""
        size = -(-total // self.count)
        first = self.index if index is None else index
        return slice(min(total, first * size), min(total, (first + 1) * size))


def cluster() -> Cluster:
    """This process's place among the processes of its stage (from Keras's or Slurm's variables)."""
    env = os.environ
    if "KERAS_DISTRIBUTION_NUM_PROCESSES" in env:
        count, index = env["KERAS_DISTRIBUTION_NUM_PROCESSES"], env.get("KERAS_DISTRIBUTION_PROCESS_ID", "")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_SRUN_COMM_PORT" in env:  # a task `srun` started (not sbatch's script)
        count, index = env["SLURM_STEP_NUM_TASKS"], env.get("SLURM_PROCID", "")
    else:
        return Cluster()
    try:
        result = Cluster(int(count), int(index))
    except ValueError:
        raise StageError(
            f"the process count {count!r} and process id {index!r} in the environment must be whole numbers"
        ) from None
    if not 0 <= result.index < result.count:
        last = result.count - 1
        raise StageError(f"process id {result.index} is not one of the {result.count} processes (0..{last})")
    return result


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def nvidia_gpu() -> bool:
    """Whether the NVIDIA driver lists a GPU here (Linux)."""
    try:
        return any(NVIDIA_GPUS.iterdir())
    except OSError:
        return False


def choose(setting: str = "auto") -> str:
    """The backend `setting` (params.yaml's `backend`) means on this machine, for this process."""
    if setting not in ("auto", *BACKENDS):
        raise StageError(f"backend must be auto, tensorflow or jax, not {setting!r}")
    asked = os.environ.get("KERAS_BACKEND", "").strip().lower()
    if asked and asked not in BACKENDS:
        raise StageError(f"KERAS_BACKEND={asked} is not a backend this pipeline runs on: use tensorflow or jax")
    if setting != "auto":
        if asked and asked != setting:
            raise StageError(
                f"params.yaml asks for backend: {setting} but KERAS_BACKEND={asked} is set: "
                "unset KERAS_BACKEND, or set backend: auto (it follows KERAS_BACKEND)"
            )
        return setting
    if asked:
        return asked
    if cluster().several or not installed("tensorflow"):
        return "jax"
    return "jax" if nvidia_gpu() and installed("jax") else "tensorflow"


def select(setting: str = "auto", deterministic: bool = False) -> str:
    """Make Keras run on the backend `setting` means here (`choose`), before Keras is imported;
    `deterministic` also asks XLA for deterministic GPU kernels on JAX. Returns the backend."""
    backend = choose(setting)
    if not installed(backend):
        raise StageError(
            f"the {backend} backend is chosen but {backend} is not installed here: "
            f"`make install` (CPU) or `make install DEVICE=gpu` installs it"
        )
    loaded = sys.modules.get("keras")
    if loaded is not None:  # too late to choose: it must be the one Keras runs on
        if loaded.backend.backend() != backend:
            raise StageError(f"Keras is already running on {loaded.backend.backend()}, not {backend}")
        return backend
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax" and deterministic:
        flags = os.environ.get("XLA_FLAGS", "")
        if XLA_DETERMINISM not in flags.split():
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISM}".strip()
    return backend
