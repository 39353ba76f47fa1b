"""The download stage: every kind of source becomes raw/<class>/<files>, and failures are clear and fast."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from classifier import config
from classifier.data import archives, fetch, layout, presets, sources
from classifier.errors import StageError


def data_params(source: str, **kwargs) -> config.DataParams:
    return config.parse({"data": {"source": source, **kwargs}}).data


def class_folder(root: Path) -> Path:
    """root/pets/{cat,dog}/ with two and three small files, plus OS droppings to ignore."""
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            path = root / "pets" / cls / f"{cls}{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{cls}-{i}".encode())
    (root / "pets" / "cat" / ".DS_Store").write_bytes(b"x")
    (root / "pets" / "dog" / "Thumbs.db").write_bytes(b"x")
    return root / "pets"


def zip_of(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, Path("archive_root") / path.relative_to(folder))
    return dest


def listing(folder: Path) -> dict[str, list[str]]:
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(folder.iterdir()) if p.is_dir()}


EXPECTED = {"cat": ["cat0.jpg", "cat1.jpg"], "dog": ["dog0.jpg", "dog1.jpg", "dog2.jpg"]}


def test_local_folder_with_class_subfolders(tmp_path):
    source = class_folder(tmp_path / "src")
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert listing(tmp_path / "raw") == EXPECTED
    assert record["classes"] == {"cat": 2, "dog": 3}
    assert (source / "cat" / ".DS_Store").exists(), "the source is only read"


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_local_archive(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    folder = class_folder(tmp_path / "src")
    archive = tmp_path / f"pets.{kind}"
    if kind == "zip":
        zip_of(folder, archive)
    else:
        with tarfile.open(archive, "w:gz" if kind.endswith("gz") else "w") as tf:
            tf.add(folder, arcname="archive_root")
    record = sources.download(data_params(str(archive)), 0, tmp_path / "raw")
    assert listing(tmp_path / "raw") == EXPECTED
    assert record["sha256"] == fetch.sha256_file(archive)
    assert not (tmp_path / ".raw.extract").exists(), "the extraction folder is cleaned up"


def test_synthetic_source_generates_classes(tmp_path):
    params = data_params("synthetic", synthetic={"classes": 3, "images_per_class": 4, "size": 16})
    record = sources.download(params, 0, tmp_path / "raw")
    assert record["classes"] == {"horizontal": 4, "vertical": 4, "diagonal": 4}
    assert all(len(files) == 4 for files in listing(tmp_path / "raw").values())


def test_url_is_streamed_into_the_cache_and_reused(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    zip_of(class_folder(tmp_path / "src"), served / "pets.zip")
    record = sources.download(data_params(f"{base}/pets.zip"), 0, tmp_path / "raw")
    cached = tmp_path / sources.cache_path(f"{base}/pets.zip", preset=False)
    assert cached.parent.parent == tmp_path / sources.CACHE_DIR and cached.name == "pets.zip"
    assert cached.read_bytes() == (served / "pets.zip").read_bytes()
    assert record["sha256"] == fetch.sha256_file(cached)
    assert listing(tmp_path / "raw") == EXPECTED
    (served / "pets.zip").unlink()  # a second run needs no network
    sources.download(data_params(f"{base}/pets.zip"), 0, tmp_path / "raw2")
    assert listing(tmp_path / "raw2") == EXPECTED


def test_missing_url_fails_fast_with_what_to_do(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    _, base = http_root
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        sources.download(data_params(f"{base}/missing.zip"), 0, tmp_path / "raw")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert f"Could not download {base}/missing.zip" in message and "HTTP 404" in message
    cached = sources.cache_path(f"{base}/missing.zip", preset=False)
    assert f"by hand and save it as {cached}" in message
    assert "set data.source in params.yaml" in message
    assert not (tmp_path / cached).exists(), "nothing that looks complete is left behind"


def test_unresolvable_host_fails_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(StageError, match="Could not download http://no-such-host.invalid/x.zip"):
        sources.download(data_params("http://no-such-host.invalid/x.zip"), 0, tmp_path / "raw")
    assert time.monotonic() - started < 10


def test_sha256_mismatch_is_refused_with_both_hashes(tmp_path):
    archive = zip_of(class_folder(tmp_path / "src"), tmp_path / "pets.zip")
    actual = fetch.sha256_file(archive)
    with pytest.raises(StageError) as err:
        sources.download(data_params(str(archive), sha256="ab" * 32), 0, tmp_path / "raw")
    assert actual in str(err.value) and "ab" * 32 in str(err.value)


def test_unknown_source_and_non_archive_file(tmp_path):
    with pytest.raises(StageError, match=r"data.source = 'nowhere' is neither a preset \(cats_vs_dogs"):
        sources.download(data_params("nowhere"), 0, tmp_path / "raw")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StageError, match="a local file must be an archive"):
        sources.download(data_params(str(tmp_path / "notes.txt")), 0, tmp_path / "raw")


def test_folder_without_class_subfolders_is_explained(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(StageError, match=r"must hold one subfolder per class \(at least 2\)"):
        sources.download(data_params(str(tmp_path / "flat")), 0, tmp_path / "raw")


def test_archive_members_never_escape_the_target(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("data/cat/ok.jpg", "../escaped.jpg", "/tmp/absolute_escape.jpg", "data/../../up.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"ok"))
        link = tarfile.TarInfo("data/cat/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("data/cat/hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "data/cat/ok.jpg"
        tf.addfile(hard)
    target = tmp_path / "deep" / "target"
    counts = archives.extract(archive, target)
    assert counts == {
        "files": 1,
        "refused": 5,
        "refused_members": [
            "../escaped.jpg",
            "/tmp/absolute_escape.jpg",
            "data/../../up.jpg",
            "data/cat/link.jpg",
            "data/cat/hard.jpg",
        ],
        "duplicates": 0,
        "duplicates_members": [],
    }
    assert [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()] == ["data/cat/ok.jpg"]
    assert not (tmp_path / "deep" / "escaped.jpg").exists() and not (tmp_path / "up.jpg").exists()
    assert not Path("/tmp/absolute_escape.jpg").exists()


def test_archive_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_EXTRACTED_FILES", 3)
    archive = zip_of(class_folder(tmp_path / "src"), tmp_path / "pets.zip")
    with pytest.raises(StageError, match="refused as a possible archive bomb"):
        archives.extract(archive, tmp_path / "out")


def test_same_file_name_at_two_urls_is_cached_apart():
    a = sources.cache_path("https://a.example/data.zip", preset=False)
    b = sources.cache_path("https://b.example/data.zip", preset=False)
    assert a != b and a.name == b.name == "data.zip"
    assert sources.cache_path("https://a.example/", preset=False).name == "download"
    assert sources.cache_path(presets.PRESETS["cats_vs_dogs"].url, preset=True) == Path.cwd() / Path(
        "data/cache/kagglecatsanddogs_5340.zip"
    )


def test_cache_is_in_the_project_even_from_a_queued_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert sources.cache_path("https://a.example/x.zip", preset=True) == tmp_path / "project/data/cache/x.zip"


def test_damaged_archive_is_reported_with_what_to_do(tmp_path):
    import os as _os

    with tarfile.open(tmp_path / "whole.tar.gz", "w:gz") as tf:
        for i in range(3):
            data = _os.urandom(100_000)  # incompressible: the cut falls inside the members
            info = tarfile.TarInfo(f"pets/cat/{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    whole = (tmp_path / "whole.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) * 3 // 5])
    with pytest.raises(StageError, match="is damaged or incomplete .*delete it and run again"):
        archives.extract(tmp_path / "cut.tar.gz", tmp_path / "out")


def test_folder_named_like_a_split_without_train_is_explained(tmp_path):
    for split in ("validation", "test"):
        (tmp_path / "src" / split / "cat").mkdir(parents=True)
        (tmp_path / "src" / split / "cat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(
        StageError,
        match=r"looks split \(test/, validation/\) but lacks train/: a split source needs train/ and at least one "
        r"of validation/ \(or val/\) and test/ \(the other is carved from them\); or, for a folder per class, rename",
    ):
        sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")


def test_a_train_folder_alone_is_no_split(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "cats").mkdir()
    with pytest.raises(StageError, match=r"looks split \(train/\) but lacks validation/ \(or val/\) and test/:"):
        layout.split_folders(tmp_path)


def test_pre_split_folder_without_validation_is_taken_as_split(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                path = tmp_path / "src" / split / cls / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{split}{cls}{i}".encode())
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert record["layout"] == "split"
    assert record["splits"] == {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}
    assert listing(tmp_path / "raw") == {"test": ["cat", "dog"], "train": ["cat", "dog"]}


def test_cached_archive_with_the_wrong_hash_is_moved_aside(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    zip_of(class_folder(tmp_path / "src"), served / "pets.zip")
    url = f"{base}/pets.zip"
    sources.download(data_params(url), 0, tmp_path / "raw")
    cached = sources.cache_path(url, preset=False)
    with pytest.raises(StageError, match="It was moved to .*pets.zip.mismatch: run again to download it anew"):
        sources.download(data_params(url, sha256="cd" * 32), 0, tmp_path / "raw2")
    assert not cached.exists() and cached.with_name("pets.zip.mismatch").is_file()


STANFORD_FOLDERS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu")


def stanford_dogs_tar(path: Path, per_breed: int = 2) -> Path:
    """A small stand-in for Stanford Dogs' images.tar: Images/<synset>-<breed>/<synset>_<n>.jpg."""
    with tarfile.open(path, "w") as tf:
        for folder in STANFORD_FOLDERS:
            for i in range(per_breed):
                data = f"{folder}-{i}".encode()
                info = tarfile.TarInfo(f"Images/{folder}/{folder.split('-')[0]}_{i}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def file_list(paths: list[str], cell: str) -> np.ndarray:
    """A MATLAB cell array of paths as `savemat` writes it: an (n, 1) object array whose items are
    char rows (`cell="char"`: how Stanford Dogs' lists are shaped, and what `loadmat` gives back for
    them), or 1-element cells holding the text (`cell="nested"`: one more level of cells)."""
    out = np.empty((len(paths), 1), dtype=object)
    for i, name in enumerate(paths):
        out[i, 0] = np.array([name]) if cell == "char" else np.array([name], dtype=object)
    return out


def stanford_lists_tar(
    path: Path, splits: dict[str, list[str]], cell: str = "char", variable: str = "file_list"
) -> Path:
    """A stand-in for Stanford Dogs' lists.tar: <split>_list.mat files holding `variable` (a cell
    array of paths relative to Images/) and, as the real ones do, labels, which are not read."""
    folder = path.parent / "lists"
    folder.mkdir()
    with tarfile.open(path, "w") as tf:
        for split, paths in splits.items():
            mat = folder / f"{split}_list.mat"
            scipy.io.savemat(mat, {variable: file_list(paths, cell), "labels": np.ones((len(paths), 1))})
            tf.add(mat, arcname=mat.name)
    return path


def serve_stanford_dogs(monkeypatch, base: str) -> None:
    """Point the stanford_dogs preset at images.tar and lists.tar on the test's HTTP server."""
    preset = presets.PRESETS["stanford_dogs"]
    assert preset.split is not None
    split = dataclasses.replace(preset.split, url=f"{base}/lists.tar")
    monkeypatch.setitem(
        presets.PRESETS, "stanford_dogs", dataclasses.replace(preset, url=f"{base}/images.tar", split=split)
    )


#: The published split of the stand-in: per breed, files 0 and 1 to train, 2 to test; 3 in no
#: list (left out); and a listed file the images archive does not have.
STANFORD_SPLIT = {
    "train": [f"{folder}/{folder.split('-')[0]}_{i}.jpg" for folder in STANFORD_FOLDERS for i in (0, 1)],
    "test": [f"{folder}/{folder.split('-')[0]}_2.jpg" for folder in STANFORD_FOLDERS]
    + ["n02085620-Chihuahua/n02085620_99.jpg"],
}


@pytest.mark.parametrize("cell", ["char", "nested"])
def test_stanford_dogs_preset_is_laid_out_by_its_published_split(tmp_path, monkeypatch, http_root, cell):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    stanford_dogs_tar(served / "images.tar", per_breed=4)
    stanford_lists_tar(served / "lists.tar", STANFORD_SPLIT, cell)
    serve_stanford_dogs(monkeypatch, base)
    record = sources.download(data_params("stanford_dogs"), 0, tmp_path / "raw")

    breeds = ["Chihuahua", "Japanese_spaniel", "Shih-Tzu"]
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["test", "train"]
    assert listing(raw / "train") == {
        "Chihuahua": ["n02085620_0.jpg", "n02085620_1.jpg"],
        "Japanese_spaniel": ["n02085782_0.jpg", "n02085782_1.jpg"],
        "Shih-Tzu": ["n02086240_0.jpg", "n02086240_1.jpg"],
    }
    assert listing(raw / "test") == {
        "Chihuahua": ["n02085620_2.jpg"],
        "Japanese_spaniel": ["n02085782_2.jpg"],
        "Shih-Tzu": ["n02086240_2.jpg"],
    }
    assert (raw / "train/Shih-Tzu/n02086240_1.jpg").read_bytes() == b"n02086240-Shih-Tzu-1", "moved whole"
    assert record["layout"] == "split"
    assert record["splits"] == {"train": dict.fromkeys(breeds, 2), "test": dict.fromkeys(breeds, 1)}
    assert record["classes"] == dict.fromkeys(breeds, 3), "the unlisted files are not counted as images"
    assert record["unlisted_files"] == 3 and not list(raw.rglob("*_3.jpg")), "counted, not copied"
    assert record["unlisted_file_paths"] == [f"{folder}/{folder.split('-')[0]}_3.jpg" for folder in STANFORD_FOLDERS]
    assert record["listed_missing"] == 1
    assert record["split_lists"] == {
        "url": f"{base}/lists.tar",
        "sha256": fetch.sha256_file(served / "lists.tar"),
    }
    assert (tmp_path / "data/cache/images.tar").is_file() and (tmp_path / "data/cache/lists.tar").is_file()
    assert not list(tmp_path.glob(".tmp-*")), "the work folders are cleaned up"

    for name in ("images.tar", "lists.tar"):  # a second run takes both from the cache, without network
        (served / name).unlink()
    again = sources.download(data_params("stanford_dogs"), 0, tmp_path / "raw2")
    assert again == record and listing(tmp_path / "raw2" / "test") == listing(raw / "test")


def test_stanford_dogs_without_its_lists_fails_fast_saying_where_to_put_them(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    stanford_dogs_tar(served / "images.tar")
    serve_stanford_dogs(monkeypatch, base)
    with pytest.raises(StageError) as err:
        sources.download(data_params("stanford_dogs"), 0, tmp_path / "raw")
    message = str(err.value)
    assert f"Could not download {base}/lists.tar" in message and "HTTP 404" in message
    assert f"by hand and save it as {tmp_path / 'data/cache/lists.tar'}" in message
    assert not (tmp_path / "data/cache/images.tar").exists(), "the small lists are fetched before the images"


def test_stanford_dogs_lists_without_a_file_list_are_explained(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    stanford_dogs_tar(served / "images.tar")
    stanford_lists_tar(served / "lists.tar", STANFORD_SPLIT, variable="files")
    serve_stanford_dogs(monkeypatch, base)
    with pytest.raises(
        StageError,
        match=r"train_list.mat has no 'file_list' list of files \(it holds files, labels\): the split lists' "
        r"archive in data/cache/ is damaged or not the expected one: delete it and run again",
    ):
        sources.download(data_params("stanford_dogs"), 0, tmp_path / "raw")


def test_split_lists_that_do_not_match_the_images_are_refused(tmp_path):
    root = tmp_path / "Images"
    (root / "n1-a").mkdir(parents=True)
    (root / "n1-a" / "x.jpg").write_bytes(b"x")
    with pytest.raises(StageError, match=r"none of the 1 files of the test list is in the archive's Images/ folder"):
        sources.arrange_by_lists(root, {"train": ["n1-a/x.jpg"], "test": ["n2-b/y.jpg"]}, tmp_path / "split")
    with pytest.raises(StageError, match=r"n1-a/x.jpg is in both the train and the test list: the split lists'"):
        sources.arrange_by_lists(root, {"train": ["n1-a/x.jpg"], "test": ["n1-a/x.jpg"]}, tmp_path / "split2")
    with pytest.raises(StageError, match=r"the train list names '../x.jpg', a path outside the data set"):
        sources.arrange_by_lists(root, {"train": ["../x.jpg"], "test": []}, tmp_path / "split3")


def test_preset_archive_without_its_layout_is_explained(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    zip_of(class_folder(tmp_path / "src"), served / "wrong.zip")
    monkeypatch.setitem(
        presets.PRESETS, "cats_vs_dogs", dataclasses.replace(presets.PRESETS["cats_vs_dogs"], url=f"{base}/wrong.zip")
    )
    with pytest.raises(StageError, match="does not have the layout of cats_vs_dogs: no PetImages/ folder"):
        sources.download(data_params("cats_vs_dogs"), 0, tmp_path / "raw")


def test_wordnet_ids_are_stripped_only_where_present():
    assert presets.strip_wordnet_id("n02085620-Chihuahua") == "Chihuahua"
    assert presets.strip_wordnet_id("n02086240-Shih-Tzu") == "Shih-Tzu"
    assert presets.strip_wordnet_id("golden-retriever") == "golden-retriever"


def test_pre_split_folder_keeps_its_split_and_spells_validation_out(tmp_path):
    src = tmp_path / "src" / "dataset"
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                path = src / split / cls / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{split}{cls}{i}".encode())
    (src / "README.txt").write_text("top-level files are not data")
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert record["layout"] == "split"
    assert record["splits"] == {"train": {"cat": 3, "dog": 3}, "validation": {"cat": 2, "dog": 2}}
    assert record["classes"] == {"cat": 5, "dog": 5}
    assert listing(tmp_path / "raw") == {"train": ["cat", "dog"], "validation": ["cat", "dog"]}


# Round two: links, secrets, odd archives, bombs, empty classes --------------------------------


def test_a_folder_source_refuses_links_that_leave_it(tmp_path):
    source = class_folder(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=do-not-copy")
    outside = tmp_path / "elsewhere"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "a.jpg").write_bytes(b"outside")
    (source / "cat" / "passwd.jpg").symlink_to(secret)  # a file link leading out
    (source / "bird").symlink_to(outside / "x", target_is_directory=True)  # a folder link leading out
    (source / "dog" / "same.jpg").symlink_to(source / "cat" / "cat0.jpg")  # inside the source: fine
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert record["refused_links"] == 2
    assert sorted(record["refused_link_paths"]) == ["pets/bird", "pets/cat/passwd.jpg"]
    assert listing(tmp_path / "raw") == {
        "cat": ["cat0.jpg", "cat1.jpg"],
        "dog": ["dog0.jpg", "dog1.jpg", "dog2.jpg", "same.jpg"],
    }
    copied = b"".join(p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert b"do-not-copy" not in copied and b"outside" not in copied


S3 = "https://bucket.s3.amazonaws.com/pets.zip"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261123&X-Amz-Signature=abcdef0123",
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("http://alice:s3cret@host.example/data.tgz", "http://***@host.example/data.tgz"),
        (
            "https://host.example/a.zip?dl=1&access_token=xyz&api_key=k",
            "https://host.example/a.zip?dl=1&access_token=***&api_key=***",
        ),
        ("https://host.example/plain.zip", "https://host.example/plain.zip"),
    ],
)
def test_urls_are_shown_with_their_secrets_redacted(url, shown):
    assert fetch.redact_url(url) == shown


def test_a_presigned_url_leaves_no_secret_in_the_records(tmp_path, monkeypatch, http_root):
    monkeypatch.chdir(tmp_path)
    served, base = http_root
    zip_of(class_folder(tmp_path / "src"), served / "pets.zip")
    url = f"{base}/pets.zip?X-Amz-Signature=SIGNATURE123&X-Amz-Credential=CRED456"
    record = sources.download(data_params(url), 0, tmp_path / "raw")
    assert record["url"] == record["source"] == f"{base}/pets.zip?X-Amz-Signature=***&X-Amz-Credential=***"
    with_password = f"http://alice:PASSWORD789@{base.removeprefix('http://')}/missing.zip"
    with pytest.raises(StageError) as err:
        sources.download(data_params(with_password), 0, tmp_path / "raw2")
    assert "HTTP 404" in str(err.value) and "PASSWORD789" not in str(err.value) and "***@" in str(err.value)
    on_disk = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    assert "SIGNATURE123" not in on_disk and "CRED456" not in on_disk and "PASSWORD789" not in on_disk


def test_a_password_in_the_url_is_sent_as_basic_auth(tmp_path, monkeypatch):
    import base64
    import http.server
    import threading

    monkeypatch.chdir(tmp_path)
    payload = zip_of(class_folder(tmp_path / "src"), tmp_path / "pets.zip").read_bytes()
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://alice:p%40ss@127.0.0.1:{server.server_address[1]}/pets.zip"
        record = sources.download(data_params(url), 0, tmp_path / "raw")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Basic " + base64.b64encode(b"alice:p@ss").decode()]
    assert record["url"].startswith("http://***@127.0.0.1:") and listing(tmp_path / "raw") == EXPECTED


def zip_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def set_zip_field(path: Path, flag_bits: int | None = None, method: int | None = None) -> None:
    """Rewrite every header of a stored zip: its flag bits and/or compression method."""
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            if flag_bits is not None:
                data[start + flags_at : start + flags_at + 2] = flag_bits.to_bytes(2, "little")
            if method is not None:
                data[start + flags_at + 2 : start + flags_at + 4] = method.to_bytes(2, "little")
            start += 4
    path.write_bytes(bytes(data))


def test_an_encrypted_zip_is_explained(tmp_path):
    archive = zip_with(tmp_path / "locked.zip", [("pets/cat/a.jpg", b"x"), ("pets/dog/b.jpg", b"y")])
    set_zip_field(archive, flag_bits=0x1)
    with pytest.raises(
        StageError, match=r"member 'pets/cat/a.jpg' is encrypted: extract the archive with its password"
    ):
        archives.extract(archive, tmp_path / "out")


def test_a_deflate64_zip_is_explained(tmp_path):
    archive = zip_with(tmp_path / "windows.zip", [("pets/cat/a.jpg", b"x"), ("pets/dog/b.jpg", b"y")])
    set_zip_field(archive, method=9)
    with pytest.raises(StageError, match=r"is compressed with Deflate64 .* extract the archive with 7-Zip"):
        archives.extract(archive, tmp_path / "out")


def test_a_member_name_too_long_for_the_file_system_is_explained(tmp_path):
    archive = zip_with(tmp_path / "long.zip", [("pets/cat/" + "a" * 300 + ".jpg", b"x")])
    with pytest.raises(StageError, match="has a name longer than this file system allows"):
        archives.extract(archive, tmp_path / "out")


@pytest.mark.parametrize("order", [["pets/cat/x", "pets/cat/x/a.jpg"], ["pets/cat/x/a.jpg", "pets/cat/x"]])
def test_a_file_and_a_folder_at_the_same_path_are_explained(tmp_path, order):
    archive = zip_with(tmp_path / "clash.zip", [(name, b"x") for name in order])
    with pytest.raises(StageError, match="'pets/cat/x.*' is both a file and a folder in this archive"):
        archives.extract(archive, tmp_path / "out")


def test_a_tar_with_names_that_are_not_utf8_fails_at_download_not_later(tmp_path):
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name in ("pets/cat/café.jpg", "pets/dog/b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(StageError, match=r"member 'pets/cat/caf\\udce9.jpg' has a name that is not UTF-8"):
        archives.extract(archive, tmp_path / "out")


def test_duplicate_member_names_are_reported_and_the_first_kept(tmp_path):
    archive = tmp_path / "twice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pets/cat/a.jpg", b"first")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("pets/cat/a.jpg", b"second")
        zf.writestr("pets/dog/b.jpg", b"y")
    counts = archives.extract(archive, tmp_path / "out")
    assert (counts["files"], counts["duplicates"], counts["duplicates_members"]) == (2, 1, ["pets/cat/a.jpg"])
    assert (tmp_path / "out/pets/cat/a.jpg").read_bytes() == b"first"


def test_an_archive_that_expands_like_a_bomb_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "BOMB_FLOOR", 2**20)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pets/cat/a.bmp", bytes(4 * 2**20))  # 4 MiB of zeros in a few KiB
        zf.writestr("pets/dog/b.jpg", b"y")
    assert archive.stat().st_size < 40_000
    with pytest.raises(StageError, match="more than 100 times its own size: .* refused as an archive bomb"):
        archives.extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.bmp")), "refused before writing"


def test_a_tar_gz_that_expands_like_a_bomb_is_stopped_while_extracting(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "BOMB_FLOOR", 2**20)
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("pets/cat/a.bmp")
        info.size = 8 * 2**20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(StageError, match="refused as an archive bomb"):
        archives.extract(archive, tmp_path / "out")


def test_an_archive_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    archive = zip_of(class_folder(tmp_path / "src"), tmp_path / "pets.zip")
    full = archives.shutil.disk_usage(tmp_path)._replace(free=archives.FREE_MARGIN + 10)
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: full)
    with pytest.raises(StageError, match=r"needs 0.0 GiB to extract, but .* has 1.0 GiB free"):
        archives.extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.jpg"))


def test_an_empty_class_folder_is_reported_by_name(tmp_path, caplog):
    source = class_folder(tmp_path / "src")
    (source / "bird").mkdir()
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert record["empty_class_folders"] == ["pets/bird"] and record["classes"]["bird"] == 0
    assert "class folder" in caplog.text and "bird holds no file: it is left out" in caplog.text
    assert listing(tmp_path / "raw") == EXPECTED


def test_fewer_than_two_classes_with_files_fail_at_download(tmp_path):
    source = class_folder(tmp_path / "src")
    for path in (source / "dog").iterdir():
        path.unlink()
    with pytest.raises(StageError, match=r"has files in 1 class folder\(s\) \(cat\); the empty ones: pets/dog"):
        sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")


def test_a_single_folder_whose_subfolders_become_the_classes_is_said(tmp_path, caplog):
    for sub in ("indoor", "outdoor"):
        (tmp_path / "src" / "cat" / sub).mkdir(parents=True)
        (tmp_path / "src" / "cat" / sub / "a.jpg").write_bytes(sub.encode())
    record = sources.download(data_params(str(tmp_path / "src")), 0, tmp_path / "raw")
    assert set(record["classes"]) == {"indoor", "outdoor"}
    assert "holds one folder, cat, and nothing else: its subfolders (indoor, outdoor) are taken as the classes" in (
        caplog.text
    )
