"""The GPU check (benchmarks/gpu.py) in its quick mode, on Keras's JAX backend as on the GPU machine,
where TensorFlow is not installed: here `import tensorflow` fails in the check's process. About a
minute on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The columns the check's table has, in order.
COLUMNS = [
    "backbone",
    "featurize img/s (pipeline)",
    "plain predict img/s",
    "ratio",
    "fine-tune img/s (pipeline)",
    "plain fit img/s",
    "ratio",
    "target (>= 0.7)",
    "head val accuracy",
    "test accuracy",
]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_the_gpu_check_runs_in_quick_mode_on_jax_without_tensorflow(tmp_path):
    blocked = tmp_path / "no-tensorflow" / "tensorflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PIPELINE_LAUNCH")}
    # float32 on this CPU too (precision: auto takes bfloat16 on a CPU with avx512_bf16, which XLA
    # compiles and runs slower here): the GPU machine picks its policy by its GPU, not by these flags.
    env |= {"KERAS_BACKEND": "jax", "PYTHONPATH": str(blocked.parent), "PIPELINE_CPU_FLAGS": "none"}
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert done.stdout == text
    header, *rest = text.splitlines()
    assert "backend jax" in header and "policy " in header
    rows = [cells(line) for line in rest if line.startswith("|")]
    assert rows[0] == COLUMNS
    assert len(rows) == 3, text  # the column names, the alignment row, vgg16's row
    vgg16 = rows[2]
    assert vgg16[0] == "vgg16"
    speeds_and_ratios = vgg16[1:7]
    assert all(float(value) > 0 for value in speeds_and_ratios), vgg16
    accuracies = vgg16[8:10]
    assert all(0 <= float(value) <= 1 for value in accuracies), vgg16
