"""A local folder as a source: its class folders found (`class_root`) and copied (`Copier`)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from classifier.data.archives import LISTED_REFUSALS
from classifier.data.layout import files, split_folders, subfolders
from classifier.errors import StageError

log = logging.getLogger(__name__)


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
