"""The prepared data set's index, data/prepared/manifest.csv: what `prepare` writes and later stages read.

One row per kept image: its path relative to the prepared folder, its label (class name), its
split and the sha256 of its decoded pixels. Paths and labels are written as `saving.csv_text`, so
that a spreadsheet opening the file runs no class name as a formula.
"""

from __future__ import annotations

import csv
from pathlib import Path

from classifier.data.layout import SPLITS
from classifier.saving import csv_text, from_csv_text

MANIFEST = "manifest.csv"
FIELDS = ("path", "label", "split", "sha256")


def write(prepared: Path, rows: list[dict[str, str]]) -> None:
    with open(Path(prepared) / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["label"], r["path"])):
            writer.writerow(row | {"path": csv_text(row["path"]), "label": csv_text(row["label"])})


def read(prepared: Path) -> list[dict[str, str]]:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with open(path, newline="", encoding="utf-8") as f:
        return [
            row | {"path": from_csv_text(row["path"]), "label": from_csv_text(row["label"])}
            for row in csv.DictReader(f)
        ]
