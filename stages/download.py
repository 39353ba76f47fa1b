"""Fetch the data set named by `data.source` into data/raw/, as fetched, verified.

Sources: a preset (`cats_vs_dogs`, `stanford_dogs`), an http(s) URL of an archive, a local archive
(.zip, .tar, .tar.gz, .tgz), a local folder with one subfolder per class (or one already split
into train/, validation/ or val/, and optionally test/, each with class subfolders), or
`synthetic` (generated offline). Downloads (stages/fetch.py) stream with a progress bar into
data/cache/ under a temporary name, resume after an interruption, and are renamed when complete
and verified; data/cache/ also takes an archive downloaded by hand. Archives are extracted member
by member: a member whose path would land outside the target, or a link, is refused and reported.
The source is only read, never changed. data/raw/source.json records what was read and its sha256.

Run: dvc repro download   (or: python -m stages.download data/raw)
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

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


def strip_wordnet_id(folder: str) -> str:
    """'n02085620-Chihuahua' -> 'Chihuahua' (the Stanford Dogs folders are ImageNet synset ids)."""
    synset, sep, name = folder.partition("-")
    return name if sep and synset[:1] == "n" and synset[1:].isdigit() and name else folder


@dataclass(frozen=True)
class Preset:
    url: str
    sha256: str | None  # pinned when known
    root: str  # folder inside the archive that holds one subfolder per class
    class_name: Callable[[str], str] = str  # class folder name -> class name


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
    ),
}
assert set(PRESETS) | {"synthetic"} == set(config.PRESETS), "config.PRESETS names the same presets"


def cache_path(url: str, preset: bool) -> Path:
    """Where the archive of `url` is kept: data/cache/<name> for a preset, else under a folder
    named by a hash of the URL, so two URLs with the same file name never share a file."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    cache = project_root() / CACHE_DIR  # shared by queued experiments, which run in temporary copies
    if preset:
        return cache / name
    return cache / hashlib.sha256(url.encode()).hexdigest()[:12] / name


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def offline_hint(url: str, cached: Path) -> str:
    return (
        f"To work without network: download {url} by hand and save it as {cached} "
        "(the download stage takes it from there), or set data.source in params.yaml to a local "
        "archive or a folder with one subfolder per class, or to 'synthetic' for generated data."
    )


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive member may be written to, or None if it would escape."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


#: Opens an archive member's data for reading.
Opener = Callable[[], IO[bytes]]


