"""The fine-tuned model as an MLflow pyfunc model: encoded image files in, classes out.

`mlflow.pyfunc.load_model(uri).predict(frame)` takes a pandas DataFrame with an `image` column of
encoded image files (the bytes of a JPEG, PNG, GIF, BMP, WebP, TIFF, ...) and returns one row per image:
`label`, `confidence`, and the probability of every class. Each picture is prepared exactly as
`prepare` prepares the data set (turned upright, transparency on white, shrunk to `data.max_side`,
re-encoded as JPEG) and decoded and resized as `evaluate` does (`images.model_input`), and the
decision rule is evaluate's (`evaluate.threshold` for two classes), so the served model scores
what the metrics measured.

`log_model` logs it from the evaluate stage, registers it, and moves the `candidate` and
`champion` aliases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from stages import tracking

log = logging.getLogger(__name__)

#: The model version tag holding the DVC hash of the prepared data its test accuracy was measured on.
TEST_SET = "test_set"


class ImageClassifier(PythonModel):
    """Loads models/model.keras and its class names; see the module docstring for the data."""

    def load_context(self, context) -> None:
        import keras

        from stages import backbones  # noqa: F401  registers the custom layers before loading

        self.model = keras.models.load_model(context.artifacts["model"], safe_mode=True)
        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        self.classes: list[str] = spec["classes"]
        self.threshold: float = spec["threshold"]
        self.max_side: int = spec["max_side"]
        self.image_size = tuple(self.model.input_shape[1:3])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from stages import evaluate, images, pictures

        inputs = []
        for i, data in enumerate(model_input["image"]):
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"image {i}: expected the bytes of an image file, got {type(data).__name__}")
            try:
                inputs.append(images.model_input(bytes(data), self.image_size, self.max_side))
            except pictures.Unusable as err:
                raise ValueError(f"image {i} is not an image Pillow can decode: {err}") from err
        batch = np.stack(inputs)
        probs = evaluate.as_class_probabilities(self.model.predict(batch, verbose=0))
        chosen = evaluate.predicted_classes(probs, self.threshold)
        out = pd.DataFrame(
            {"label": [self.classes[i] for i in chosen], "confidence": probs[np.arange(len(chosen)), chosen]}
        )
        for i, name in enumerate(self.classes):
            out[f"p.{name}"] = probs[:, i]
        return out


def model_spec(classes: list[str], threshold: float, max_side: int) -> dict[str, Any]:
    """The served model's spec.json: its class names, its decision threshold, and the `data.max_side`
    pictures are prepared to (`ImageClassifier` reads it back)."""
    return {"classes": classes, "threshold": threshold, "max_side": max_side}


def _requirements() -> list[str]:
    from importlib import metadata

    pins = []
    for name in ("mlflow", "keras", "tensorflow", "tensorflow-cpu", "numpy", "pandas", "pillow"):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_model(
    model_path: Path,
    classes: list[str],
    threshold: float,
    example: Path,
    registered_model: str | None,
    accuracy: float,
    test_set: str | None,
    max_side: int,
) -> str:
    """Log the fine-tuned model to the active run as a pyfunc model (`ImageClassifier`), with its
    signature and an input example; register it with the alias `candidate`, and `champion` too
    when its test accuracy beats the current champion's on the same test set (`test_set`: the DVC
    hash of the prepared data it was scored on). `max_side` is the `data.max_side` its data was
    prepared with, which the served model prepares pictures to. Returns what happened, for the
    run's tags."""
    if not tracking.enabled():
        return "not logged (PIPELINE_TRACKING=off)"
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs: list[ColSpec | TensorSpec] = [ColSpec("binary", "image")]
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"p.{c}") for c in classes]
    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
    with tempfile.TemporaryDirectory() as tmp, tracking.store_lock():
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(model_spec(classes, threshold, max_side)), encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=__file__,  # models from code: this file, not a pickled object
            artifacts={"model": str(model_path), "spec": str(spec)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=signature,
            input_example=pd.DataFrame({"image": [example.read_bytes()]}),
            pip_requirements=_requirements(),
        )
        if registered_model is None:
            outcome = "not registered (evaluate.registered_model is null)"
            mlflow.set_tag("model.registry", outcome)
            return outcome
        version, outcome = register(info.model_uri, registered_model, accuracy, test_set, tracking.active_run_id())
        mlflow.set_tags({"model.registry": outcome, "model.version": str(version)})
    log.info("%s", outcome)
    return outcome


def register(model_uri: str, name: str, accuracy: float, test_set: str | None, run_id: str) -> tuple[str, str]:
    """Register the model at `model_uri` as a new version of `name`, tagged with its test accuracy,
    its test set and its run; give it the alias `candidate`, and `champion` when it earns it.
    Returns the version and what was decided."""
    import mlflow

    version = mlflow.register_model(model_uri, name).version
    client = mlflow.MlflowClient(tracking.tracking_uri())
    client.set_model_version_tag(name, version, "test.accuracy", str(accuracy))
    client.set_model_version_tag(name, version, TEST_SET, test_set or "unknown")
    client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    return version, f"{name} v{version}: {_promote(client, name, version, accuracy, test_set, champion)}"


def _promote(client: Any, name: str, version: str, accuracy: float, test_set: str | None, champion: Any) -> str:
    """Move `champion` to `version` when it is the first, or beats the champion on the same test set;
    return what was decided and why."""
    if champion is None:
        client.set_registered_model_alias(name, "champion", version)
        return f"candidate and champion (test accuracy {accuracy:.4f}, the first champion)"
    best = float(champion.tags.get("test.accuracy", "-inf"))
    theirs = champion.tags.get(TEST_SET, "unknown")
    if test_set is None or theirs != test_set:
        return (
            f"candidate only (test accuracy {accuracy:.4f} on test set {(test_set or 'unknown')[:12]}; champion "
            f"v{champion.version} was scored on test set {theirs[:12]}: accuracies on different test sets "
            "are not compared. To make this version the champion, set its alias by hand)"
        )
    if accuracy > best:
        client.set_registered_model_alias(name, "champion", version)
        return f"candidate and champion (test accuracy {accuracy:.4f} beats v{champion.version}'s {best:.4f})"
    return f"candidate only (test accuracy {accuracy:.4f} does not beat champion v{champion.version}'s {best:.4f})"


# MLflow loads the model by running this file ("models from code"): no pickled object is stored.
mlflow.models.set_model(ImageClassifier())
