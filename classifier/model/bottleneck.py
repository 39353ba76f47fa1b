"""Bottleneck features: the backbone run once over every split (`featurize`), streamed to disk as
<split>.npz with their labels, and read back (`load_features`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from classifier import config, saving
from classifier.data.layout import SPLITS
from classifier.model import backbones, backend, devices, eta, images

log = logging.getLogger(__name__)


META = "meta.json"


def features_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.npz"


def write_features(
    extractor: keras.Model,
    split: images.Split,
    image_size: tuple[int, int],
    batch_size: int,
    path: Path,
    done: Callable[[int], None] = lambda images: None,
) -> None:
    """Features of every image of `split`, in order, with its labels, into one .npz file; `done`
    is told the number of images of each batch as it finishes. Run as several processes, each
    computes its part of the split and process 0 writes the whole (`devices.gather`)."""
    shape = tuple(extractor.output_shape[1:])
    paths = split.paths[backend.cluster().part(len(split))]
    buffer = path.with_suffix(".tmp.npy")
    features = np.lib.format.open_memmap(buffer, mode="w+", dtype=np.float32, shape=(len(paths), *shape))
    try:
        start = 0
        for batch in images.images_only(paths, image_size, batch_size):
            out = devices.predict_batch(extractor, batch)
            features[start : start + len(out)] = out
            start += len(out)
            done(len(out))
        assert start == len(paths), f"read {start} images of {len(paths)}"
        features.flush()
        whole = devices.gather(features, len(split))
        np.savez(path, features=whole, labels=split.labels)  # copies from the memmap in chunks
    finally:
        del features
        buffer.unlink(missing_ok=True)


def load_features(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one split."""
    path = features_file(folder, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the featurize stage first (dvc repro featurize)")
    with np.load(path) as data:
        return data["features"], data["labels"]


def write_splits(
    prepared: Path,
    out: Path,
    extractor: keras.Model,
    image_size: tuple[int, int],
    batch_size: int,
    policy: str,
    stage: str = "featurize",
) -> dict[str, Any]:
    """The features `extractor` gives every split's images (loaded at `image_size`) into `out`, with
    an ETA and a progress bar named `stage`; return what meta.json records of them: the classes, the feature shape,
    the policy and the number of images per split."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: images.load_split(prepared, name) for name in SPLITS}
    cluster = backend.cluster()
    total = sum(len(range(len(split))[cluster.part(len(split))]) for split in splits.values())
    pace = eta.Pace(stage, f"{total:,} images", total, devices.device_name(), policy)
    with tqdm(total=total, desc=stage, unit="img", mininterval=5) as bar:

        def done(count: int) -> None:
            bar.update(count)
            pace.batch_done(count)

        for name, split in splits.items():
            write_features(extractor, split, image_size, batch_size, features_file(out, name), done)
    return {
        "classes": splits["train"].classes,
        "feature_shape": list(extractor.output_shape[1:]),
        "policy": policy,
        "images": {name: len(split) for name, split in splits.items()},
    }


def featurize(prepared: Path, out: Path, params: config.Params) -> tuple[keras.Model, dict]:
    """Write the features of every split into `out`; return the backbone used and the metadata."""
    keras.utils.set_random_seed(params.seed)  # reproducible random init with `model.weights: null`
    policy = devices.precision_policy(params.precision)
    with devices.predicting():
        base = backbones.build_backbone(params.model.backbone, params.model.weights, params.data.image_size)
        extractor = devices.computing_in(backbones.feature_extractor(base, params.model.backbone), policy)
        written = write_splits(prepared, out, extractor, params.data.image_size, params.featurize.batch_size, policy)
    meta = {
        "backbone": params.model.backbone,
        "weights": params.model.weights,
        "image_size": list(params.data.image_size),
        **written,
    }
    saving.write_json(out / META, meta)
    return base, meta
