"""Fetch the data set named by `data.source` into data/raw/, as fetched, verified.

Sources: a preset (`cats_vs_dogs`, `stanford_dogs`), an http(s) URL of an archive, a local archive
(.zip, .tar, .tar.gz, .tgz), a local folder with one subfolder per class (or one already split
into train/ and validation/ (or val/), test/ or both, each with class subfolders), or `synthetic`
(generated offline). A preset that publishes its own split (Stanford Dogs' lists.tar) is laid out
split, as its lists say. Downloads (stages/fetch.py) stream with a progress bar into
data/cache/ under a temporary name, resume after an interruption, and are renamed when complete
and verified; data/cache/ also takes an archive downloaded by hand. Archives are extracted member
by member: a member whose path would land outside the target, or a link, is refused and reported.
The source is only read, never changed. data/raw/source.json records what was read and its sha256.

Run: dvc repro download   (or: python -m stages.download data/raw)
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import logging
import os
import shutil
import tarfile
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from scipy.io import loadmat  # type: ignore[import-untyped]
from scipy.io.matlab import MatReadError  # type: ignore[import-untyped]

from stages import common, config, fetch, synthetic, tracking
from stages.common import StageError, project_root
from stages.fetch import CHUNK, sha256_file
from stages.layout import SOURCE_RECORD, files, split_folders, subfolders

log = logging.getLogger(__name__)

CACHE_DIR = Path("data/cache")  # under the project folder (see cache_path)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
#: Guards against archive bombs: refuse to extract more than this.
MAX_EXTRACTED_BYTES = 64 * 2**30
MAX_EXTRACTED_FILES = 2_000_000
#: How many refused archive members source.json lists by name (all are counted).
LISTED_REFUSALS = 100
#: No photo collection compresses this well: an archive that expands more is a bomb...
MAX_RATIO = 100
#: ... once it expands beyond this (small archives of text or blank images may compress better).
BOMB_FLOOR = 256 * 2**20
#: Kept free on the disk beyond what an archive declares it needs.
FREE_MARGIN = 2**30
#: download's temporary folders, beside data/raw: .tmp-raw.<name>.
WORK_FOLDERS = ("extract", "lists", "split")


def strip_wordnet_id(folder: str) -> str:
    """'n02085620-Chihuahua' -> 'Chihuahua' (the Stanford Dogs folders are ImageNet synset ids)."""
    synset, sep, name = folder.partition("-")
    return name if sep and synset[:1] == "n" and synset[1:].isdigit() and name else folder


@dataclass(frozen=True)
class SplitLists:
    """A data set's published split: an archive of MATLAB files, one per split, each listing the
    paths (relative to the preset's `root`) of that split's images in a cell array."""

    url: str
    sha256: str | None  # pinned when known
    files: tuple[tuple[str, str], ...]  # (split, path of its .mat file in the archive)
    variable: str = "file_list"  # the cell array of image paths in each .mat file


@dataclass(frozen=True)
class Preset:
    url: str
    sha256: str | None  # pinned when known
    root: str  # folder inside the archive that holds one subfolder per class
    class_name: Callable[[str], str] = str  # class folder name -> class name
    split: SplitLists | None = None  # the published split, if any: data/raw is then laid out split


PRESETS = {
    "cats_vs_dogs": Preset(
        url="https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
        sha256=None,
        root="PetImages",
    ),
    "stanford_dogs": Preset(
        url="http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
        sha256=None,
        root="Images",
        class_name=strip_wordnet_id,
        # 100 training images per breed, the rest for testing: the split the data set's papers use.
        split=SplitLists(
            url="http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
            sha256=None,
            files=(("train", "train_list.mat"), ("test", "test_list.mat")),
        ),
    ),
}
assert set(PRESETS) | {"synthetic"} == set(config.PRESETS), "config.PRESETS names the same presets"


def cache_path(url: str, preset: bool) -> Path:
    """Where the archive of `url` is kept: data/cache/<name> for a preset, else under a folder
    named by a hash of the URL (its secrets redacted, so a renewed signature finds the same file),
    so two URLs with the same file name never share a file."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    cache = project_root() / CACHE_DIR  # shared by queued experiments, which run in temporary copies
    if preset:
        return cache / name
    return cache / hashlib.sha256(fetch.redact_url(url).encode()).hexdigest()[:12] / name


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def offline_hint(url: str, cached: Path) -> str:
    return (
        f"To work without network: download {fetch.redact_url(url)} by hand and save it as {cached} "
        "(the download stage takes it from there), or set data.source in params.yaml to a local "
        "archive or a folder with one subfolder per class, or to 'synthetic' for generated data."
    )


def cached_download(url: str, pinned: str | None, *, preset: bool, pinned_by: str) -> tuple[Path, str]:
    """The file at `url` in data/cache/ (see `cache_path`) and its sha256, downloaded unless it is
    there already (from an earlier run, or put there by hand: the offline hint says so).

    A cached file that differs from `pinned` is moved aside, not deleted (it may have been put there
    by hand), so that the next run downloads a fresh copy instead of failing on this one again.
    `pinned_by` names where the pinned hash comes from (data.sha256, or a preset), for the message.
    """
    path = cache_path(url, preset)
    if not path.is_file():
        log.info("downloading %s", fetch.redact_url(url))
        return path, fetch.fetch(url, path, sha256=pinned, hint=offline_hint(url, path))
    log.info("using %s (already downloaded)", path)
    digest = sha256_file(path)
    if wrong := fetch.mismatch(digest, pinned):
        aside = path.with_name(path.name + ".mismatch")
        path.replace(aside)
        fix = "run again to download it anew" + (", or correct data.sha256" if pinned_by == "data.sha256" else "")
        raise StageError(f"{path} is {wrong} ({pinned_by}). It was moved to {aside}: {fix}.")
    return path, digest


#: What to do about split lists that cannot be used.
DAMAGED_LISTS = "the split lists' archive in data/cache/ is damaged or not the expected one: delete it and run again"


def read_split_lists(archive: Path, lists: SplitLists, target: Path) -> dict[str, list[str]]:
    """{split: image paths} from the archive of split lists, extracted into `target` (checked as
    every archive is, see `extract`)."""
    extract(archive, target)
    out = {}
    for split, name in lists.files:
        found = sorted(target.rglob(name), key=lambda path: len(path.parts))  # at the top, or in a wrapper folder
        if not found:
            raise StageError(
                f"{archive} has no {name}: it is not the archive of split lists expected from "
                f"{fetch.redact_url(lists.url)}. Delete it and run again to download it anew."
            )
        out[split] = read_file_list(found[0], lists.variable)
        log.info("%s: %d %s images", name, len(out[split]), split)
    return out


def read_file_list(mat: Path, variable: str) -> list[str]:
    """The strings of the cell array `variable` in the MATLAB file `mat`.

    `loadmat` gives a cell array as an object array whose items are arrays of strings (a (n, 1)
    cell of char rows in Stanford Dogs' lists), nested as deep as the cells are: every string at
    any depth is taken, in order, so the shape of the array does not matter.
    """
    try:
        content = loadmat(mat)
    except (MatReadError, ValueError, OSError) as err:
        raise StageError(f"{mat.name} is not a MATLAB file that can be read ({err}): {DAMAGED_LISTS}") from err
    if variable not in content:
        found = ", ".join(sorted(name for name in content if not name.startswith("__"))) or "nothing"
        raise StageError(f"{mat.name} has no {variable!r} list of files (it holds {found}): {DAMAGED_LISTS}")

    def strings(value: object) -> Iterator[str]:
        if isinstance(value, str):  # numpy's str_ among them
            yield str(value)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "OU":
            for item in value.ravel():
                yield from strings(item)
        else:
            raise StageError(f"{mat.name}: {variable!r} holds {value!r}, not file paths: {DAMAGED_LISTS}")

    return list(strings(content[variable]))


def arrange_by_lists(root: Path, lists: dict[str, list[str]], out: Path) -> dict:
    """Move the files of `root` that `lists` names ({split: paths relative to root}) to
    out/<split>/<same path>, so that `out` is a split source; leave the others where they are.

    Returns what source.json records beyond the copy: how many files no list names (left out, as
    neither training nor test data, and listed up to LISTED_REFUSALS) and how many listed paths are
    missing from `root`. A path listed in two splits would put one picture in both: refused.
    """
    split_of: dict[PurePosixPath, str] = {}
    for split, paths in lists.items():
        for name in paths:
            rel = _safe_member_path(name)
            if rel is None:
                raise StageError(f"the {split} list names {name!r}, a path outside the data set: {DAMAGED_LISTS}")
            if split_of.setdefault(rel, split) != split:
                raise StageError(f"{rel} is in both the {split_of[rel]} and the {split} list: {DAMAGED_LISTS}")
    moved = dict.fromkeys(lists, 0)
    for rel, split in split_of.items():
        source = root.joinpath(*rel.parts)
        if source.is_file():
            dest = out / split / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
            moved[split] += 1
    for split, n in moved.items():
        if not n:
            raise StageError(
                f"none of the {len(lists[split])} files of the {split} list is in the archive's {root.name}/ folder: "
                "the split lists and the images do not belong together; delete both from data/cache/ and run "
                "again to download them anew"
            )
    missing = len(split_of) - sum(moved.values())
    unlisted = [path.relative_to(root).as_posix() for path in files(root)]
    if unlisted:
        log.warning("%d files are in no split list and are left out, e.g. %s", len(unlisted), unlisted[0])
    if missing:
        log.warning("%d files named by the split lists are not in the archive", missing)
    record: dict = {"unlisted_files": len(unlisted), "listed_missing": missing}
    if unlisted:
        record["unlisted_file_paths"] = unlisted[:LISTED_REFUSALS]
    return record


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive member may be written to, or None if it would escape."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


@dataclass(frozen=True)
class Member:
    """One entry of a zip or tar archive."""

    name: str
    kind: str  # file | dir | other (links, devices)
    size: int  # as the archive declares it
    open: Callable[[], IO[bytes]]
    problem: str | None = None  # why no program can extract it as it is, if so


#: Zip compression methods Python's zipfile extracts (stored, deflate, bzip2, lzma).
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
#: What other zip compression methods are, for the message.
ZIP_METHOD_NAMES = {9: "Deflate64 (what Windows writes for large compressed folders)", 93: "Zstandard", 98: "PPMd"}


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return "is encrypted: extract the archive with its password and set data.source to the extracted folder"
    if info.compress_type not in ZIP_METHODS and not info.is_dir():
        method = ZIP_METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        return (
            f"is compressed with {method}, which Python cannot extract: extract the archive with 7-Zip or "
            "`unzip` (or re-create it with plain Deflate) and set data.source to the extracted folder"
        )
    return None


def _tar_problem(member: tarfile.TarInfo) -> str | None:
    try:
        member.name.encode("utf-8")
    except UnicodeEncodeError:  # the bytes that were not UTF-8 come through as surrogates
        return (
            "has a name that is not UTF-8 (the archive was made with another encoding): re-create it with "
            "UTF-8 names, or extract it, rename the files and set data.source to the folder"
        )
    return None


def _members(archive: Path) -> Iterator[Member]:
    """Each member of a zip or tar archive, in archive order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                kind = "dir" if info.is_dir() else "other" if is_link else "file"
                yield Member(info.filename, kind, info.file_size, functools.partial(zf.open, info), _zip_problem(info))
        return
    try:
        tf = tarfile.open(archive)  # noqa: SIM115  closed by `with tf` below; opening may fail first
    except tarfile.TarError as err:
        raise StageError(f"{archive} is neither a zip nor a tar archive: {err}") from err
    with tf:
        for member in tf:
            kind = "file" if member.isfile() else "dir" if member.isdir() else "other"
            opener = functools.partial(_tar_data, tf, member)
            yield Member(member.name, kind, member.size, opener, _tar_problem(member))


def _tar_data(tf: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    data = tf.extractfile(member)
    if data is None:  # not a regular file: _extract opens only those
        raise StageError(f"archive member {member.name!r} has no data to extract")
    return data


def extract(archive: Path, target: Path) -> dict:
    """`_extract`, with a damaged archive reported as such instead of a traceback."""
    try:
        return _extract(archive, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise StageError(
            f"{archive} is damaged or incomplete ({err}): delete it and run again to download it anew, "
            "or replace it with a complete copy"
        ) from err


def _refuse(counts: dict, key: str, name: str) -> None:
    counts[key] += 1
    if len(counts[f"{key}_members"]) < LISTED_REFUSALS:
        counts[f"{key}_members"].append(name)


def _extract(archive: Path, target: Path) -> dict:
    """Extract the regular files of `archive` under `target`; refuse escaping paths and links, and
    keep the first of members with the same name.

    Returns the counts of files extracted, of members refused and of duplicates, with their names.
    Stops with a StageError before writing anything the disk cannot hold, and as soon as the
    output grows like an archive bomb's.
    """
    target.mkdir(parents=True, exist_ok=True)
    counts: dict = {"files": 0, "refused": 0, "refused_members": [], "duplicates": 0, "duplicates_members": []}
    free = shutil.disk_usage(target).free
    if zipfile.is_zipfile(archive):  # a zip declares every size up front: check them all before writing
        with zipfile.ZipFile(archive) as zf:
            _check_size(archive, target, sum(info.file_size for info in zf.infolist()), free)
    limit = _expansion_limit(archive)
    declared = written = 0
    seen: set[PurePosixPath] = set()
    for member in _members(archive):
        if member.kind == "dir":
            continue  # folders are made as their files need them
        rel = _safe_member_path(member.name)
        if rel is None or member.kind != "file":
            _refuse(counts, "refused", member.name)
            log.warning("refused archive member %r: it is a link or its path leaves the target folder", member.name)
            continue
        if member.problem:
            raise StageError(f"{archive}: member {member.name!r} {member.problem}")
        if rel in seen:
            _refuse(counts, "duplicates", member.name)
            log.warning("archive member %r appears more than once: the first one is kept", member.name)
            continue
        seen.add(rel)
        declared += member.size
        counts["files"] += 1
        if declared > MAX_EXTRACTED_BYTES or counts["files"] > MAX_EXTRACTED_FILES:
            raise StageError(
                f"{archive} would extract to more than {MAX_EXTRACTED_BYTES >> 30} GiB or "
                f"{MAX_EXTRACTED_FILES} files: refused as a possible archive bomb"
            )
        _check_size(archive, target, declared, free)  # a tar declares each size as it comes
        written = _write_member(archive, member, target.joinpath(*rel.parts), written, limit)
    return counts


def _expansion_limit(archive: Path) -> int:
    """How many bytes `archive` may extract to: photos barely compress, so far more is a bomb."""
    return max(BOMB_FLOOR, MAX_RATIO * archive.stat().st_size)


def _check_size(archive: Path, target: Path, size: int, free: int) -> None:
    """Refuse, before writing, a declared `size` that the disk (`free` bytes before extracting)
    cannot hold, or that no photo collection compresses to."""
    if size > _expansion_limit(archive):
        raise StageError(
            f"{archive} declares {size / 2**20:.0f} MiB of files, more than {MAX_RATIO} times its own size: "
            "pictures do not compress like that, so it is refused as an archive bomb"
        )
    if size > free - FREE_MARGIN:
        raise StageError(
            f"{archive} needs {size / 2**30:.1f} GiB to extract, but {target.parent} has {free / 2**30:.1f} GiB free "
            f"(and {FREE_MARGIN >> 30} GiB is kept free): free some space, or extract it elsewhere by hand "
            "and set data.source to that folder"
        )


def _write_member(archive: Path, member: Member, dest: Path, written: int, limit: int) -> int:
    """Write one member's data to `dest`; return the archive's bytes written so far."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with member.open() as source, open(dest, "wb") as out:
            size = 0
            while chunk := source.read(CHUNK):
                size += len(chunk)
                written += len(chunk)
                if size > member.size:  # zipfile and tarfile stop at the declared size; a guard all the same
                    raise StageError(
                        f"{archive}: member {member.name!r} expands beyond the {member.size} bytes it declares: "
                        "refused as a damaged archive or an archive bomb"
                    )
                if written > limit:
                    raise StageError(
                        f"{archive} expands to more than {MAX_RATIO} times its own size: pictures do not "
                        "compress like that, so it is refused as an archive bomb"
                    )
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        raise StageError(
            f"{archive}: {member.name!r} is both a file and a folder in this archive (or inside one another): "
            "re-create the archive without the clash, or extract it by hand and set data.source to the folder"
        ) from err
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        raise StageError(
            f"{archive}: member {member.name!r} has a name longer than this file system allows: shorten it "
            "(re-create the archive), or extract it by hand and set data.source to the folder"
        ) from err
    return written


def class_root(folder: Path) -> Path:
    """The folder holding the class (or split) subfolders: descend through single wrapper folders,
    saying so, since a lone class folder with subfolders would be taken for a wrapper."""
    while len(subs := subfolders(folder)) == 1 and subfolders(subs[0]):
        log.warning(
            "%s holds one folder, %s, and nothing else: its subfolders (%s) are taken as the classes "
            "(if %s is itself a class, put the other classes' folders beside it)",
            folder,
            subs[0].name,
            ", ".join(p.name for p in subfolders(subs[0])),
            subs[0].name,
        )
        folder = subs[0]
    return folder


@dataclass
class Copier:
    """Copies class folders into data/raw (or, from our own extraction folder, moves them), reading
    nothing outside `source`: a link that leads out of it is refused, counted and listed."""

    source: Path  # the source folder, resolved
    class_name: Callable[[str], str] = str
    move: bool = False
    links: list[str] = field(default_factory=list)  # refused links, relative to the source
    empty: list[str] = field(default_factory=list)  # class folders with no file

    def inside(self, path: Path) -> bool:
        if path.resolve().is_relative_to(self.source):
            return True
        self.links.append(path.relative_to(self.source).as_posix() if path.is_relative_to(self.source) else str(path))
        log.warning("refused %s: a link to %s, outside the source", path, path.resolve())
        return False

    def classes(self, root: Path, out: Path) -> dict[str, int]:
        """Each class folder of `root`, files at any depth below it, into out/<class>/."""
        classes = [folder for folder in subfolders(root) if self.inside(folder)]
        if len(classes) < 2:
            raise StageError(
                f"{root} must hold one subfolder per class (at least 2), found "
                f"{[p.name for p in classes] or 'none'}; arrange the images as <folder>/<class>/<image files>"
            )
        counts: dict[str, int] = {}
        for cls in classes:
            name = self.class_name(cls.name)
            if name in counts:
                raise StageError(f"{root}: two class folders are both named '{name}'")
            counts[name] = 0
            for path in files(cls):
                if not self.inside(path):
                    continue
                dest = out / name / path.relative_to(cls)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if self.move:
                    os.replace(path, dest)
                else:
                    shutil.copyfile(path, dest)
                counts[name] += 1
            if not counts[name]:
                self.empty.append(cls.relative_to(self.source).as_posix())
                log.warning("class folder %s holds no file: it is left out", cls)
        return counts

    def tree(self, root: Path, out: Path) -> dict:
        """A class-folder tree into out/<class>/, or a pre-split one into out/<split>/<class>/.

        Returns the part of the record that describes it: layout, images per class (and per
        split), and what was left out.
        """
        splits = split_folders(root)
        if splits is None:
            record: dict = {"layout": "classes", "classes": self.classes(root, out)}
        else:
            per_split = {split: self.classes(folder, out / split) for split, folder in splits.items()}
            totals: dict[str, int] = {}
            for counts in per_split.values():
                for name, n in counts.items():
                    totals[name] = totals.get(name, 0) + n
            record = {"layout": "split", "classes": totals, "splits": per_split}
        found = [name for name, n in record["classes"].items() if n]
        if len(found) < 2:
            raise StageError(
                f"{root} has files in {len(found)} class folder(s) ({', '.join(found) or 'none'}); the empty ones: "
                f"{', '.join(self.empty)}. A classifier needs pictures of at least 2 classes"
            )
        if self.empty:
            record["empty_class_folders"] = self.empty
        if self.links:
            record["refused_links"] = len(self.links)
            record["refused_link_paths"] = self.links[:LISTED_REFUSALS]
        log.info("classes: %s", ", ".join(f"{name} ({n})" for name, n in record["classes"].items()))
        return record


def download(params: config.DataParams, seed: int, out: Path) -> dict:
    """Materialise the source as out/<class>/<files> (or out/<split>/<class>/<files>); return
    the record written to source.json."""
    source = params.source
    record: dict = {"source": fetch.redact_url(source) if fetch.is_url(source) else source}
    if source == "synthetic":
        record["classes"] = synthetic.generate(out, params.synthetic, seed)
        return record
    preset = PRESETS.get(source)
    url = preset.url if preset else source if fetch.is_url(source) else None
    pinned = params.sha256 or (preset.sha256 if preset else None)
    lists: Path | None = None  # the preset's published split lists, if it has them
    if url is not None:
        if preset and preset.split:  # first: small, so a failure shows in seconds, not after the images
            lists, lists_digest = cached_download(
                preset.split.url, preset.split.sha256, preset=True, pinned_by=f"the preset {source}"
            )
            record["split_lists"] = {"url": fetch.redact_url(preset.split.url), "sha256": lists_digest}
        pinned_by = "data.sha256" if params.sha256 else f"the preset {source}"
        archive, digest = cached_download(url, pinned, preset=preset is not None, pinned_by=pinned_by)
        record["url"] = fetch.redact_url(url)
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise StageError(
                f"params.yaml: data.source = {source!r} is neither a preset ({', '.join(config.PRESETS)}), "
                "an http(s) URL, nor an existing local archive or folder"
            )
        # `source` records the path as given: the absolute path would differ between machines and
        # clones, and make data/raw (a DVC output) differ with it.
        if local.is_dir():
            copier = Copier(local.resolve())
            root = class_root(local)
            if not copier.inside(root):
                raise StageError(f"{root} is a link that leads outside {local}: set data.source to the real folder")
            return record | copier.tree(root, out)
        if not is_archive(local.name):
            raise StageError(
                f"data.source = {source!r}: a local file must be an archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        archive = local
        digest = sha256_file(archive)
        if wrong := fetch.mismatch(digest, pinned):
            # The user's own file: only read, never deleted.
            raise StageError(
                f"{archive} is {wrong} (data.sha256). "
                "Check that data.source names the intended archive, or correct data.sha256."
            )
    record["sha256"] = digest
    # Beside `out`, named so that common.atomic_dir clears what an interrupted run leaves: the
    # extracted archive, the extracted split lists, and the split laid out by those lists.
    extracted, extracted_lists, split = (out.parent / f"{common.TMP_PREFIX}{out.name}.{n}" for n in WORK_FOLDERS)
    for folder in (extracted, extracted_lists, split):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        record["archive"] = extract(archive, extracted)
        if preset:
            root = extracted / preset.root
            if not root.is_dir():
                raise StageError(
                    f"{archive} does not have the layout of {source}: no {preset.root}/ folder in it. "
                    f"Delete it and run again to download it anew."
                )
            copier = Copier(extracted.resolve(), preset.class_name, move=True)
            if preset.split and lists:
                record |= arrange_by_lists(root, read_split_lists(lists, preset.split, extracted_lists), split)
                copier, root = Copier(split.resolve(), preset.class_name, move=True), split
            record |= copier.tree(root, out)
        else:
            record |= Copier(extracted.resolve(), move=True).tree(class_root(extracted), out)
    finally:
        for folder in (extracted, extracted_lists, split):
            shutil.rmtree(folder, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder to fill with one subfolder per class")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("download")  # its arguments and params are good: the run will open
    with tracking.stage_run("download", params):
        with common.atomic_dir(args.output) as tmp:
            record = download(params.data, params.data.seed, tmp)
            common.write_json(tmp / SOURCE_RECORD, record)
        tracking.log_metrics({f"images.{k}": v for k, v in record["classes"].items()})
    log.info("wrote %s: %s", args.output, record["classes"])


if __name__ == "__main__":
    common.run(main)
