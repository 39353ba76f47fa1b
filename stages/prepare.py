"""Clean, de-duplicate and split the raw images into data/prepared/<split>/<class>/.

Every file is fully decoded (not judged by its header). What cannot be used is dropped and
counted by reason: empty, truncated, not_an_image, undecodable, decompression_bomb, too_small.
The rest is normalised (EXIF rotation applied, converted to RGB, longest side at most
`data.max_side`) and written as JPEG. Identical pictures (same decoded pixels) are kept once;
the same picture under two classes is a label conflict and all its copies are dropped.

The split is stratified per class and deterministic: each picture's place follows from a hash of
its pixels and `seed`. With fractions (`data.split.train: 0.8` ...) a picture's split never
changes when other files are added; with counts (1000 / 400 / 400) the pictures are taken in
hash order. data/prepared/manifest.csv lists every kept image (path, label, split, sha256),
data/prepared/dropped.csv every dropped file and why, reports/data.json the counts.

Run: dvc repro prepare   (or: python -m stages.prepare data/raw data/prepared reports/data.json)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages import common, config, manifest, tracking
from stages.common import StageError
from stages.download import SOURCE_RECORD, is_ignored
from stages.manifest import SPLITS

log = logging.getLogger(__name__)

DROP_REASONS = ("empty", "truncated", "not_an_image", "undecodable", "decompression_bomb", "too_small")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Cleaned:
    """What became of one source file."""

    source: str  # path relative to the raw folder
    label: str
    sha256: str | None = None  # of the decoded RGB pixels; None when dropped
    reason: str | None = None  # why it was dropped


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (not on black, as a plain convert would)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def clean_file(path: Path, label: str, raw: Path, staging: Path, params: config.DataParams) -> Cleaned:
    """Decode one file completely; if usable, write its normalised JPEG to staging/<sha256>.jpg."""
    source = path.relative_to(raw).as_posix()
    if path.stat().st_size == 0:
        return Cleaned(source, label, reason="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes every pixel: truncation shows here, not in the header
                image = _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Cleaned(source, label, reason="decompression_bomb")
    except UnidentifiedImageError:
        return Cleaned(source, label, reason="not_an_image")
    except OSError as err:
        return Cleaned(source, label, reason="truncated" if "truncated" in str(err) else "undecodable")
    except Exception:  # a corrupt file can make any decoder raise anything
        return Cleaned(source, label, reason="undecodable")
    if min(image.size) < params.min_side:
        return Cleaned(source, label, reason="too_small")
    digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    staged = staging / f"{digest}.jpg"
    if not staged.exists():
        image.thumbnail((params.max_side, params.max_side), Image.Resampling.LANCZOS)
        tmp = staged.with_name(f".{digest}.{os.getpid()}.jpg")
        image.save(tmp, "JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, staged)
    return Cleaned(source, label, sha256=digest)


def _clean_task(args: tuple) -> Cleaned:
    return clean_file(*args)


def list_sources(raw: Path) -> list[tuple[Path, str]]:
    """(file, class) for every file under raw/<class>/, hidden and OS files left out, sorted."""
    files = []
    for cls in sorted(p for p in raw.iterdir() if p.is_dir() and not is_ignored(p)):
        for path in sorted(cls.rglob("*")):
            if path.is_file() and not any(is_ignored(Path(part)) for part in path.relative_to(cls).parts):
                files.append((path, cls.name))
    if not files:
        raise StageError(f"{raw} holds no image: expected {raw}/<class>/<image files> (run the download stage)")
    return files


def split_key(sha256: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def assign_splits(shas: list[str], split: config.SplitParams, seed: int, label: str) -> dict[str, str]:
    """sha256 -> split for the pictures of one class; pictures left out are not in the result."""
    sizes = {"train": split.train, "validation": split.validation, "test": split.test}
    if split.as_fractions:
        bounds, total = [], 0.0
        for name in SPLITS:
            total += sizes[name]
            bounds.append((total, name))
        out = {}
        for sha in shas:
            u = int(split_key(sha, seed)[:16], 16) / 2**64
            for bound, name in bounds:
                if u < bound:
                    out[sha] = name
                    break
        missing = [name for name in SPLITS if name not in out.values()]
        if missing:
            raise StageError(
                f"class '{label}' has {len(shas)} usable images and got none in {', '.join(missing)} "
                f"with data.split = {sizes}: use larger fractions, or more images"
            )
        return out
    counts = {name: int(sizes[name]) for name in SPLITS}
    needed = sum(counts.values())
    if len(shas) < needed:
        raise StageError(
            f"class '{label}' has {len(shas)} usable images, but data.split asks for "
            f"{counts['train']} + {counts['validation']} + {counts['test']} = {needed} per class: "
            "lower the counts in params.yaml, or give fractions (e.g. train: 0.7, validation: 0.15, test: 0.15)"
        )
    ordered = sorted(shas, key=lambda sha: split_key(sha, seed))
    out, start = {}, 0
    for name in SPLITS:
        for sha in ordered[start : start + counts[name]]:
            out[sha] = name
        start += counts[name]
    return out


def prepare(raw: Path, out: Path, params: config.DataParams, seed: int, workers: int | None = None) -> dict:
    """Fill `out` (empty) with the split images, manifest.csv and dropped.csv; return the report."""
    sources = list_sources(raw)
    staging = out / ".staging"
    staging.mkdir(parents=True)
    tasks = [(path, label, raw, staging, params) for path, label in sources]
    workers = workers or os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = list(
            tqdm(pool.imap(_clean_task, tasks, chunksize=16), total=len(tasks), desc="decoding", unit="img")
        )

    dropped = [(r.source, r.reason) for r in results if r.reason]
    by_sha: dict[str, list[Cleaned]] = defaultdict(list)
    for r in results:
        if r.sha256:
            by_sha[r.sha256].append(r)
    duplicates = 0
    conflicts = 0
    per_class: dict[str, list[str]] = defaultdict(list)
    for sha, copies in by_sha.items():
        labels = {c.label for c in copies}
        if len(labels) > 1:
            conflicts += 1
            dropped += [(c.source, "label_conflict") for c in copies]
            continue
        duplicates += len(copies) - 1
        dropped += [(c.source, "duplicate") for c in sorted(copies, key=lambda c: c.source)[1:]]
        per_class[copies[0].label].append(sha)

    classes = sorted({label for _, label in sources})
    if len(per_class) < len(classes):
        empty = [c for c in classes if c not in per_class]
        raise StageError(f"no usable image in class(es) {', '.join(empty)} of {raw}; see the decoding warnings above")
    rows = []
    for label in classes:
        assigned = assign_splits(sorted(per_class[label]), params.split, seed, label)
        for sha, split in sorted(assigned.items(), key=lambda item: (SPLITS.index(item[1]), item[0])):
            rel = Path(split) / label / f"{sha[:20]}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{sha}.jpg", out / rel)
            rows.append({"path": rel.as_posix(), "label": label, "split": split, "sha256": sha})
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
        "source": {k: v for k, v in source.items() if k in ("source", "url", "path", "sha256")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path, help="folder with one subfolder per class (the download stage's output)")
    parser.add_argument("output", type=Path, help="folder to write the split images to")
    parser.add_argument("report", type=Path, help="JSON report of the counts")
    args = parser.parse_args()
    params = config.load()
    with tracking.stage_run("prepare", params):
        with common.atomic_dir(args.output) as tmp:
            report = prepare(args.raw, tmp, params.data, params.seed)
        common.write_json(args.report, report)
        tracking.log_metrics(
            {f"dropped.{k}": v for k, v in report["dropped"].items()}
            | {"duplicates": report["duplicates"], "conflicts": report["conflicts"], "images_kept": report["images_kept"]}
        )
        tracking.log_artifact(args.report)
    log.info("kept %d of %d files; dropped %s", report["images_kept"], report["files_read"], report["dropped"])


if __name__ == "__main__":
    common.run(main)
