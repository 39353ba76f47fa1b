"""The prepare stage: every file fully decoded, the unusable dropped and counted, a deterministic split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import config, manifest, prepare
from stages.common import StageError


def data_params(**kwargs) -> config.DataParams:
    return config.parse({"data": {"image_size": 32, "min_side": 16, "max_side": 64, **kwargs}}).data


def photo(path: Path, seed: int, size=(40, 30), fmt="JPEG") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


def test_broken_files_are_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    for i in range(6):
        photo(raw / "cat" / f"c{i}.jpg", i)
        photo(raw / "dog" / f"d{i}.jpg", 100 + i)
    (raw / "cat" / "empty.jpg").write_bytes(b"")
    (raw / "cat" / "notes.jpg").write_text("this is not a picture")
    full = photo(tmp_path / "full.jpg", 999, size=(60, 60)).read_bytes()
    (raw / "dog" / "cut.jpg").write_bytes(full[: len(full) // 2])
    photo(raw / "dog" / "tiny.jpg", 5, size=(8, 8))
    report = prepare.prepare(raw, tmp_path / "out", data_params(split={"train": 2, "validation": 2, "test": 2}), 0, workers=1)
    assert report["dropped"] == {
        "empty": 1,
        "not_an_image": 1,
        "truncated": 1,
        "undecodable": 0,
        "decompression_bomb": 0,
        "too_small": 1,
    }
    assert report["files_read"] == 16 and report["images_kept"] == 12
    assert report["classes"] == {c: {"train": 2, "validation": 2, "test": 2} for c in ("cat", "dog")}
    dropped = (tmp_path / "out" / "dropped.csv").read_text().splitlines()
    assert "cat/empty.jpg,empty" in dropped and "dog/cut.jpg,truncated" in dropped


def test_manifest_lists_split_class_files_that_decode(tmp_path, prepared, tiny_params):
    rows = manifest.read(prepared)
    split = tiny_params.data.split
    assert len(rows) == 2 * (split.train + split.validation + split.test)
    for row in rows:
        path = prepared / row["path"]
        assert path.parts[-3:-1] == (row["split"], row["label"])
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= tiny_params.data.max_side
    assert len({row["sha256"] for row in rows}) == len(rows), "no picture twice"


def test_split_is_deterministic_and_follows_the_seed(tmp_path, raw, tiny_params):
    def split_of(seed: int, name: str) -> dict[str, str]:
        prepare.prepare(raw, tmp_path / name, tiny_params.data, seed, workers=2)
        return {row["sha256"]: row["split"] for row in manifest.read(tmp_path / name)}

    first, again, other_seed = split_of(1, "a"), split_of(1, "b"), split_of(2, "c")
    assert first == again
    assert first != other_seed


def test_fractions_split_every_class(tmp_path, raw):
    params = data_params(split={"train": 0.5, "validation": 0.25, "test": 0.25})
    report = prepare.prepare(raw, tmp_path / "out", params, 0, workers=1)
    for counts in report["classes"].values():
        assert sum(counts.values()) == 24
        assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0


def test_too_few_images_for_the_requested_counts(tmp_path, raw):
    params = data_params(split={"train": 20, "validation": 5, "test": 5})
    with pytest.raises(StageError, match=r"class '\w+' has 24 usable images, but data.split asks for 20 \+ 5 \+ 5 = 30"):
        prepare.prepare(raw, tmp_path / "out", params, 0, workers=1)


def test_empty_raw_folder_is_explained(tmp_path):
    (tmp_path / "raw" / "cat").mkdir(parents=True)
    with pytest.raises(StageError, match="holds no image"):
        prepare.prepare(tmp_path / "raw", tmp_path / "out", data_params(), 0, workers=1)


def test_duplicates_kept_once_and_label_conflicts_dropped(tmp_path):
    raw = tmp_path / "raw"
    for i in range(4):
        photo(raw / "cat" / f"c{i}.jpg", i)
        photo(raw / "dog" / f"d{i}.jpg", 100 + i)
    shutil.copyfile(raw / "cat" / "c0.jpg", raw / "cat" / "c0 copy.jpg")
    shutil.copyfile(raw / "cat" / "c1.jpg", raw / "dog" / "looks like a cat.jpg")
    params = data_params(split={"train": 1, "validation": 1, "test": 1})
    report = prepare.prepare(raw, tmp_path / "out", params, 0, workers=1)
    assert report["duplicates"] == 1 and report["conflicts"] == 1
    dropped = (tmp_path / "out" / "dropped.csv").read_text()
    assert "cat/c1.jpg,label_conflict" in dropped and "dog/looks like a cat.jpg,label_conflict" in dropped
