"""data/raw -> data/prepared (`prepare`): every picture fully decoded, cleaned, de-duplicated and
written as JPEG; what cannot be used is dropped and counted by reason."""

from __future__ import annotations

import contextlib
import csv
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

from classifier import config, saving
from classifier.data import manifest, pictures
from classifier.data.layout import SOURCE_RECORD, SPLITS, files, split_folders, subfolders
from classifier.data.splitting import assign_splits, carve
from classifier.errors import StageError

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
        writer.writerows((saving.csv_text(source), reason) for source, reason in sorted(dropped))

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
