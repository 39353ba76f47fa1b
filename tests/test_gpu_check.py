"""The GPU check (benchmarks/gpu.py) in its quick mode, on Keras's JAX backend as on the GPU machine,
where TensorFlow is not installed: here `import tensorflow` fails in the check's process. About a
minute on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from tests.workspace import without_tensorflow

ROOT = Path(__file__).resolve().parents[1]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The quick check run to its end, on JAX, with `import tensorflow` failing: its process and files."""
    folder = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PIPELINE_LAUNCH")}
    # float32 on this CPU too (precision: auto takes bfloat16 on a CPU with avx512_bf16, which XLA
    # compiles and runs slower here): the GPU machine picks its policy by its GPU, not by these flags.
    env |= {"KERAS_BACKEND": "jax", "PYTHONPATH": without_tensorflow(folder), "PIPELINE_CPU_FLAGS": "none"}
    out = folder / "table.md"
    with open(folder / "stderr.log", "w") as errors, open(folder / "stdout.log", "w") as printed:
        process = subprocess.Popen(
            [sys.executable, "benchmarks/gpu.py", "--quick", "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=printed,
            stderr=errors,
        )
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("benchmarks/gpu.py --quick did not end within 300 s")
    return {"process": process, "folder": folder, "out": out}


@pytest.mark.slow
def test_the_gpu_check_runs_in_quick_mode_on_jax_without_tensorflow(check):
    folder = check["folder"]
    assert check["process"].returncode == 0, (folder / "stderr.log").read_text()[-4000:]
    text = check["out"].read_text()
    assert (folder / "stdout.log").read_text() == text
    header, *rest = text.splitlines()
    assert "backend jax" in header and "policy " in header
    rows = [cells(line) for line in rest if line.startswith("|")]
    assert rows[0] == list(gpu.COLUMNS)
    assert len(rows) == 3, text  # the column names, the alignment row, vgg16's row
    vgg16 = rows[2]
    assert vgg16[0] == "vgg16"
    speeds_and_ratios = vgg16[1:7]
    assert all(float(value) > 0 for value in speeds_and_ratios), vgg16
    accuracies = vgg16[8:10]
    assert all(0 <= float(value) <= 1 for value in accuracies), vgg16
