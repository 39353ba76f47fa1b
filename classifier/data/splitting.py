"""The split: stratified per class, deterministic and stable (a hash of each picture's pixels and
the seed), and the carving of missing validation or test splits from a source that comes split."""

from __future__ import annotations

import hashlib

from classifier import config
from classifier.data.layout import SPLITS
from classifier.errors import StageError


def split_point(sha256: str, seed: int) -> float:
    """A picture's fixed place in [0, 1), from its content and the seed alone."""
    return int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:16], 16) / 2**64


def _bucket(point: float, shares: dict[str, float]) -> str | None:
    """The split whose share of [0, 1) holds `point` (shares laid out in SPLITS order)."""
    edge = 0.0
    for name in SPLITS:
        edge += shares.get(name, 0.0)
        if point < edge:
            return name
    return None  # beyond the fractions' sum: not used


def assign_splits(shas: list[str], split: config.SplitParams, seed: int, label: str) -> tuple[dict[str, str], int]:
    """sha256 -> split for the pictures of one class, and how many had to fill a short split.

    Each picture has a fixed point in [0, 1) (`split_point`), and each split a fixed share of
    that interval (the fractions, or the counts' proportions), so a picture's split never depends
    on which other pictures exist: adding files moves no existing file to another split. With
    counts, each split then takes its first `count` pictures by point; only when a split's share
    holds fewer pictures than its count (when the class barely has enough pictures) is it filled
    from the other splits' unused pictures, which the returned number reports.
    """
    sizes = {"train": split.train, "validation": split.validation, "test": split.test}
    points = {sha: split_point(sha, seed) for sha in shas}
    if split.as_fractions:
        out = {sha: name for sha in shas if (name := _bucket(points[sha], sizes)) is not None}
        missing = [name for name in SPLITS if name not in out.values()]
        if missing:
            raise StageError(
                f"class '{label}' has {len(shas)} usable images and got none in {', '.join(missing)} "
                f"with data.split = {sizes}: use larger fractions, or more images"
            )
        return out, 0
    counts = {name: int(sizes[name]) for name in SPLITS}
    needed = sum(counts.values())
    if len(shas) < needed:
        raise StageError(
            f"class '{label}' has {len(shas)} usable images, but data.split asks for "
            f"{counts['train']} + {counts['validation']} + {counts['test']} = {needed} per class: "
            "lower the counts in params.yaml, or give fractions (e.g. train: 0.7, validation: 0.15, test: 0.15)"
        )
    shares = {name: counts[name] / needed for name in SPLITS}
    by_point = sorted(shas, key=points.__getitem__)
    chosen: dict[str, list[str]] = {name: [] for name in SPLITS}
    spare: list[str] = []
    for sha in by_point:
        name = _bucket(points[sha], shares) or SPLITS[-1]
        (chosen[name] if len(chosen[name]) < counts[name] else spare).append(sha)
    filled = 0
    for name in SPLITS:
        while len(chosen[name]) < counts[name]:
            chosen[name].append(spare.pop(0))
            filled += 1
    return {sha: name for name, picked in chosen.items() for sha in picked}, filled


def carve(
    given: dict[str, str], missing: str, split: config.SplitParams, seed: int, label: str
) -> tuple[dict[str, str], str]:
    """Carve the split `missing` (validation or test) that a pre-split source lacks out of one it
    gives: validation from train, test from validation or, when that is too small, from train.
    Returns the new splits and the split carved from.

    The share moved is the missing split's part of it and what the split carved from stands for,
    by data.split's counts (or fractions): validation / (train + validation) of train (400 / 1400
    with the defaults), test / (validation + test) of validation (half of it), test / (train +
    validation + test) of train. Which pictures move is fixed by `split_point`, so carving is
    deterministic and adding files moves no other picture: test takes the points below its share,
    validation the points above 1 - its share, so that when a class lacks both they never reach
    for the same pictures. A given split is never carved into: a given test split stays as given.
    """
    if missing == "validation":
        origins = [("train", split.validation / (split.train + split.validation))]
    else:
        origins = [
            ("validation", split.test / (split.validation + split.test)),
            ("train", split.test / (split.train + split.validation + split.test)),
        ]
    for origin, share in origins:
        pool = [sha for sha, name in given.items() if name == origin]
        if missing == "validation":
            moved = {sha for sha in pool if split_point(sha, seed) >= 1 - share}
        else:
            moved = {sha for sha in pool if split_point(sha, seed) < share}
        if moved and len(moved) < len(pool):
            return {sha: missing if sha in moved else name for sha, name in given.items()}, origin
    sizes = ", ".join(f"{sum(name == origin for name in given.values())} in {origin}/" for origin, _ in origins)
    raise StageError(
        f"class '{label}' of the split source has no {missing} images, and too few ({sizes}) to carve "
        f"{missing} images from: add a {missing}/ folder with images of every class"
    )
