"""Archives (.zip, .tar, .tar.gz, .tgz) extracted member by member, refusing what could harm.

A member whose path would land outside the target, a link, a device or an unsupported compression
is refused and reported; so is an archive that would expand past its limits (a possible bomb) or
past the free disk space.
"""

from __future__ import annotations

import errno
import functools
import logging
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from classifier.data.fetch import CHUNK
from classifier.errors import StageError

log = logging.getLogger(__name__)

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


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_member_path(name: str) -> PurePosixPath | None:
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
        rel = safe_member_path(member.name)
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
