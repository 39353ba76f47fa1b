"""Classify image files with the fine-tuned model: the top classes of each, with their probabilities.

Not a pipeline stage: a command for using the model that `dvc repro` built.

Run: python -m stages.predict photo.jpg other.png [--top 3]
       [--model models/model.keras] [--classes models/classes.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stages import common
from stages.common import StageError


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row of class probabilities, the `k` most likely (class, probability), best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probs, order, strict=True)]


def _decodes(path: Path) -> bool:
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, GIF, BMP, WebP)")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per prediction step")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"), help="the fine-tuned model")
    parser.add_argument("--classes", type=Path, default=Path("models/classes.json"), help="its class names")
    args = parser.parse_args()
    missing = [str(p) for p in [args.model, args.classes, *args.images] if not p.is_file()]
    if missing:
        raise StageError(f"not found: {', '.join(missing)} (build the model with `dvc repro` first)")
    import keras
    import tensorflow as tf

    from stages import backbones  # noqa: F401  registers the custom layers before loading
    from stages.evaluate import class_probabilities

    model = keras.models.load_model(args.model, safe_mode=True)
    classes = json.loads(args.classes.read_text(encoding="utf-8"))
    try:
        # The model's own input size: the one it was trained at, whatever params.yaml says now.
        size = tuple(model.input_shape[1:3])
        probs = class_probabilities(model, [str(p) for p in args.images], size, args.batch_size)
    except tf.errors.InvalidArgumentError as err:
        bad = next((p for p in args.images if not _decodes(p)), "one of the files")
        raise StageError(f"{bad} is not an image TensorFlow can decode (JPEG, PNG, GIF, BMP, WebP)") from err
    for path, best in zip(args.images, top_classes(probs, classes, args.top), strict=True):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in best))


if __name__ == "__main__":
    common.run(main)
