"""Clean, de-duplicate and split the raw images into data/prepared/<split>/<class>/.

Every file is fully decoded (not judged by its header). What cannot be used is dropped and
counted by reason: empty, truncated, not_an_image, undecodable, decompression_bomb, too_small.
The rest is normalised (EXIF rotation applied, converted to RGB, longest side at most
`data.max_side`) and written as JPEG. Identical pictures (same decoded pixels) are kept once;
the same picture under two classes is a label conflict and all its copies are dropped.

The split is stratified per class, deterministic and stable: each picture's split follows from a
hash of its pixels and `seed` (see `splitting.assign_splits`), so the same data and seed give the same
split, adding files never moves an existing picture to another split, and no picture is in two
splits. A source that comes split (raw/train, and raw/validation, raw/test or both) keeps its
split; a missing validation split is carved from train, a missing test split from validation (or
train), both by the same hash (see `splitting.carve`). data/prepared/manifest.csv
lists every kept image (path, label, split, sha256), data/prepared/dropped.csv every dropped file
and why, reports/data.json the counts.

Run: dvc repro prepare   (or: python -m stages.prepare data/raw data/prepared reports/data.json)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier import config, saving
from classifier.data.cleaning import prepare
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path, help="folder with one subfolder per class (the download stage's output)")
    parser.add_argument("output", type=Path, help="folder to write the split images to")
    parser.add_argument("report", type=Path, help="JSON report of the counts")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("prepare")  # its arguments and params are good: the run will open
    with tracking.stage_run("prepare", params):
        with saving.atomic_dir(args.output) as tmp:
            report = prepare(args.raw, tmp, params.data, params.data.seed)
        saving.write_json(args.report, report)
        # A cached output, not a DVC metric (its per-class counts would crowd `dvc exp show`), so
        # tracking logs no numbers from it: its numbers go to MLflow here, flattened as DVC would
        # (classes.<class>.<split>, dropped.<reason>, duplicates, conflicts, images_kept, ...).
        tracking.log_metrics(
            {
                key: value
                for key, value in config.flatten(report).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
        )
    log.info("kept %d of %d files; dropped %s", report["images_kept"], report["files_read"], report["dropped"])


if __name__ == "__main__":
    runner.run(main)
