"""The fine-tuned model as an MLflow pyfunc model: encoded image files in, classes out.

`mlflow.pyfunc.load_model(uri).predict(frame)` takes a pandas DataFrame with an `image` column of
encoded image files (the bytes of a JPEG, PNG, GIF, BMP or WebP) and returns one row per image:
`label`, `confidence`, and the probability of every class. Images are decoded and resized exactly
as `evaluate` does (stages/images.py), and the decision rule is evaluate's (threshold for two
classes), so the served model scores what the metrics measured.

`log_model` logs it from the evaluate stage, registers it, and moves the `candidate` and
`champion` aliases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from stages import tracking

log = logging.getLogger(__name__)


class ImageClassifier(PythonModel):
    """Loads models/model.keras and its class names; see the module docstring for the data."""

    def load_context(self, context) -> None:
        import keras

        from stages import backbones  # noqa: F401  registers the custom layers before loading

        self.model = keras.models.load_model(context.artifacts["model"], safe_mode=True)
        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        self.classes: list[str] = spec["classes"]
        self.threshold: float = spec["threshold"]
        self.image_size = tuple(self.model.input_shape[1:3])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from stages import evaluate, images

        batch = np.stack([images.decode_bytes(data, self.image_size).numpy() for data in model_input["image"]])
        probs = evaluate.as_class_probabilities(self.model.predict(batch, verbose=0))
        chosen = evaluate.predicted_classes(probs, self.threshold)
        out = pd.DataFrame(
            {"label": [self.classes[i] for i in chosen], "confidence": probs[np.arange(len(chosen)), chosen]}
        )
        for i, name in enumerate(self.classes):
            out[f"p.{name}"] = probs[:, i]
        return out


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
    model_path: Path, classes: list[str], threshold: float, example: Path, registered_model: str | None, accuracy: float
) -> str:
    """Log the fine-tuned model to the active run as a pyfunc model (`ImageClassifier`), with its
    signature and an input example; register it with the alias `candidate`, and `champion` too
    when its test accuracy beats the current champion's. Returns what happened, for the run's tags."""
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
        spec.write_text(json.dumps({"classes": classes, "threshold": threshold}), encoding="utf-8")
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
        version = mlflow.register_model(info.model_uri, registered_model).version
        client = mlflow.MlflowClient(tracking.tracking_uri())
        client.set_model_version_tag(registered_model, version, "test.accuracy", str(accuracy))
        client.set_model_version_tag(registered_model, version, "run_id", tracking.active_run_id())
        client.set_registered_model_alias(registered_model, "candidate", version)
        try:
            champion = client.get_model_version_by_alias(registered_model, "champion")
        except mlflow.exceptions.MlflowException:
            champion = None
        best = float(champion.tags.get("test.accuracy", "-inf")) if champion else float("-inf")
        if champion is None or accuracy > best:
            client.set_registered_model_alias(registered_model, "champion", version)
            before = f"beats v{champion.version}'s {best:.4f}" if champion else "the first champion"
            outcome = f"{registered_model} v{version}: candidate and champion (test accuracy {accuracy:.4f}, {before})"
        else:
            outcome = (
                f"{registered_model} v{version}: candidate only (test accuracy {accuracy:.4f} does not beat "
                f"champion v{champion.version}'s {best:.4f})"
            )
        mlflow.set_tags({"model.registry": outcome, "model.version": str(version)})
    log.info("%s", outcome)
    return outcome


# MLflow loads the model by running this file ("models from code"): no pickled object is stored.
mlflow.models.set_model(ImageClassifier())
