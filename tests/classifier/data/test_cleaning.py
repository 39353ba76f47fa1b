"""The prepare stage: every file fully decoded, the unusable dropped and counted, a deterministic split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import config
from classifier.data import cleaning, layout, manifest, pictures, splitting
from classifier.errors import StageError


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
    report = cleaning.prepare(
        raw, tmp_path / "out", data_params(split={"train": 2, "validation": 2, "test": 2}), 0, workers=1
    )
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
        cleaning.prepare(raw, tmp_path / name, tiny_params.data, seed, workers=2)
        return {row["sha256"]: row["split"] for row in manifest.read(tmp_path / name)}

    first, again, other_seed = split_of(1, "a"), split_of(1, "b"), split_of(2, "c")
    assert first == again
    assert first != other_seed


def test_fractions_split_every_class(tmp_path, raw):
    params = data_params(split={"train": 0.5, "validation": 0.25, "test": 0.25})
    report = cleaning.prepare(raw, tmp_path / "out", params, 0, workers=1)
    for counts in report["classes"].values():
        assert sum(counts.values()) == 24
        assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0


def test_too_few_images_for_the_requested_counts(tmp_path, raw):
    params = data_params(split={"train": 20, "validation": 5, "test": 5})
    with pytest.raises(
        StageError, match=r"class '\w+' has 24 usable images, but data.split asks for 20 \+ 5 \+ 5 = 30"
    ):
        cleaning.prepare(raw, tmp_path / "out", params, 0, workers=1)


def test_a_class_left_without_a_usable_picture_stops_prepare_before_any_model_work(tmp_path, raw):
    shutil.copytree(raw / "horizontal", tmp_path / "raw" / "horizontal")
    (tmp_path / "raw" / "notes").mkdir()
    (tmp_path / "raw" / "notes" / "a.jpg").write_text("not a picture")
    (tmp_path / "raw" / "notes" / "b.jpg").write_bytes(b"")
    with pytest.raises(StageError, match=r"no usable image in class\(es\) notes of .*; see dropped.csv"):
        cleaning.prepare(
            tmp_path / "raw",
            tmp_path / "out",
            data_params(split={"train": 0.5, "validation": 0.25, "test": 0.25}),
            0,
            workers=1,
        )


def test_empty_raw_folder_is_explained(tmp_path):
    (tmp_path / "raw" / "cat").mkdir(parents=True)
    with pytest.raises(StageError, match="holds no image"):
        cleaning.prepare(tmp_path / "raw", tmp_path / "out", data_params(), 0, workers=1)


def test_duplicates_kept_once_and_label_conflicts_dropped(tmp_path):
    raw = tmp_path / "raw"
    for i in range(4):
        photo(raw / "cat" / f"c{i}.jpg", i)
        photo(raw / "dog" / f"d{i}.jpg", 100 + i)
    shutil.copyfile(raw / "cat" / "c0.jpg", raw / "cat" / "c0 copy.jpg")
    shutil.copyfile(raw / "cat" / "c1.jpg", raw / "dog" / "looks like a cat.jpg")
    params = data_params(split={"train": 1, "validation": 1, "test": 1})
    report = cleaning.prepare(raw, tmp_path / "out", params, 0, workers=1)
    assert report["duplicates"] == 1 and report["conflicts"] == 1
    dropped = (tmp_path / "out" / "dropped.csv").read_text()
    assert "cat/c1.jpg,label_conflict" in dropped and "dog/looks like a cat.jpg,label_conflict" in dropped


# A corpus of odd and broken files, each kind the real data sets hold.


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


def odd_corpus(cls: Path) -> dict[str, str | None]:
    """Write one file of each odd kind into `cls`; return file name -> expected drop reason (None: kept)."""
    rng = np.random.default_rng(3)
    pixels = lambda h=30, w=40: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    rgb = lambda: Image.fromarray(pixels())  # noqa: E731
    expected: dict[str, str | None] = {}

    def keep(name, image, fmt, **kwargs):
        _save(image, cls / name, fmt, **kwargs)
        expected[name] = None

    keep("png named.jpg", rgb(), "PNG")
    keep("gif named.jpg", rgb().convert("P"), "GIF")
    keep("bitmap.jpg", rgb(), "BMP")
    keep("webp.jpg", rgb(), "WEBP")
    keep("cmyk.jpg", rgb().convert("CMYK"), "JPEG")
    keep("gray.jpg", rgb().convert("L"), "JPEG")
    keep("chat noir é 猫.jpg", rgb(), "JPEG")
    rgba = Image.fromarray(np.dstack([pixels(), np.full((30, 40), 255, np.uint8)]))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # a transparent pixel: white in the output, not black
    keep("rgba.png", rgba, "PNG")
    palette = rgb().convert("P")
    palette.info["transparency"] = 0
    keep("palette transparent.png", palette, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    keep("rotated.jpg", Image.fromarray(pixels(30, 50)), "JPEG", exif=exif)

    (cls / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty"
    (cls / "readme.jpg").write_text("not a picture at all")
    expected["readme.jpg"] = "not_an_image"
    full = _save(Image.fromarray(pixels(40, 50)), cls.parent / "tmp.jpg", "JPEG").read_bytes()
    (cls.parent / "tmp.jpg").unlink()
    (cls / "truncated.jpg").write_bytes(full[: len(full) // 2])
    expected["truncated.jpg"] = "truncated"
    png = bytearray(_save(rgb(), cls.parent / "tmp.png", "PNG").read_bytes())
    (cls.parent / "tmp.png").unlink()
    start = png.index(b"IDAT") + 30
    png[start : start + 40] = bytes(b ^ 0xFF for b in png[start : start + 40])
    (cls / "corrupt.png").write_bytes(bytes(png))
    expected["corrupt.png"] = "undecodable"
    _save(Image.fromarray(pixels(60, 60)), cls / "huge.jpg", "JPEG")  # over the test's max_pixels
    expected["huge.jpg"] = "decompression_bomb"
    _save(Image.fromarray(pixels(8, 8)), cls / "tiny.jpg", "JPEG")
    expected["tiny.jpg"] = "too_small"
    for name in (".hidden.jpg", ".DS_Store", "Thumbs.db"):
        (cls / name).write_bytes(b"junk")  # ignored: not counted at all
    return expected


def test_odd_and_broken_files_each_get_their_verdict(tmp_path):
    raw = tmp_path / "raw"
    expected = odd_corpus(raw / "cat")
    for i in range(12):
        photo(raw / "dog" / f"d{i}.jpg", 200 + i)
    params = data_params(max_pixels=3000, split={"train": 0.5, "validation": 0.25, "test": 0.25})
    report = cleaning.prepare(raw, tmp_path / "out", params, 0, workers=2)

    assert report["files_read"] == len(expected) + 12, "hidden and OS files are not counted"
    reasons = dict(line.rsplit(",", 1) for line in (tmp_path / "out" / "dropped.csv").read_text().splitlines()[1:])
    assert reasons == {f"cat/{name}": reason for name, reason in expected.items() if reason}
    kept = [name for name, reason in expected.items() if reason is None]
    assert sum(report["classes"]["cat"].values()) == len(kept)
    assert report["dropped"] == {
        "empty": 1,
        "truncated": 1,
        "not_an_image": 1,
        "undecodable": 1,
        "decompression_bomb": 1,
        "too_small": 1,
    }

    rows = manifest.read(tmp_path / "out")
    for row in rows:
        with Image.open(tmp_path / "out" / row["path"]) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
    sizes = sorted(Image.open(tmp_path / "out" / r["path"]).size for r in rows if r["label"] == "cat")
    assert (30, 50) in sizes, "the EXIF-rotated photo is stored upright (portrait)"
    assert sizes.count((40, 30)) == len(kept) - 1


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    out = pictures.to_rgb(rgba)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)


def test_source_files_are_only_read(tmp_path, raw):
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    cleaning.prepare(raw, tmp_path / "out", data_params(split={"train": 5, "validation": 5, "test": 5}), 0, workers=1)
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before


# Split stability: adding files never moves an existing picture to another split.


def _splits(prepared: Path) -> dict[str, str]:
    rows = manifest.read(prepared)
    by_sha = {row["sha256"]: row["split"] for row in rows}
    assert len(by_sha) == len(rows), "no picture in two splits"
    return by_sha


@pytest.mark.parametrize(
    "split", [{"train": 10, "validation": 5, "test": 5}, {"train": 0.6, "validation": 0.2, "test": 0.2}]
)
def test_adding_files_moves_no_existing_picture(tmp_path, split):
    raw = tmp_path / "raw"
    for i in range(40):
        photo(raw / "cat" / f"c{i:03d}.jpg", i)
        photo(raw / "dog" / f"d{i:03d}.jpg", 1000 + i)
    params = data_params(split=split)
    first = cleaning.prepare(raw, tmp_path / "first", params, 0, workers=1)
    assert first["split"]["filled_short_splits"] == 0
    for i in range(40, 70):
        photo(raw / "cat" / f"c{i:03d}.jpg", i)
        photo(raw / "dog" / f"d{i:03d}.jpg", 1000 + i)
    cleaning.prepare(raw, tmp_path / "second", params, 0, workers=1)
    before, after = _splits(tmp_path / "first"), _splits(tmp_path / "second")
    common = before.keys() & after.keys()
    assert len(common) >= 20
    assert {sha: before[sha] for sha in common} == {sha: after[sha] for sha in common}


def test_exact_counts_are_met_even_when_a_share_is_short():
    shas = [f"{i:064x}" for i in range(30)]
    split = config.SplitParams(train=20, validation=5, test=5)
    assigned, filled = splitting.assign_splits(shas, split, 0, "cat")
    counts = {name: list(assigned.values()).count(name) for name in ("train", "validation", "test")}
    assert counts == {"train": 20, "validation": 5, "test": 5}
    # without the fill, each picture sits in its own share of [0, 1)
    shares = {"train": 20 / 30, "validation": 5 / 30, "test": 5 / 30}
    own = {sha: splitting._bucket(splitting.split_point(sha, 0), shares) for sha in shas}
    assert sum(own[sha] != name for sha, name in assigned.items()) == filled


# Sources that come already split.


def test_given_split_is_honoured_and_test_carved_from_validation(tmp_path):
    raw = tmp_path / "raw"
    for cls, base in (("cat", 0), ("dog", 500)):
        for i in range(8):
            photo(raw / "train" / cls / f"{i}.jpg", base + i)
        for i in range(8, 20):
            photo(raw / "validation" / cls / f"{i}.jpg", base + i)
    shutil.copyfile(raw / "train" / "cat" / "0.jpg", raw / "validation" / "cat" / "leak.jpg")
    report = cleaning.prepare(raw, tmp_path / "out", data_params(), 0, workers=1)
    assert report["split"] == {
        "given": True,
        "validation_carved_from": None,
        "test_carved_from": "validation",
        "filled_short_splits": 0,
    }
    assert report["duplicates"] == 1
    assert "validation/cat/leak.jpg,duplicate" in (tmp_path / "out" / "dropped.csv").read_text()
    for cls in ("cat", "dog"):
        counts = report["classes"][cls]
        assert counts["train"] == 8, "train is kept as given"
        assert counts["validation"] + counts["test"] == 12 and counts["test"] > 0 and counts["validation"] > 0
    _splits(tmp_path / "out")


def test_given_test_split_is_kept(tmp_path):
    raw = tmp_path / "raw"
    for split, n in (("train", 6), ("validation", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                photo(raw / split / cls / f"{i}.jpg", hash((split, cls, i)) % 10_000)
    report = cleaning.prepare(raw, tmp_path / "out", data_params(), 0, workers=1)
    assert report["classes"] == {c: {"train": 6, "validation": 3, "test": 2} for c in ("cat", "dog")}
    assert report["split"]["test_carved_from"] is None


def test_split_source_class_without_validation_images_is_explained(tmp_path):
    raw = tmp_path / "raw"
    for i in range(4):
        photo(raw / "train" / "cat" / f"{i}.jpg", i)
        photo(raw / "train" / "dog" / f"{i}.jpg", 50 + i)
    photo(raw / "validation" / "cat" / "v.jpg", 99)
    (raw / "validation" / "dog").mkdir(parents=True)
    with pytest.raises(StageError, match="class 'dog' of the split source has no usable image in validation"):
        cleaning.prepare(raw, tmp_path / "out", data_params(), 0, workers=1)


def pixels_sha(path: Path, params: config.DataParams) -> str:
    """The sha256 prepare gives the picture in `path` (the manifest's)."""
    return pictures.sha256(pictures.decode(path, params.max_side, params.max_pixels).image)


def test_given_split_without_validation_carves_it_from_train_and_keeps_test(tmp_path):
    """Stanford Dogs' layout: the published train and test lists, no validation."""
    raw = tmp_path / "raw"
    for cls, base in (("cat", 0), ("dog", 500)):
        for i in range(40):
            photo(raw / "train" / cls / f"{i}.jpg", base + i)
        for i in range(40, 46):
            photo(raw / "test" / cls / f"{i}.jpg", base + i)
    params = data_params()  # 1000 / 400 / 400: validation takes 400 / 1400 of train
    report = cleaning.prepare(raw, tmp_path / "out", params, 0, workers=1)
    assert report["split"] == {
        "given": True,
        "validation_carved_from": "train",
        "test_carved_from": None,
        "filled_short_splits": 0,
    }
    rows = manifest.read(tmp_path / "out")
    for cls in ("cat", "dog"):
        train = {pixels_sha(path, params) for path in (raw / "train" / cls).iterdir()}
        test = {pixels_sha(path, params) for path in (raw / "test" / cls).iterdir()}
        validation = {sha for sha in train if splitting.split_point(sha, 0) >= 1 - 400 / 1400}
        assert 4 <= len(validation) <= 20, "about 400 / 1400 of the 40"
        got = {name: {r["sha256"] for r in rows if (r["label"], r["split"]) == (cls, name)} for name in layout.SPLITS}
        assert got == {"train": train - validation, "validation": validation, "test": test}, "test kept as given"
        assert report["classes"][cls] == {"train": 40 - len(validation), "validation": len(validation), "test": 6}


def test_a_class_lacking_validation_and_test_gets_disjoint_shares_of_train():
    given = {f"{i:064x}": "train" for i in range(200)}
    split = config.SplitParams()  # 1000 / 400 / 400
    carved, origin = splitting.carve(given, "validation", split, 0, "cat")
    assert origin == "train"
    carved, origin = splitting.carve(carved, "test", split, 0, "cat")
    assert origin == "train", "validation is carved from train's other end: none of it falls in test's share"
    points = {sha: splitting.split_point(sha, 0) for sha in given}
    assert {sha for sha, name in carved.items() if name == "validation"} == {
        sha for sha, point in points.items() if point >= 1 - 400 / 1400
    }
    assert {sha for sha, name in carved.items() if name == "test"} == {
        sha for sha, point in points.items() if point < 400 / 1800
    }
    assert {sha for sha, name in carved.items() if name == "train"} == {
        sha for sha, point in points.items() if 400 / 1800 <= point < 1 - 400 / 1400
    }


def test_a_class_too_small_to_carve_validation_from_is_explained():
    with pytest.raises(
        StageError,
        match=r"class 'cat' of the split source has no validation images, and too few \(1 in train/\) to carve "
        r"validation images from: add a validation/ folder with images of every class",
    ):
        splitting.carve({"a" * 64: "train", "b" * 64: "test"}, "validation", config.SplitParams(), 0, "cat")


def test_split_source_without_train_is_explained(tmp_path):
    raw = tmp_path / "raw"
    for i, (split, cls) in enumerate([(s, c) for s in ("validation", "test") for c in ("cat", "dog")]):
        photo(raw / split / cls / "0.jpg", i)
    with pytest.raises(
        StageError,
        match=r"looks split \(test/, validation/\) but lacks train/: a split source needs train/ and at least one of "
        r"validation/ \(or val/\) and test/",
    ):
        cleaning.prepare(raw, tmp_path / "out", data_params(), 0, workers=1)
