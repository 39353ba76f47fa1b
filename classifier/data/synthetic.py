"""A generated image data set for offline runs: classes differ by visual pattern, not by a constant.

Each class is one pattern (stripes of an orientation, checkerboard, rings, dots...) drawn with a
random frequency, phase, pair of colours and noise, so a classifier has to see the structure: mean
colour and brightness carry no label information.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from classifier.config import SyntheticParams

PATTERNS = ("horizontal", "vertical", "diagonal", "antidiagonal", "checkerboard", "rings", "dots", "waves")


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size float mask in [0, 1] of one pattern kind, randomly scaled and shifted."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(3.0, 7.0)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "horizontal":
        v = np.sin(2 * np.pi * freq * y + phase)
    elif kind == "vertical":
        v = np.sin(2 * np.pi * freq * x + phase)
    elif kind == "diagonal":
        v = np.sin(2 * np.pi * freq * (x + y) / np.sqrt(2) + phase)
    elif kind == "antidiagonal":
        v = np.sin(2 * np.pi * freq * (x - y) / np.sqrt(2) + phase)
    elif kind == "checkerboard":
        v = np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase)
    elif kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        v = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif kind == "dots":
        v = np.cos(2 * np.pi * freq * x + phase) + np.cos(2 * np.pi * freq * y + phase) - 1.0
    elif kind == "waves":
        v = np.sin(2 * np.pi * freq * y + 1.5 * np.sin(2 * np.pi * 2 * x) + phase)
    else:
        raise ValueError(f"unknown pattern {kind!r}; known: {', '.join(PATTERNS)}")
    return (v > 0).astype(np.float32)


def image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of `kind`: two random colours mixed by the pattern, plus noise."""
    mask = pattern(kind, size, rng)[..., None]
    fg, bg = rng.uniform(0, 255, size=(2, 3))
    pixels = mask * fg + (1 - mask) * bg + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(out: Path, params: SyntheticParams, seed: int) -> dict[str, int]:
    """Write `images_per_class` JPEGs per class into out/<class>/; return the count per class."""
    rng = np.random.default_rng(seed)
    counts = {}
    for kind in PATTERNS[: params.classes]:
        folder = Path(out) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(params.images_per_class):
            Image.fromarray(image(kind, params.size, rng)).save(folder / f"{kind}_{i:05d}.jpg", quality=92)
        counts[kind] = params.images_per_class
    return counts
