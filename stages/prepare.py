"""Clean, de-duplicate and split the raw images into data/prepared/<split>/<class>/.

Every file is fully decoded (not judged by its header). What cannot be used is dropped and
counted by reason: empty, truncated, not_an_image, undecodable, decompression_bomb, too_small.
The rest is normalised (EXIF rotation applied, converted to RGB, longest side at most
`data.max_side`) and written as JPEG. Identical pictures (same decoded pixels) are kept once;
the same picture under two classes is a label conflict and all its copies are dropped.

The split is stratified per class, deterministic and stable: each picture's split follows from a
hash of its pixels and `seed` (see `assign_splits`), so the same data and seed give the same
split, adding files never moves an existing picture to another split, and no picture is in two
splits. A source that comes split (raw/train, and raw/validation, raw/test or both) keeps its
split; a missing validation split is carved from train, a missing test split from validation (or
train), both by the same hash (see `carve`). data/prepared/manifest.csv
lists every kept image (path, label, split, sha256), data/prepared/dropped.csv every dropped file
and why, reports/data.json the counts.

Run: dvc repro prepare   (or: python -m stages.prepare data/raw data/prepared reports/data.json)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages import common, config, manifest, pictures, tracking
from stages.common import StageError
from stages.layout import SOURCE_RECORD, SPLITS, files, split_folders, subfolders

log = logging.getLogger(__name__)

DROP_REASONS = ("empty", "truncated", "not_an_image", "undecodable", "decompression_bomb", "too_small")


@dataclass(frozen=True)
class Cleaned:
    """What became of one source file."""

    source: str  # path relative to the raw folder
    label: str
    sha256: str | None = None  # of the decoded RGB pixels; None when dropped
    reason: str | None = None  # why it was dropped


def clean_file(path: Path, label: str, raw: Path, staging: Path, params: config.DataParams) -> Cleaned:
    """Decode one file completely; if usable, write its normalised JPEG to staging/<sha256>.jpg.

    Decoding and normalising are `pictures.decode` (the same as `predict` and the served model
    use), so what is dropped and why is decided there, except `too_small`, judged here on the
    picture's size in the file (a large picture is decoded reduced). The sha256 (`pictures.sha256`)
    is of the decoded RGB picture before it is shrunk to `data.max_side`: of the full picture, as
    always, except that a picture at least twice `max_side` is now hashed as decoded reduced (by
    DCT scaling for a JPEG, `Image.reduce` otherwise), which moves only such pictures in the split.
    """
    source = path.relative_to(raw).as_posix()
    try:
        decoded = pictures.decode(path, params.max_side, params.max_pixels)
    except pictures.Unusable as err:
        return Cleaned(source, label, reason=err.reason)
    if min(decoded.original_size) < params.min_side:
        return Cleaned(source, label, reason="too_small")
    digest = pictures.sha256(decoded.image)
    staged = staging / f"{digest}.jpg"
    if not staged.exists():
        tmp = staged.with_name(f".{digest}.{os.getpid()}.jpg")
        tmp.write_bytes(pictures.jpeg_file(path, decoded, params.max_side))
        os.replace(tmp, staged)
    return Cleaned(source, label, sha256=digest)


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[Any]:
    """Worker processes that ignore Ctrl-C. It reaches every process of the terminal: the main
    process alone reports it (one line) and stops the workers, instead of each printing its
    traceback. They ignore it from birth (an ignored signal stays ignored in a new process), so
    also while they are still starting up."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        yield pool


def _clean_task(args: tuple) -> Cleaned:
    return clean_file(*args)


@dataclass(frozen=True)
class Source:
    path: Path
    label: str
    split: str | None  # as given by a pre-split source, else None


def list_sources(raw: Path) -> list[Source]:
    """Every file of raw/<class>/ or, for a pre-split source, raw/<split>/<class>/."""
    if splits := split_folders(raw):
        sources = [
            Source(path, cls.name, split)
            for split in SPLITS
            if split in splits
            for cls in subfolders(splits[split])
            for path in files(cls)
        ]
    else:
        sources = [Source(path, cls.name, None) for cls in subfolders(raw) for path in files(cls)]
    if not sources:
        raise StageError(f"{raw} holds no image: expected {raw}/<class>/<image files> (run the download stage)")
    return sources


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


