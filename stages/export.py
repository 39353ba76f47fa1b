"""Export the best model on the test set as ONNX, TensorFlow SavedModel and LiteRT, each checked.

The model chosen is the first row of the models table (the best test accuracy; of equal accuracy,
the lower test log loss: classifier.metrics.ranking), from the models the metrics files score. It is
loaded in float32 and written into the export folder in each of `export.formats` (classifier.model.exporting), with
spec.json: which model it is, its classes, its input and output, evaluate's threshold. Each export is
then run with its own runtime on every test picture beside the Keras model: the largest difference
in any class probability goes to reports/export/metrics.json (`export.onnx.max_difference`...). The
folder is logged to MLflow with the stage's run, and the registry version of the chosen model is
tagged with where to find it. An empty `export.formats` exports nothing.

Run: dvc repro export   (or: python -m stages.export models/export reports/export/metrics.json data/prepared
       --model finetuned=models/model.keras ... --scores reports/metrics.json ...)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from classifier import config, saving
from classifier.errors import StageError
from classifier.metrics.table import STAGES, scores, table
from classifier.model import backend
from ops import runner, tracking

log = logging.getLogger(__name__)


def model_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH, as finetuned=models/model.keras")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the exported model and spec.json")
    parser.add_argument("metrics", type=Path, help="where to write the checks' metrics.json")
    parser.add_argument("prepared", type=Path, help="the prepare stage's output (the test pictures)")
    parser.add_argument("--model", type=model_arg, action="append", default=[], help="NAME=PATH of a candidate")
    parser.add_argument("--scores", type=Path, nargs="+", required=True, help="the metrics files that score them")
    args = parser.parse_args()
    params = config.load()
    candidates = dict(args.model)
    ranked = [row["model"] for row in table(scores(args.scores), params) if row["model"] in candidates]
    if not params.export.formats or not ranked:
        with saving.atomic_dir(args.out):
            pass
        saving.write_json(args.metrics, {})
        log.info("nothing to export: %s", "export.formats is empty" if ranked else "no model was scored")
        return
    # The converters are TensorFlow's (jax2tf would need it as well): this stage runs Keras on TensorFlow.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    backend.select("tensorflow", params.deterministic)
    tracking.start_worker("export")  # its arguments and params are good: the run will open
    from classifier import inference
    from classifier.model import devices, exporting, images

    devices.start(params.deterministic)
    chosen = ranked[0]
    if not candidates[chosen].is_file():
        raise StageError(f"{candidates[chosen]} not found: the {chosen} model is scored but missing; run `dvc repro`")
    with tracking.stage_run("export", params):
        model = exporting.float32(inference.load_model(candidates[chosen], "float32"))
        split = images.load_split(args.prepared, "test")
        size = tuple(model.input_shape[1:3])
        with saving.atomic_dir(args.out) as tmp:
            written = exporting.export(model, tmp, params.export.formats)
            batches = images.images_only(split.paths, size, params.evaluate.batch_size)
            largest = exporting.check(model, written, batches)
            saving.write_json(
                tmp / "spec.json",
                {
                    "model": chosen,
                    "classes": split.classes,
                    "input": {"shape": [None, *size, 3], "dtype": "float32", "pixels": "RGB, 0 to 255"},
                    "output": "the second class' probability" if len(split.classes) == 2 else "each class' probability",
                    "threshold": params.evaluate.threshold,
                    "files": {name: exporting.FILES[name] for name in written},
                },
            )
        saving.write_json(
            args.metrics,
            {"export": {name: {"max_difference": value} for name, value in largest.items()}},
        )
        tracking.tag_exported(STAGES[chosen], args.out, params.evaluate.registered_model)
    for name, value in largest.items():
        log.info("%s model as %s: largest probability difference from Keras %.2e", chosen, name, value)


if __name__ == "__main__":
    runner.run(main)
