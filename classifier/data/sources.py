"""What `data.source` names, fetched into data/raw (`download`): a preset, a URL, a local archive
or folder, `synthetic` or `fashion_mnist`. Downloads are kept in data/cache/ (resumable, verified by
sha256)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from scipy.io import loadmat  # type: ignore[import-untyped]
from scipy.io.matlab import MatReadError  # type: ignore[import-untyped]

from classifier import config, saving
from classifier.data import fashion_mnist, fetch, synthetic
from classifier.data.archives import ARCHIVE_SUFFIXES, LISTED_REFUSALS, extract, is_archive, safe_member_path
from classifier.data.fetch import sha256_file
from classifier.data.folders import Copier, class_root
from classifier.data.layout import files
from classifier.data.presets import PRESETS, SplitLists
from classifier.errors import StageError
from classifier.saving import project_root

log = logging.getLogger(__name__)


CACHE_DIR = Path("data/cache")  # under the project folder (see cache_path)


#: download's temporary folders, beside data/raw: .tmp-raw.<name>.
WORK_FOLDERS = ("extract", "lists", "split")


def cache_path(url: str, preset: bool) -> Path:
    """Where the archive of `url` is kept: data/cache/<name> for a preset, else under a folder
    named by a hash of the URL (its secrets redacted, so a renewed signature finds the same file),
    so two URLs with the same file name never share a file."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    cache = project_root() / CACHE_DIR  # shared by queued experiments, which run in temporary copies
    if preset:
        return cache / name
    return cache / hashlib.sha256(fetch.redact_url(url).encode()).hexdigest()[:12] / name


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
            rel = safe_member_path(name)
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


def download(params: config.DataParams, seed: int, out: Path) -> dict:
    """Materialise the source as out/<class>/<files> (or out/<split>/<class>/<files>); return
    the record written to source.json."""
    source = params.source
    record: dict = {"source": fetch.redact_url(source) if fetch.is_url(source) else source}
    if source == "synthetic":
        record["classes"] = synthetic.generate(out, params.synthetic, seed)
        return record
    if source == "fashion_mnist":
        return fashion_mnist.lay_out(out, params.fashion_mnist, project_root() / CACHE_DIR / fashion_mnist.CACHE_NAME)
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
    # Beside `out`, named so that saving.atomic_dir clears what an interrupted run leaves: the
    # extracted archive, the extracted split lists, and the split laid out by those lists.
    extracted, extracted_lists, split = (out.parent / f"{saving.TMP_PREFIX}{out.name}.{n}" for n in WORK_FOLDERS)
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
