"""Fashion-MNIST (Zalando, MIT licence) as a source (`data.source: fashion_mnist`): 70,000 real 28x28
greyscale pictures of 10 kinds of clothing, as out/<class>/<index>.png, with no network where a
copy is on the machine.

Its four idx files (`FILES`) are read from the first place that has them: data/cache/fashion-mnist/
(an earlier download), then each of `LOCAL_FOLDERS` (Debian's package dataset-fashion-mnist, the
cache of Keras's `keras.datasets.fashion_mnist.load_data`); else they are downloaded from where
Keras downloads them (`URL`) into data/cache/fashion-mnist/ (classifier.data.fetch: resumed,
retried). Copies are recompressed (Debian's are), so a .gz file's own sha256 says nothing: every
file, wherever it came from, is checked by the sha256 of its decompressed contents (`CONTENTS`). A
local copy with other contents is skipped with a warning and left as it is (it is the user's, or
the system's); a download with other contents is discarded and refused.

The pictures taken are the first `per_class` of each class in a fixed order, the training file's
then the test file's, each named by its index in that order (0..59999 training, 60000..69999
test), so the same params give the same files, byte for byte.

Pillow and numpy only, no Keras: the download stage needs no framework.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from classifier import saving
from classifier.data import fetch
from classifier.errors import StageError
from classifier.params import FashionMnistParams

log = logging.getLogger(__name__)

#: Where Keras's `load_data` downloads the four files from (keras/src/datasets/fashion_mnist.py).
URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
#: data/cache/<this>/ holds the files this module downloads (see `lay_out`'s `cache`).
CACHE_NAME = "fashion-mnist"

#: sha256 of each file's decompressed contents: the published files'.
CONTENTS = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
#: (images, labels) of the training file, then of the test file: the order pictures are taken in.
FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)

#: The class folders, by label 0..9: the published names (T-shirt/top, ..., Ankle boot) made file-safe.
CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
#: Side of every picture, in pixels.
SIDE = 28
#: The idx magic numbers (big-endian): 0x0800 (unsigned bytes) + number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


#: Folders that may already hold the four .gz files, searched in order after data/cache/fashion-mnist/.
LOCAL_FOLDERS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    saving.keras_home() / "datasets" / "fashion-mnist",
)


def hint(url: str, dest: Path) -> str:
    """What to do without network."""
    return (
        "To work without network: install Debian's package dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist), or download {fetch.redact_url(url)} by hand and save it as "
        f"{dest} (the download stage takes it from there), or set data.source in params.yaml to 'synthetic' "
        "for generated data."
    )


def _decompressed(path: Path) -> bytes:
    """The contents of the gzip file at `path`; ValueError saying why when it cannot be read."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"not a gzip file that can be read ({err})") from err