def _members(archive: Path) -> Iterator[tuple[str, str, int, Opener]]:
    """(name, kind: file | dir | other, size, opener) for each member of a zip or tar."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                kind = "dir" if info.is_dir() else "other" if is_link else "file"
                yield info.filename, kind, info.file_size, functools.partial(zf.open, info)
        return
    try:
        tf = tarfile.open(archive)  # noqa: SIM115  closed by `with tf` below; opening may fail first
    except tarfile.TarError as err:
        raise StageError(f"{archive} is neither a zip nor a tar archive: {err}") from err
    with tf:
        for member in tf:
            kind = "file" if member.isfile() else "dir" if member.isdir() else "other"
            yield member.name, kind, member.size, functools.partial(_tar_data, tf, member)


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


def _extract(archive: Path, target: Path) -> dict:
    """Extract the regular files of `archive` under `target`; refuse escaping paths and links.

    Returns the counts of files extracted and of members refused, and the refused members' names.
    """
    target.mkdir(parents=True, exist_ok=True)
    counts: dict = {"files": 0, "refused": 0, "refused_members": []}
    total_bytes = 0
    for name, kind, size, open_member in _members(archive):
        if kind == "dir":
            continue  # folders are made as their files need them
        rel = _safe_member_path(name)
        if rel is None or kind != "file":
            counts["refused"] += 1
            if len(counts["refused_members"]) < LISTED_REFUSALS:
                counts["refused_members"].append(name)
            log.warning("refused archive member %r: it is a link or its path leaves the target folder", name)
            continue
        total_bytes += size
        counts["files"] += 1
        if total_bytes > MAX_EXTRACTED_BYTES or counts["files"] > MAX_EXTRACTED_FILES:
            raise StageError(
                f"{archive} would extract to more than {MAX_EXTRACTED_BYTES >> 30} GiB or "
                f"{MAX_EXTRACTED_FILES} files: refused as a possible archive bomb"
            )
        dest = target.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as source, open(dest, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    return counts


def class_root(folder: Path) -> Path:
    """The folder holding the class (or split) subfolders: descend through single wrapper folders."""
    while len(subs := subfolders(folder)) == 1 and subfolders(subs[0]):
        folder = subs[0]
    return folder


def copy_classes(root: Path, out: Path, class_name: Callable[[str], str] = str, move: bool = False) -> dict[str, int]:
    """Copy (or, from our own extraction folder, move) each class folder of `root`, files at any
    depth below it, into out/<class>/."""
    classes = subfolders(root)
    if len(classes) < 2:
        raise StageError(
            f"{root} must hold one subfolder per class (at least 2), found "
            f"{[p.name for p in classes] or 'none'}; arrange the images as <folder>/<class>/<image files>"
        )
    counts: dict[str, int] = {}
    for cls in classes:
        name = class_name(cls.name)
        if name in counts:
            raise StageError(f"{root}: two class folders are both named '{name}'")
        counts[name] = 0
        for path in files(cls):
            dest = out / name / path.relative_to(cls)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(path, dest)
            else:
                shutil.copyfile(path, dest)
            counts[name] += 1
    return counts


def copy_source(root: Path, out: Path, class_name: Callable[[str], str] = str, move: bool = False) -> dict:
    """Copy a class-folder tree into out/<class>/, or a pre-split one into out/<split>/<class>/.

    Returns the part of the record that describes it: layout, images per class (and per split).
    """
    splits = split_folders(root)
    if splits is None:
        return {"layout": "classes", "classes": copy_classes(root, out, class_name, move)}
    per_split = {split: copy_classes(folder, out / split, class_name, move) for split, folder in splits.items()}
    totals: dict[str, int] = {}
    for counts in per_split.values():
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + n
    return {"layout": "split", "classes": totals, "splits": per_split}


def download(params: config.DataParams, seed: int, out: Path) -> dict:
    """Materialise the source as out/<class>/<files> (or out/<split>/<class>/<files>); return
    the record written to source.json."""
    source = params.source
    record: dict = {"source": source}
    if source == "synthetic":
        record["classes"] = synthetic.generate(out, params.synthetic, seed)
        return record
    preset = PRESETS.get(source)
    url = preset.url if preset else source if source.startswith(("http://", "https://")) else None
    pinned = params.sha256 or (preset.sha256 if preset else None)
    if url is not None:
        archive = cache_path(url, preset is not None)
        if not archive.is_file():
            log.info("downloading %s", url)
            digest = fetch.fetch(url, archive, sha256=pinned, hint=offline_hint(url, archive))
        else:
            log.info("using %s (already downloaded)", archive)
            digest = sha256_file(archive)
            if wrong := fetch.mismatch(digest, pinned):
                # Moved aside, not deleted (it may have been put there by hand), so that the
                # next run downloads a fresh copy instead of failing on this one again.
                aside = archive.with_name(archive.name + ".mismatch")
                archive.replace(aside)
                raise StageError(
                    f"{archive} is {wrong} (data.sha256 or the preset). "
                    f"It was moved to {aside}: run again to download it anew, or correct data.sha256."
                )
        record["url"] = url
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
            return record | copy_source(class_root(local), out)
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
    extracted = out.parent / f".{out.name}.extract"
    shutil.rmtree(extracted, ignore_errors=True)
    try:
        record["archive"] = extract(archive, extracted)
        if preset:
            root = extracted / preset.root
            if not root.is_dir():
                raise StageError(
                    f"{archive} does not have the layout of {source}: no {preset.root}/ folder in it. "
                    f"Delete it and run again to download it anew."
                )
            record |= copy_source(root, out, preset.class_name, move=True)
        else:
            record |= copy_source(class_root(extracted), out, move=True)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder to fill with one subfolder per class")
    args = parser.parse_args()
    params = config.load()
    with tracking.stage_run("download", params):
        with common.atomic_dir(args.output) as tmp:
            record = download(params.data, params.data.seed, tmp)
            common.write_json(tmp / SOURCE_RECORD, record)
        tracking.log_metrics({f"images.{k}": v for k, v in record["classes"].items()})
    log.info("wrote %s: %s", args.output, record["classes"])


if __name__ == "__main__":
    common.run(main)
