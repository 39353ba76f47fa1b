"""The prepared data set's index, data/prepared/manifest.csv: what `prepare` writes and later stages read.

One row per kept image: its path relative to the prepared folder, its label (class name), its
split and the sha256 of its decoded pixels.
"""

from __future__ import annotations

import csv
from pathlib import Path

from classifier.data.layout import SPLITS

MANIFEST = "manifest.csv"
FIELDS = ("path", "label", "split", "sha256")


def write(prepared: Path, rows: list[dict[str, str]]) -> None:
    with open(Path(prepared) / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["label"], r["path"])))


def read(prepared: Path) -> list[dict[str, str]]:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