def _checked(path: Path, name: str) -> tuple[bytes, str]:
    """(contents, sha256) of `path`, Fashion-MNIST's `name`; ValueError saying what is wrong."""
    data = _decompressed(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != CONTENTS[name]:
        raise ValueError(f"its decompressed contents have sha256 {digest}, not Fashion-MNIST's {CONTENTS[name]}")
    return data, digest


def local_copy(cache: Path | None = None) -> Path | None:
    """The first of cache/ (when given) and `LOCAL_FOLDERS` that holds all four files (their contents
    are checked when read), or None: whether the data set can be laid out without network."""
    for folder in (*([cache] if cache else []), *LOCAL_FOLDERS):
        if all((folder / f"{name}.gz").is_file() for name in CONTENTS):
            return folder
    return None


def read(name: str, cache: Path) -> tuple[bytes, str]:
    """The contents of the file `name` and their sha256: from the first of cache/ and `LOCAL_FOLDERS`
    that holds `name`.gz with the expected contents, else downloaded from `URL` into cache/."""
    dest = cache / f"{name}.gz"
    for folder in (cache, *LOCAL_FOLDERS):
        path = folder / f"{name}.gz"
        if not path.is_file():
            continue
        try:
            data, digest = _checked(path, name)
        except (ValueError, OSError) as err:
            log.warning("skipped %s: %s", path, err)
            continue
        log.info("%s: read from %s", name, path)
        return data, digest
    url = URL + dest.name
    if dest.exists():
        # The skipped copy in our own cache: kept aside, not deleted (it may have been put there by hand).
        aside = dest.with_name(dest.name + ".mismatch")
        dest.replace(aside)
        log.warning("moved %s to %s, to download it anew", dest, aside)
    log.info("%s: downloading %s", name, fetch.redact_url(url))
    fetch.fetch(url, dest, hint=hint(url, dest))
    try:
        data, digest = _checked(dest, name)
    except ValueError as err:
        dest.unlink()  # as fetch does with a download of the wrong hash: keeping it could never help
        raise StageError(
            f"{fetch.redact_url(url)} was downloaded, but {err}: it is not {name}; the download was discarded. "
            f"Check the URL (classifier.data.fashion_mnist.URL), or use a copy of the file.\n{hint(url, dest)}"
        ) from err
    log.info("%s: read from %s", name, fetch.redact_url(url))
    return data, digest


def parse_idx(data: bytes, name: str, magic: int) -> np.ndarray:
    """The uint8 array an idx file holds: (n, 28, 28) pictures (`IMAGES_MAGIC`) or n labels 0..9
    (`LABELS_MAGIC`). Its header and size are checked: a bad file is a StageError naming it."""
    dims = magic & 0xFF
    header = 4 + 4 * dims
    what = "pictures" if magic == IMAGES_MAGIC else "labels"

    def bad(problem: str) -> StageError:
        return StageError(
            f"{name} is not Fashion-MNIST's idx file of {what}: {problem}. It is damaged or another file: "
            f"delete {name}.gz where it was read from (the log says where) and run again to download it anew, "
            "or replace it with the published file"
        )

    if len(data) >= 4 and (found := int.from_bytes(data[:4], "big")) != magic:
        raise bad(f"its magic number is 0x{found:08x}, not 0x{magic:08x}")
    if len(data) < header:
        raise bad(f"{len(data)} bytes, shorter than its {header}-byte header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if magic == IMAGES_MAGIC and shape[1:] != (SIDE, SIDE):
        raise bad(f"its pictures are {shape[1]}x{shape[2]}, not {SIDE}x{SIDE}")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise bad(f"{len(data)} bytes, but its header announces {shape[0]} {what}: {expected} bytes")
    array = np.frombuffer(data, np.uint8, offset=header).reshape(shape)
    if magic == LABELS_MAGIC and array.size and int(array.max()) >= len(CLASSES):
        raise bad(f"it holds the label {int(array.max())}, but the labels are 0..{len(CLASSES) - 1}")
    return array


def load(cache: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pictures, labels) of the training file then the test file, and {file: {"sha256": ...}}
    of the contents read."""
    images, labels, record = [], [], {}
    for images_name, labels_name in FILES:
        contents = {}
        for name in (images_name, labels_name):
            contents[name], digest = read(name, cache)
            record[name] = {"sha256": digest}
        pictures = parse_idx(contents[images_name], images_name, IMAGES_MAGIC)
        classes = parse_idx(contents[labels_name], labels_name, LABELS_MAGIC)
        if len(pictures) != len(classes):
            raise StageError(
                f"{images_name} holds {len(pictures)} pictures but {labels_name} {len(classes)} labels: they are "
                "not a pair of Fashion-MNIST's files. Delete both .gz files where they were read from (the log "
                "says where) and run again to download them anew"
            )
        images.append(pictures)
        labels.append(classes)
    return np.concatenate(images), np.concatenate(labels), record


def lay_out(out: Path, params: FashionMnistParams, cache: Path) -> dict:
    """Write the first `params.per_class` pictures of each class as out/<class>/<index>.png (28x28
    greyscale; index zero-padded to 5 digits) and return the record for source.json.

    `cache` is data/cache/fashion-mnist/. The record names the files by their contents' sha256
    alone, never by where they were read (logged instead): data/raw is a DVC output, and must be
    the same on every machine.
    """
    images, labels, files = load(cache)
    counts = {}
    for label, name in enumerate(CLASSES):
        taken = np.flatnonzero(labels == label)[: params.per_class]
        if len(taken) < params.per_class:
            log.warning(
                "%s: %d pictures, fewer than data.fashion_mnist.per_class (%d)", name, len(taken), params.per_class
            )
        folder = out / name
        if len(taken):
            folder.mkdir(parents=True, exist_ok=True)
        for index in taken:
            # No metadata is written (no time, no software name): the same pixels give the same bytes.
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png", format="PNG")
        counts[name] = len(taken)
    log.info("classes: %s", ", ".join(f"{name} ({n})" for name, n in counts.items()))
    return {"source": "fashion_mnist", "files": files, "layout": "classes", "classes": counts}
