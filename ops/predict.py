"""Classify image files with the fine-tuned model: the decided class of each, then the others, with probabilities.

Not a pipeline stage: a command for using the model that `dvc repro` built. Each picture is
prepared exactly as `prepare` prepares the data set (turned upright, transparency on white, shrunk
to `data.max_side`, re-encoded as JPEG) and decoded as evaluate decodes it (classifier.inference,
which the served model uses too), and the class is decided as evaluate decides it
(`evaluate.threshold` for two classes), so a picture gets the answer the test metrics measured.
`data.max_side`, `data.min_side`, `data.max_pixels`, `evaluate.threshold` and `precision` come from
params.yaml (`--params`; `--threshold` overrides the threshold). A classes file that does not match
the model's outputs is refused: it would print wrong labels.

Run: python -m ops.predict photo.jpg other.png [--top 3] [--threshold 0.5]
       [--model models/model.keras] [--classes models/classes.json] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from classifier import config
from classifier.errors import StageError
from classifier.model import backend
from ops import runner


def top_classes(
    probs: np.ndarray, classes: list[str], k: int, threshold: float = config.EvaluateParams.threshold
) -> list[list[tuple[str, float]]]:
    """For each row of class probabilities, `k` (class, probability): first the class decided as
    evaluate decides (`scores.predicted_classes`: for two classes, the second from `threshold`
    on), then the others from the most likely down."""
    from classifier.metrics.scores import predicted_classes  # scikit-learn: only once there is work

    out = []
    for row, decided in zip(probs, predicted_classes(probs, threshold), strict=True):
        others = [int(i) for i in np.argsort(-row, kind="stable") if i != decided]
        out.append([(classes[i], float(row[i])) for i in [int(decided), *others][:k]])
    return out


def read_classes(path: Path) -> list[str]:
    """The class names in `path` (models/classes.json: a JSON list of names, in the model's output order)."""
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"{path} is not a JSON list of class names: {err}") from err
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise StageError(f"{path} is not a JSON list of class names")
    twice = sorted({name for name in classes if classes.count(name) > 1})
    if twice:
        raise StageError(
            f"{path} names {', '.join(map(repr, twice))} more than once: two outputs of the model would print the "
            "same label. Give the classes file written with this model (--classes)"
        )
    return classes


def check_classes(classes: list[str], classes_path: Path, outputs: int, model_path: Path) -> None:
    """Refuse class names that do not match the model's outputs: naming its outputs with another
    model's classes would print wrong labels without any sign. One sigmoid output means two classes."""
    predicted = 2 if outputs == 1 else outputs
    if len(classes) != predicted:
        how = " (one sigmoid output)" if outputs == 1 else ""
        raise StageError(
            f"{classes_path} names {len(classes)} classes but {model_path} predicts {predicted}{how}: "
            "give the classes file written with this model (--classes)"
        )


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1)")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, GIF, BMP, WebP or TIFF)")
    parser.add_argument("--top", type=_at_least_one, default=3, help="how many classes to show per image (default 3)")
    parser.add_argument("--batch-size", type=_at_least_one, default=32, help="images per prediction step")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"), help="the fine-tuned model")
    parser.add_argument("--classes", type=Path, default=Path("models/classes.json"), help="its class names")
    parser.add_argument(
        "--params",
        type=Path,
        default=Path(config.PARAMS_FILE),
        help=(
            "the params the model was built with: data.max_side, data.min_side, data.max_pixels, "
            "evaluate.threshold, precision (default params.yaml)"
        ),
    )
    parser.add_argument(
        "--threshold", type=_threshold, help="two classes: decide the second from this probability on (default: params)"
    )
    args = parser.parse_args()
    missing = [str(p) for p in (args.model, args.classes) if not p.is_file()]
    if missing:
        raise StageError(
            f"not found: {', '.join(missing)} (build the model with `dvc repro` first, or name it with "
            "--model and --classes)"
        )
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise StageError(f"image not found: {', '.join(missing)}")
    params = config.load(args.params)
    threshold = params.evaluate.threshold if args.threshold is None else args.threshold
    backend.select(params.backend)  # Keras (TensorFlow or JAX): only once there is work
    from classifier import inference

    try:
        model = inference.load_model(args.model, params.precision)
    except (ValueError, OSError) as err:  # Keras says "File not found" of a file that is no model
        raise StageError(
            f"{args.model} is not a Keras model file (.keras, as `dvc repro` writes models/model.keras): "
            f"{str(err).splitlines()[0]}"
        ) from err
    classes = read_classes(args.classes)
    check_classes(classes, args.classes, model.output_shape[-1], args.model)
    limits = inference.Limits.of(params.data)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        try:
            probs = inference.probabilities(model, [path.read_bytes() for path in paths], limits)
        except inference.UnusablePicture as err:
            path = paths[err.index]
            if err.reason == "too_small":
                raise StageError(f"{path} is too small to classify: {err}") from err
            raise StageError(f"{path} is not an image Pillow can decode: {err}") from err
        for path, best in zip(paths, top_classes(probs, classes, args.top, threshold), strict=True):
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in best))


if __name__ == "__main__":
    runner.run(main)
