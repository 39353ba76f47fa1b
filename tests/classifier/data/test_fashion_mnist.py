"""The fashion_mnist source: idx files checked, read from the first good copy (else downloaded), and
laid out as the first pictures of each class, byte for byte the same on every run."""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import config
from classifier.data import fashion_mnist, sources
from classifier.errors import StageError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")

#: Labels of the tiny training file (classes 0..4 three times, 5..9 twice) and of the test file.
TRAIN_LABELS = [i % 10 for i in range(25)]
TEST_LABELS = list(range(10))


def idx(array: np.ndarray, magic: int) -> bytes:
    """`array` (uint8) as an idx file: magic, one count per dimension, then the bytes."""
    dims = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def tiny_files() -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """({file name: contents}, pictures, labels) of a tiny Fashion-MNIST: 25 training and 10 test pictures."""
    rng = np.random.default_rng(0)
    labels = np.array(TRAIN_LABELS + TEST_LABELS, np.uint8)
    pictures = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    n = len(TRAIN_LABELS)
    contents = {
        "train-images-idx3-ubyte": idx(pictures[:n], fashion_mnist.IMAGES_MAGIC),
        "train-labels-idx1-ubyte": idx(labels[:n], fashion_mnist.LABELS_MAGIC),
        "t10k-images-idx3-ubyte": idx(pictures[n:], fashion_mnist.IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": idx(labels[n:], fashion_mnist.LABELS_MAGIC),
    }
    return contents, pictures, labels


def write_gz(folder: Path, contents: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny files' contents, pictures and labels: their hashes pinned, and two empty local folders
    (tmp/debian, tmp/keras) searched instead of the machine's. The test runs in tmp_path."""
    contents, pictures, labels = tiny_files()
    monkeypatch.setattr(
        fashion_mnist, "CONTENTS", {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    )
    monkeypatch.setattr(fashion_mnist, "LOCAL_FOLDERS", (tmp_path / "debian", tmp_path / "keras"))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    return contents, pictures, labels


def per_class(n: int) -> config.DataParams:
    """Data params for fashion_mnist with `n` pictures per class."""
    return config.parse({"data": {"source": "fashion_mnist", "min_side": 28, "fashion_mnist": {"per_class": n}}}).data


def pngs(out: Path) -> dict[str, bytes]:
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*.png"))}


@pytest.mark.parametrize(
    ("data", "magic", "message"),
    [
        (b"\x00\x00\x08", fashion_mnist.LABELS_MAGIC, "3 bytes, shorter than its 8-byte header"),
        (idx(np.zeros(3), fashion_mnist.LABELS_MAGIC), fashion_mnist.IMAGES_MAGIC, "magic number is 0x00000801"),
        (idx(np.zeros((2, 28, 27)), fashion_mnist.IMAGES_MAGIC), fashion_mnist.IMAGES_MAGIC, "are 28x27, not 28x28"),
        (idx(np.zeros(3), fashion_mnist.LABELS_MAGIC)[:-1], fashion_mnist.LABELS_MAGIC, "10 bytes, but its header"),
        (idx(np.array([1, 10]), fashion_mnist.LABELS_MAGIC), fashion_mnist.LABELS_MAGIC, "holds the label 10"),
    ],
    ids=["short", "magic", "side", "size", "label"],
)
def test_a_bad_idx_file_is_refused_naming_it_and_the_fix(data, magic, message):
    with pytest.raises(StageError) as err:
        fashion_mnist.parse_idx(data, "some-idx-file", magic)
    assert message in str(err.value)
    assert str(err.value).startswith("some-idx-file is not Fashion-MNIST's idx file of ")
    assert "delete some-idx-file.gz where it was read from" in str(err.value)


def test_first_pictures_of_each_class_training_file_first_byte_stable(tiny, tmp_path):
    contents, pictures, labels = tiny
    write_gz(tmp_path / "keras", contents)
    params = per_class(3).fashion_mnist
    record = fashion_mnist.lay_out(tmp_path / "raw", params, tmp_path / "cache")
    # classes 0..4 have 3 training pictures; 5..9 have 2, and their third is the test file's (25 + label)
    expected = {
        f"{fashion_mnist.CLASSES[c]}/{i:05d}.png": i
        for c in range(10)
        for i in [*(j for j, label in enumerate(TRAIN_LABELS) if label == c), 25 + c][:3]
    }
    written = pngs(tmp_path / "raw")
    assert list(written) == sorted(expected)
    for name, index in expected.items():
        with Image.open(tmp_path / "raw" / name) as picture:
            assert picture.format == "PNG" and picture.mode == "L" and picture.size == (28, 28)
            assert np.array_equal(np.asarray(picture), pictures[index]), name
            assert labels[index] == fashion_mnist.CLASSES.index(name.split("/")[0])
    assert record == {
        "source": "fashion_mnist",
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()},
        "layout": "classes",
        "classes": dict.fromkeys(fashion_mnist.CLASSES, 3),
    }
    fashion_mnist.lay_out(tmp_path / "again", params, tmp_path / "cache")
    assert pngs(tmp_path / "again") == written, "the same params give the same bytes"
    assert not (tmp_path / "cache").exists(), "nothing downloaded when a local copy is there"


def test_a_local_copy_with_other_contents_is_skipped_and_left_untouched(tiny, tmp_path, caplog):
    contents, _, _ = tiny
    write_gz(tmp_path / "keras", contents)
    wrong = tmp_path / "debian" / "train-labels-idx1-ubyte.gz"
    wrong.parent.mkdir()
    wrong.write_bytes(gzip.compress(contents["train-labels-idx1-ubyte"][:-1] + b"\x00", mtime=0))
    broken = tmp_path / "cache" / "t10k-images-idx3-ubyte.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not gzip")
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (wrong, broken)}
    with caplog.at_level(logging.WARNING, logger=fashion_mnist.__name__):
        record = fashion_mnist.lay_out(tmp_path / "raw", per_class(1).fashion_mnist, tmp_path / "cache")
    assert record["classes"] == dict.fromkeys(fashion_mnist.CLASSES, 1)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (wrong, broken)} == before
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipped {wrong}: its decompressed contents have sha256 " in warnings
    assert f"skipped {broken}: not a gzip file that can be read" in warnings


