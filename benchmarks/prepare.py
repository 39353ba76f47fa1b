"""Throughput of the prepare stage on generated photos: images/second, and the table to compare.

    python benchmarks/prepare.py                     # 2,000 JPEGs of 500x375, all cores
    python benchmarks/prepare.py --images 500 --workers 1
    /usr/bin/time -v python benchmarks/prepare.py    # the system's view of the peak memory too

The generated photos are smooth gradients with noise (so JPEG sizes are realistic), half of them
landscape and half portrait, in two classes. Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from classifier import config
from classifier.data import cleaning


def generate(folder: Path, images: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    for i in range(images):
        cls = ("cat", "dog")[i % 2]
        base = rng.uniform(0, 255, 3) + 0.2 * (
            x[..., None] * rng.uniform(-1, 1, 3) + y[..., None] * rng.uniform(-1, 1, 3)
        )
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        if i % 4 >= 2:
            pixels = pixels.transpose(1, 0, 2)  # portrait
        path = folder / cls / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        started = time.perf_counter()
        generate(raw, args.images, (args.width, args.height))
        generated = time.perf_counter() - started
        per_class = args.images // 2
        params = config.parse(
            {"data": {"split": {"train": per_class // 2, "validation": per_class // 4, "test": per_class // 4}}}
        ).data
        started = time.perf_counter()
        report = cleaning.prepare(raw, Path(tmp) / "prepared", params, seed=0, workers=args.workers)
        seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    itself = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("images", f"{args.images} JPEG, {args.width}x{args.height}"),
        ("workers", str(args.workers)),
        ("generate (s)", f"{generated:.1f}"),
        ("prepare (s)", f"{seconds:.1f}"),
        ("prepare (images/s)", f"{args.images / seconds:.0f}"),
        ("kept", str(report["images_kept"])),
        ("peak RSS, main process (MiB)", f"{itself:.0f}"),
        ("peak RSS, largest worker (MiB)", f"{children:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value\n{'-' * width}  {'-' * 24}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
