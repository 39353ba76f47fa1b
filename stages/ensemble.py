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
import logging
from pathlib import Path

from classifier import config, saving
from classifier.metrics.figures import RELIABILITY, write_reliability
from classifier.model import backend
from classifier.model.ensemble import assemble, concatenated, member_meta
from classifier.model.history import write_reports, write_switched_off
from classifier.saving import MODEL
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the folder of the members' features (one folder each)")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output (the test set the model was scored on)")
    parser.add_argument("models", type=Path, help=f"folder for the ensemble model ({MODEL})")
    parser.add_argument("reports", type=Path, help="folder for history.csv and metrics.json")
    args = parser.parse_args()
    params = config.load()
    members = params.ensemble.backbones
    if not members:
        write_switched_off(args.models, args.reports)
        write_reliability(args.reports / RELIABILITY, None, None, params.evaluate.threshold, "ensemble (switched off)")
        log.info("ensemble.backbones is empty in params.yaml: no ensemble trained")
        return
    backend.select(params.backend, params.deterministic)  # before Keras is imported
    tracking.start_worker("ensemble")  # its arguments and params are good: the run will open
    # Keras is imported once there is a model to train: switched off, the stage takes a second.
    from classifier.model import devices, training

    devices.start(params.deterministic)
    metas = member_meta(args.features, members, params.ensemble.image_size)
    classes = metas[0]["classes"]
    name = "ensemble"  # the metrics' prefix, live in MLflow and in metrics.json: ensemble.val_accuracy
    with tracking.stage_run("ensemble", params):
        head, history = training.train_top(
            concatenated(args.features, members, "train"),
            concatenated(args.features, members, "validation"),
            len(classes),
            params.top,
            params.seed,
            "flatten",  # the members' features are vectors already
            callbacks=[tracking.epoch_logger(f"{name}.")],
        )
        test = concatenated(args.features, members, "test")
        probs, metrics = training.score_head(head, test, classes, params.evaluate.threshold)
        model = assemble(args.features, members, metas, head)
        with saving.atomic_dir(args.models) as tmp:
            saving.save_model(model, tmp / MODEL)
        write_reports(args.reports, history, name, params.top.patience, metrics["test"])
        write_reliability(args.reports / RELIABILITY, test[1], probs, params.evaluate.threshold, "ensemble")
        tracking.log_classifier("ensemble", args.models / MODEL, classes, args.prepared, params, metrics["test"])
    accuracy = metrics["test"]["accuracy"]
    log.info("ensemble of %s: test accuracy %.4f on %d images", ", ".join(members), accuracy, len(test[1]))


if __name__ == "__main__":
    runner.run(main)
