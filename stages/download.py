"""Fetch the data set named by `data.source` into data/raw/, as fetched, verified.

Sources: a preset (`cats_vs_dogs`, `stanford_dogs`), an http(s) URL of an archive, a local archive
(.zip, .tar, .tar.gz, .tgz), a local folder with one subfolder per class (or one already split
into train/ and validation/ (or val/), test/ or both, each with class subfolders), `synthetic`
(generated offline) or `fashion_mnist` (real 28x28 pictures as PNG files, read from Debian's
package dataset-fashion-mnist or Keras's cache when either is there, else downloaded: see
classifier/data/fashion_mnist.py). A preset that publishes its own split (Stanford Dogs'
lists.tar) is laid out split, as its lists say. Downloads (classifier/data/fetch.py) stream with a
progress bar into data/cache/ under a temporary name, resume after an interruption, and are
renamed when complete and verified; data/cache/ also takes an archive downloaded by hand. Archives
are extracted member by member: a member whose path would land outside the target, or a link, is
refused and reported. The source is only read, never changed. data/raw/source.json records what
was read and its sha256.

Run: dvc repro download   (or: python -m stages.download data/raw)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier import config, saving
from classifier.data.layout import SOURCE_RECORD
from ops import runner, tracking

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder to fill with one subfolder per class")
    args = parser.parse_args()
    params = config.load()
    tracking.start_worker("download")  # its arguments and params are good: the run will open
    # Imported once the worker is started: MLflow loads there while Keras loads here.
    from classifier.data.sources import download

    with tracking.stage_run("download", params):
        with saving.atomic_dir(args.output) as tmp:
            record = download(params.data, params.data.seed, tmp)
            saving.write_json(tmp / SOURCE_RECORD, record)
        tracking.log_metrics({f"images.{k}": v for k, v in record["classes"].items()})
    log.info("wrote %s: %s", args.output, record["classes"])


if __name__ == "__main__":
    runner.run(main)
