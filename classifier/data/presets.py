"""The named data sources of `data.source` (cats_vs_dogs, stanford_dogs): where each is published,
what folder holds its classes, and its published split, when it has one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from classifier.params import PUBLISHED


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


PRESETS: dict[str, Preset] = dict(
    zip(
        PUBLISHED,
        (
            Preset(  # cats_vs_dogs
                url="https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
                sha256=None,
                root="PetImages",
            ),
            Preset(  # stanford_dogs
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
        ),
        strict=True,  # a preset for each name, in order
    )
)