def prepare(raw: Path, out: Path, params: config.DataParams, seed: int, workers: int | None = None) -> dict:
    """Fill `out` (empty) with the split images, manifest.csv and dropped.csv; return the report."""
    sources = list_sources(raw)
    given_folders = split_folders(raw)  # None: the source is not split
    presplit = given_folders is not None
    staging = out / ".staging"
    staging.mkdir(parents=True)
    tasks = [(src.path, src.label, raw, staging, params) for src in sources]
    workers = workers or os.cpu_count() or 1
    with _worker_pool(workers) as pool:
        results = list(tqdm(pool.imap(_clean_task, tasks, chunksize=16), total=len(tasks), desc="decoding", unit="img"))

    given_split = {src.path.relative_to(raw).as_posix(): src.split for src in sources}
    dropped = [(r.source, r.reason) for r in results if r.reason]
    by_sha: dict[str, list[Cleaned]] = defaultdict(list)
    for r in results:
        if r.sha256:
            by_sha[r.sha256].append(r)
    duplicates = conflicts = 0
    per_class: dict[str, dict[str, str | None]] = defaultdict(dict)  # label -> sha -> given split
    for sha, copies in by_sha.items():
        if len({c.label for c in copies}) > 1:
            conflicts += 1
            dropped += [(c.source, "label_conflict") for c in copies]
            continue
        # One copy is kept: in a pre-split source the one in the earliest split, so that no
        # picture is in two splits and the training split keeps what it was given.
        copies = sorted(copies, key=lambda c: (SPLITS.index(given_split[c.source] or "train"), c.source))
        duplicates += len(copies) - 1
        dropped += [(c.source, "duplicate") for c in copies[1:]]
        per_class[copies[0].label][sha] = given_split[copies[0].source]

    classes = sorted({src.label for src in sources})
    if len(per_class) < len(classes):
        empty = [c for c in classes if c not in per_class]
        raise StageError(
            f"no usable image in class(es) {', '.join(empty)} of {raw}; see dropped.csv and the warnings above"
        )
    rows: list[dict[str, str]] = []
    filled = 0
    carved: dict[str, set[str]] = {"validation": set(), "test": set()}  # split -> the splits it was carved from
    assigned: dict[str, str]
    for label in classes:
        if given_folders is not None:  # a pre-split source names the split of every picture
            assigned = {sha: split for sha, split in per_class[label].items() if split is not None}
            # Carved only when the source has no validation/ at all: a class without images in a
            # validation/ the source gives is more likely a mistake than a wish.
            needed = ["train", "validation"] if "validation" in given_folders else ["train"]
            missing = [name for name in needed if name not in assigned.values()]
            if missing:
                raise StageError(
                    f"class '{label}' of the split source has no usable image in {' or '.join(missing)}: "
                    "every class needs training images, and validation images when the source has validation/ "
                    "(without validation/, they are carved from train/)"
                )
            for name in ("validation", "test"):  # validation first: test may be carved from it
                if name not in assigned.values():
                    assigned, origin = carve(assigned, name, params.split, seed, label)
                    carved[name].add(origin)
        else:
            assigned, n = assign_splits(sorted(per_class[label]), params.split, seed, label)
            filled += n
        for sha, split in sorted(assigned.items(), key=lambda item: (SPLITS.index(item[1]), item[0])):
            rel = Path(split) / label / f"{sha[:20]}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{sha}.jpg", out / rel)
            rows.append({"path": rel.as_posix(), "label": label, "split": split, "sha256": sha})
    if filled:
        log.warning(
            "%d pictures were moved to fill splits short of their data.split count; with more images "
            "than the counts ask for (or with fractions), every picture keeps its own split",
            filled,
        )
    for leftover in staging.iterdir():  # pictures beyond the requested counts
        leftover.unlink()
    staging.rmdir()

    manifest.write(out, rows)
    with open(out / "dropped.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "reason"])
        writer.writerows(sorted(dropped))

    reasons = Counter(reason for _, reason in dropped if reason in DROP_REASONS)
    counts = {label: {split: 0 for split in SPLITS} for label in classes}
    for row in rows:
        counts[row["label"]][row["split"]] += 1
    source = json.loads((raw / SOURCE_RECORD).read_text()) if (raw / SOURCE_RECORD).is_file() else {}
    return {
        "classes": counts,
        "dropped": {reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        "duplicates": duplicates,
        "conflicts": conflicts,
        "files_read": len(sources),
        "images_kept": len(rows),
        "split": {
            "given": presplit,  # the source came split into train and validation, test or both
            "validation_carved_from": "+".join(sorted(carved["validation"])) or None,
            "test_carved_from": "+".join(sorted(carved["test"])) or None,
            "filled_short_splits": filled,
        },
        "source": {k: v for k, v in source.items() if k in ("source", "url", "sha256", "layout", "split_lists")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path, help="folder with one subfolder per class (the download stage's output)")
    parser.add_argument("output", type=Path, help="folder to write the split images to")
    parser.add_argument("report", type=Path, help="JSON report of the counts")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("prepare")  # its arguments and params are good: the run will open
    with tracking.stage_run("prepare", params):
        with common.atomic_dir(args.output) as tmp:
            report = prepare(args.raw, tmp, params.data, params.data.seed)
        common.write_json(args.report, report)
        # A cached output, not a DVC metric (its per-class counts would crowd `dvc exp show`), so
        # tracking logs no numbers from it: its numbers go to MLflow here, flattened as DVC would
        # (classes.<class>.<split>, dropped.<reason>, duplicates, conflicts, images_kept, ...).
        tracking.log_metrics(
            {
                key: value
                for key, value in config.flatten(report).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
        )
    log.info("kept %d of %d files; dropped %s", report["images_kept"], report["files_read"], report["dropped"])


if __name__ == "__main__":
    common.run(main)
