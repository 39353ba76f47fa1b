"""Audit the labels: rank the train and validation pictures whose given label looks wrong.

With a few thousand pictures, a few wrong labels cost more than any hyperparameter. Linear heads
(logistic regressions), trained on `audit.folds` folds of the cached train and validation features,
give every picture class probabilities from a head that never saw it; cleanlab ranks the pictures by
the probability of their given label and flags those that confident learning counts as label errors
(classifier.model.audit). No backbone pass, no training on a GPU: seconds.

reports/audit/suspects.csv lists every audited picture, most suspect first (rank, picture, split,
given, suggested, label_quality, flagged); reports/audit/suspects.png shows the first `audit.sheet`
of them; reports/audit/metrics.json holds `audit.flagged`, `audit.pictures` and the heads'
`audit.out_of_sample_accuracy`. All three go to MLflow with the stage's run. Nothing is relabelled:
look at the pictures, fix the labels in your data, and run `dvc repro`.

Run: dvc repro audit   (or: python -m stages.audit data/features data/prepared reports/audit)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from classifier import config, saving
from classifier.errors import StageError
from classifier.model import backend
from ops import runner, tracking

log = logging.getLogger(__name__)

#: The files of the stage's reports folder.
SUSPECTS, SHEET = "suspects.csv", "suspects.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features", type=Path, help="the featurize stage's output")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output (the pictures)")
    parser.add_argument("reports", type=Path, help=f"folder for {SUSPECTS}, {SHEET} and metrics.json")
    args = parser.parse_args()
    params = config.load()
    backend.select(params.backend, params.deterministic)  # before Keras is imported (it reads the features)
    tracking.start_worker("audit")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.metrics.figures import write_contact_sheet
    from classifier.model import audit, heads, images
    from classifier.model.bottleneck import META, load_features

    classes = json.loads((args.features / META).read_text())["classes"]
    splits = ("train", "validation")
    with tracking.stage_run("audit", params):
        parts = [load_features(args.features, split) for split in splits]
        features = np.concatenate([f for f, _ in parts])
        labels = np.concatenate([y for _, y in parts]).astype(np.int64)
        pictures = [p for split in splits for p in images.load_split(args.prepared, split).paths]
        if len(pictures) != len(labels):
            raise StageError(
                f"{args.features} holds {len(labels)} train and validation pictures, {args.prepared} lists "
                f"{len(pictures)}: the features are not of these pictures; run `dvc repro featurize`"
            )
        names = [split for split, (_, y) in zip(splits, parts, strict=True) for _ in range(len(y))]
        pool = heads.head_pool(params.top, params.model.backbone)
        probs = audit.out_of_sample(features, labels, len(classes), pool, params.seed, params.audit.folds)
        ranking = audit.rank(labels, probs)
        args.reports.mkdir(parents=True, exist_ok=True)
        audit.write_suspects(args.reports / SUSPECTS, ranking, pictures, names, labels, classes)
        shown = ranking.order[: params.audit.sheet]
        write_contact_sheet(
            args.reports / SHEET,
            [Path(pictures[i]) for i in shown],
            [
                f"#{place} {classes[labels[i]]} -> {classes[ranking.suggested[i]]}?\n"
                f"quality {ranking.quality[i]:.3f}{' flagged' if ranking.flagged[i] else ''}"
                for place, i in enumerate(shown, start=1)
            ],
            f"The {len(shown)} pictures whose label looks most wrong (given -> suggested); "
            f"{int(ranking.flagged.sum())} of {len(labels)} flagged",
        )
        accuracy = float(np.mean(probs.argmax(axis=1) == labels))
        metrics = {"flagged": int(ranking.flagged.sum()), "pictures": len(labels), "out_of_sample_accuracy": accuracy}
        saving.write_json(args.reports / "metrics.json", {"audit": metrics})
    log.info(
        "%d of %d labels look wrong (out-of-sample accuracy %.4f): see %s and %s",
        metrics["flagged"],
        len(labels),
        accuracy,
        args.reports / SUSPECTS,
        args.reports / SHEET,
    )


if __name__ == "__main__":
    runner.run(main)