def test_downloaded_into_the_cache_when_no_copy_is_here(tiny, tmp_path, monkeypatch, http_root):
    contents, _, _ = tiny
    served, base = http_root
    write_gz(served, contents)
    monkeypatch.setattr(fashion_mnist, "URL", f"{base}/")
    cache = tmp_path / "data" / "cache" / "fashion-mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(b"damaged")  # skipped, then kept aside
    record = sources.download(per_class(2), 0, tmp_path / "raw")
    assert record["classes"] == dict.fromkeys(fashion_mnist.CLASSES, 2)
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        [*(f"{name}.gz" for name in contents), "train-images-idx3-ubyte.gz.mismatch"]
    )
    assert (cache / "train-images-idx3-ubyte.gz.mismatch").read_bytes() == b"damaged"
    for path in served.iterdir():  # a second run needs no network
        path.unlink()
    assert sources.download(per_class(2), 0, tmp_path / "raw2") == record
    assert pngs(tmp_path / "raw2") == pngs(tmp_path / "raw")


def test_a_download_with_other_contents_is_refused_and_discarded(tiny, tmp_path, monkeypatch, http_root):
    contents, _, _ = tiny
    served, base = http_root
    write_gz(served, contents | {"train-images-idx3-ubyte": contents["t10k-images-idx3-ubyte"]})
    monkeypatch.setattr(fashion_mnist, "URL", f"{base}/")
    with pytest.raises(StageError) as err:
        sources.download(per_class(2), 0, tmp_path / "raw")
    message = str(err.value)
    assert message.startswith(f"{base}/train-images-idx3-ubyte.gz was downloaded, but its decompressed contents ")
    assert "the download was discarded" in message and "apt-get install dataset-fashion-mnist" in message
    assert not (tmp_path / "data" / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()


def test_params_need_min_side_28_and_per_class_in_range():
    with pytest.raises(config.ParamsError) as err:
        config.parse({"data": {"source": "fashion_mnist"}})
    assert str(err.value) == (
        "params.yaml: data.min_side = 32 is not valid: Fashion-MNIST's pictures are 28x28, so prepare would drop "
        "every one as too small: set data.min_side: 28 (or lower)"
    )
    assert per_class(7000).fashion_mnist.per_class == 7000
    for bad in (0, 7001):
        with pytest.raises(config.ParamsError, match=r"data\.fashion_mnist\.per_class = .* must be 1\.\.7000"):
            per_class(bad)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason=f"needs {DEBIAN}: apt-get install dataset-fashion-mnist")
def test_the_real_files_of_debians_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "LOCAL_FOLDERS", (DEBIAN,))
    record = fashion_mnist.lay_out(tmp_path / "raw", per_class(3).fashion_mnist, tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "raw").iterdir()) == sorted(fashion_mnist.CLASSES)
    assert len(pngs(tmp_path / "raw")) == 30
    assert record["files"] == {name: {"sha256": digest} for name, digest in fashion_mnist.CONTENTS.items()}
    assert (tmp_path / "raw" / "Ankle_boot" / "00000.png").is_file(), "the first training picture is an ankle boot"
    assert not (tmp_path / "cache").exists()
