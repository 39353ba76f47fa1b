"""A dense head on the concatenated features of several backbones, scored on the same test set.

The members' features (`ensemble_features@<backbone>`, one vector per image) are concatenated in
the order of `ensemble.backbones`, and a head like train_top's (`top.units`, `top.dropout`, its
optimizer, epochs, batch size and patience) is trained on them. Its test metrics come from the cached
test features (`ensemble.test.accuracy` beside the fine-tuned model's `test.accuracy`), and the model
saved is the whole ensemble, raw images in (`ensemble.image_size`): every member, then the head, in
float32. evaluate's threshold decides between two classes, and the model is logged and registered
as evaluate registers the fine-tuned one, under the same name, so `champion` is the better of them
on the same test set. An empty `ensemble.backbones` switches it off: the stage writes empty outputs
(no model, a history without epochs, `{}` as metrics) and logs nothing.

Run: dvc repro ensemble   (or: python -m stages.ensemble data/ensemble data/prepared models/ensemble
       reports/ensemble)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages import common, config, tracking
from stages.history import write_reports, write_switched_off

if TYPE_CHECKING:
    import keras

# TensorFlow is imported where an ensemble is trained, not here: switched off, the stage takes a second.

log = logging.getLogger(__name__)

#: The saved model, in the stage's model folder.
MODEL = "model.keras"


def member_meta(folder: Path, backbones: tuple[str, ...], image_size: int) -> list[dict[str, Any]]:
    """The meta.json of each member's features in `folder`, checked: present, at `image_size`, same classes."""
    from stages.featurize import META

    metas: list[dict[str, Any]] = []
    for name in backbones:
        path = folder / name / META
        if not path.is_file():
            raise common.StageError(
                f"{path} not found: the features of ensemble member {name} are missing; "
                f"run `dvc repro ensemble_features@{name}`"
            )
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta["image_size"] != image_size:
            raise common.StageError(
                f"{folder / name} holds features of {meta['image_size']}px images, not ensemble.image_size "
                f"({image_size}): run `dvc repro ensemble_features@{name}`"
            )
        if metas and meta["classes"] != metas[0]["classes"]:
            raise common.StageError(
                f"the features of {name} and {backbones[0]} name different classes: run `dvc repro` to featurize "
                "every member from the same prepared data"
            )
        metas.append(meta)
    return metas


def concatenated(folder: Path, backbones: tuple[str, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features of every member side by side, in `backbones` order; labels) of one split."""
    from stages.featurize import load_features

    parts = [load_features(folder / name, split) for name in backbones]
    for name, (_, labels) in zip(backbones[1:], parts[1:], strict=True):
        if not np.array_equal(labels, parts[0][1]):
            raise common.StageError(f"the {split} features of {name} and {backbones[0]} list different images")
    return np.concatenate([features for features, _ in parts], axis=1), parts[0][1]


def assemble(folder: Path, backbones: tuple[str, ...], metas: list[dict[str, Any]], head: keras.Model) -> keras.Model:
    """The ensemble as one float32 model: raw images -> each member (its backbone with the weights its
    features came from) -> the concatenated vectors -> the trained head."""
    from stages import backbones as parts
    from stages.ensemble_features import WEIGHTS

    members = []
    for name, meta in zip(backbones, metas, strict=True):
        base = parts.build_backbone(name, None, (meta["side"], meta["side"]))
        base.load_weights(folder / name / WEIGHTS)
        members.append(parts.member(base, name, meta["image_size"], meta["pool"]))
    return parts.build_ensemble(members, head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the folder of the members' features (one folder each)")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output (an input example)")
    parser.add_argument("models", type=Path, help=f"folder for the ensemble model ({MODEL})")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    members = params.ensemble.backbones
    if not members:
        write_switched_off(args.models, args.reports)
        log.info("ensemble.backbones is empty in params.yaml: no ensemble trained")
        return
    tracking.start_worker("ensemble")  # its arguments and params are good: the run will open
    from stages import devices, evaluate, images, train_top

    devices.set_determinism(params.deterministic)
    metas = member_meta(args.features, members, params.ensemble.image_size)
    classes = metas[0]["classes"]
    name = "ensemble"  # the metrics' prefix, live in MLflow and in metrics.json: ensemble.val_accuracy
    with tracking.stage_run("ensemble", params):
        head, history = train_top.train_top(
            concatenated(args.features, members, "train"),
            concatenated(args.features, members, "validation"),
            len(classes),
            params.top,
            params.seed,
            "flatten",  # the members' features are vectors already
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        features, labels = concatenated(args.features, members, "test")
        probs = evaluate.as_class_probabilities(head.predict(features, verbose=0))
        scores = evaluate.compute_metrics(labels, probs, classes, params.evaluate.threshold)
        model = assemble(args.features, members, metas, head)
        with common.atomic_dir(args.models) as tmp:
            common.save_model(model, tmp / MODEL)
        write_reports(args.reports, history, name, params.top.patience, scores["test"])
        example = Path(images.load_split(args.prepared, "test").paths[0])
        tracking.log_classifier(
            "ensemble", args.models / MODEL, classes, example, args.prepared, params, scores["test"]
        )
    accuracy = scores["test"]["accuracy"]
    log.info("ensemble of %s: test accuracy %.4f on %d images", ", ".join(members), accuracy, len(labels))


if __name__ == "__main__":
    common.run(main)
