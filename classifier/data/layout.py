"""What a data set looks like on disk, shared by `download` (which writes data/raw) and `prepare`.

data/raw is either raw/<class>/<files> or, for a source that comes split, raw/<split>/<class>/<files>
with split one of train, validation, test (train always, and validation, test or both). A source may
spell validation `val`; download writes `validation`. Hidden files and OS droppings (.DS_Store,
Thumbs.db, __MACOSX) are never data.
"""

from __future__ import annotations

from pathlib import Path

from classifier.errors import StageError

SOURCE_RECORD = "source.json"
SPLITS = ("train", "validation", "test")
#: Folder names of a pre-split source, and the split each stands for.
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def is_ignored(path: Path) -> bool:
    """Files and folders that are not part of a data set: hidden ones, OS droppings."""
    return path.name.startswith(".") or path.name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p))


def files(folder: Path) -> list[Path]:
    """Every file below `folder`, at any depth, hidden and OS files left out, sorted."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(is_ignored(Path(part)) for part in path.relative_to(folder).parts)
    )


def split_folders(folder: Path) -> dict[str, Path] | None:
    """{split: folder} when `folder` holds train/ and validation/ (or val/), test/, or both; None when
    it holds no split folder at all (a folder per class).

    Either validation/ or test/ may be missing, since `prepare` carves a missing one from the
    others (validation from train, test from validation or train); train/ cannot be carved from
    anything, and alone it is no split.
    """
    found = {SPLIT_FOLDERS[p.name]: p for p in subfolders(folder) if p.name in SPLIT_FOLDERS}
    if not found:
        return None
    if "train" in found and len(found) > 1:
        return found
    lacking = "train/" if "train" not in found else "validation/ (or val/) and test/"
    raise StageError(
        f"{folder} looks split ({', '.join(p.name + '/' for p in found.values())}) but lacks {lacking}: a split "
        "source needs train/ and at least one of validation/ (or val/) and test/ (the other is carved from them); "
        "or, for a folder per class, rename the folders that are named like splits"
    )
