"""The fine-tuned model as an MLflow pyfunc model: encoded image files in, classes out.

`mlflow.pyfunc.load_model(uri).predict(frame)` takes a pandas DataFrame with an `image` column of
encoded image files (the bytes of a JPEG, PNG, GIF, BMP, WebP, TIFF, ...) and returns one row per image:
`label`, `confidence`, and the probability of every class. Each picture is prepared exactly as
`prepare` prepares the data set (turned upright, transparency on white, shrunk to `data.max_side`,
re-encoded as JPEG) and decoded and resized as `evaluate` does (`images.model_input`), and the
decision rule is evaluate's (`evaluate.threshold` for two classes), so the served model scores
what the metrics measured.

`mlflow models serve` serves it: a request is JSON with the `image` column base64-encoded
(`dataframe_split` or `dataframe_records`; MLflow decodes a `binary` column before `predict`). A
request the model cannot answer (no `image` column, no rows, a file that is no picture) is refused
with `BadRequest`: HTTP 400 and one line saying what is wrong and what to send, no traceback.

`log_model` logs it from the evaluate stage, registers it with a description of what it is and how
it scored, and moves the `candidate` and `champion` aliases.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel

from stages import tracking

log = logging.getLogger(__name__)

#: The model version tag holding the DVC hash of the prepared data its test accuracy was measured on.
TEST_SET = "test_set"
#: The input column: each row one encoded picture file.
COLUMN = "image"
#: What every refused request is told to send instead.
WHAT_TO_SEND = (
    f"Send each picture's file, base64-encoded, in a column '{COLUMN}' of dataframe_split or dataframe_records "
    "JSON (its bytes in a pandas DataFrame)."
)
#: What one request may ask of the served model (README, "Serving the model"): past any of these it
#: is refused with HTTP 400 before any picture is decoded, so the work and memory of a request are
#: bounded whatever it holds.
MAX_ROWS = 64
MAX_REQUEST_BYTES = 48 * 2**20  # the pictures' files together
MAX_PICTURE_PIXELS = 25_000_000  # one picture, as its header says (data.max_pixels, when lower)
MAX_REQUEST_PIXELS = 100_000_000  # the pictures of one request together
#: A registered version's description names at most this many classes.
DESCRIBED_CLASSES = 10


class BadRequest(MlflowException):
    """A request the model cannot answer: the scoring server answers HTTP 400 with this one line.

    The scoring server puts the request's whole frame before the message of any MlflowException
    that `predict` raises (`Failed to predict data '<frame>'. \\nError: ...`): several lines that
    echo the pictures back. The answer is made by `serialize_as_json`, which keeps the line as
    raised; the error code INVALID_PARAMETER_VALUE is what makes it a 400 and not a 500.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.line = message

    def serialize_as_json(self) -> str:
        answer = json.loads(super().serialize_as_json())
        answer["message"] = self.line
        return json.dumps(answer)


class ImageClassifier(PythonModel):
    """Loads models/model.keras and its class names; see the module docstring for the data."""

    def load_context(self, context) -> None:
        import keras

        from stages import backbones, devices  # noqa: F401  backbones registers the custom layers

        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        saved = keras.models.load_model(context.artifacts["model"], safe_mode=True)
        # The precision evaluate ran in on the same machine, so that its scores are the served ones.
        self.model = devices.computing_in(saved, devices.precision_policy(spec.get("precision", "float32")))
        self.classes: list[str] = spec["classes"]
        self.threshold: float = spec["threshold"]
        self.max_side: int = spec["max_side"]
        self.min_side: int = spec.get("min_side", 1)  # models logged before it was recorded: any size
        self.max_pixels: int | None = spec.get("max_pixels")
        self.image_size = tuple(self.model.input_shape[1:3])
        # One request at a time decodes and predicts: the server's threads wait here, so memory holds
        # one request's pictures, not one per thread.
        self.busy = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        files = _pictures(model_input)
        check_limits(files, self.max_pixels)
        with self.busy:
            return self._predict(files)

    def _predict(self, files: list[bytes]) -> pd.DataFrame:
        from stages import evaluate, images, pictures

        inputs = []
        for row, data in enumerate(files):
            try:
                inputs.append(images.model_input(data, self.image_size, self.max_side, self.max_pixels, self.min_side))
            except pictures.Unusable as err:
                if _is_base64_picture(data):
                    problem = (
                        "is the base64 of a picture, not the picture: it was encoded twice, or sent under inputs "
                        "or instances, whose base64 MLflow does not decode"
                    )
                elif err.reason == "too_small":
                    problem = f"is too small to classify: {err}"
                else:
                    problem = f"is not a usable picture: {pictures.REASONS[err.reason]}"
                raise BadRequest(f"row {row} {problem}. {WHAT_TO_SEND}") from err
        batch = np.stack(inputs)
        probs = evaluate.as_class_probabilities(self.model.predict(batch, verbose=0))
        chosen = evaluate.predicted_classes(probs, self.threshold)
        out = pd.DataFrame(
            {"label": [self.classes[i] for i in chosen], "confidence": probs[np.arange(len(chosen)), chosen]}
        )
        for i, name in enumerate(self.classes):
            out[f"p.{name}"] = probs[:, i]
        return out


def check_limits(files: list[bytes], max_pixels: int | None = None) -> None:
    """Refuse a request over the served model's limits (MAX_ROWS, MAX_REQUEST_BYTES, and from the
    pictures' headers, MAX_PICTURE_PIXELS or `max_pixels` and MAX_REQUEST_PIXELS) with `BadRequest`."""
    from stages import pictures

    if len(files) > MAX_ROWS:
        raise BadRequest(f"{len(files)} pictures in one request; at most {MAX_ROWS}: send them in several requests")
    size = sum(map(len, files))
    if size > MAX_REQUEST_BYTES:
        raise BadRequest(
            f"{size} bytes of pictures in one request; at most {MAX_REQUEST_BYTES}: send them in several requests"
        )
    limit = min(MAX_PICTURE_PIXELS, max_pixels or MAX_PICTURE_PIXELS)
    total = 0
    for row, data in enumerate(files):
        try:
            shape = pictures.header_size(data)
        except pictures.Unusable as err:
            raise BadRequest(
                f"row {row} is not a usable picture: {pictures.REASONS[err.reason]}. {WHAT_TO_SEND}"
            ) from err
        if shape is None:
            continue  # no picture: decoding it says what it is
        pixels = shape[0] * shape[1]
        if pixels > limit:
            raise BadRequest(
                f"row {row} is {shape[0]}x{shape[1]} = {pixels} pixels; at most {limit} per picture: send it smaller"
            )
        total += pixels
        if total > MAX_REQUEST_PIXELS:
            raise BadRequest(
                f"the pictures up to row {row} hold {total} pixels; at most {MAX_REQUEST_PIXELS} in one request: "
                "send fewer or smaller pictures in each"
            )


def _pictures(frame: Any) -> list[bytes]:
    """The encoded pictures of a request, in order; `BadRequest` when it holds none, or something else."""
    if not isinstance(frame, pd.DataFrame):
        raise BadRequest(f"expected a table of pictures, got {type(frame).__name__}. {WHAT_TO_SEND}")
    if COLUMN not in frame.columns:
        # MLflow drops the columns the signature does not name, so there is no telling which came.
        raise BadRequest(f"no column '{COLUMN}' in the request. {WHAT_TO_SEND}")
    if frame.empty:
        raise BadRequest(f"no picture in the request (0 rows). {WHAT_TO_SEND}")
    out = []
    for row, data in enumerate(frame[COLUMN]):
        if isinstance(data, bytes | bytearray | memoryview):
            out.append(bytes(data))
            continue
        if isinstance(data, str):
            what = "text"
        elif data is None or (isinstance(data, float) and np.isnan(data)):
            what = "empty"
        else:
            what = f"a {type(data).__name__}"
        raise BadRequest(f"row {row} is {what}, not an image file. {WHAT_TO_SEND}")
    return out


def _is_base64_picture(data: bytes) -> bool:
    """Whether `data` is the base64 text of a picture file (its header is enough) rather than the file."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))):
            return True
    except (ValueError, OSError, Image.DecompressionBombError):  # not base64; no picture (or a huge one) in it
        return False


def model_spec(
    classes: list[str],
    threshold: float,
    max_side: int,
    precision: str,
    min_side: int = 1,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """The served model's spec.json: its class names, its decision threshold, the `data.max_side`
    pictures are prepared to, the `precision` param it computes in, and the `data.min_side` and
    `data.max_pixels` past which a picture is refused, as prepare drops it (`ImageClassifier` reads it back)."""
    return {
        "classes": classes,
        "threshold": threshold,
        "max_side": max_side,
        "precision": precision,
        "min_side": min_side,
        "max_pixels": max_pixels,
    }


def backbone_of(model_path: Path) -> str | None:
    """The backbone a saved .keras classifier was built on, read from its own config (the backbone
    its `Preprocess` layer prepares images for; an ensemble's, joined by " + "); None for a model
    without one. Read from the file, not from params.yaml, so that the description says what the
    logged model is."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Preprocess" and isinstance(node.get("config"), dict):
                found.append(str(node["config"].get("backbone")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return " + ".join(dict.fromkeys(found)) if found else None


def describe(
    classes: list[str], test_set: str | None, backbone: str | None, accuracy: float, metrics: dict[str, Any]
) -> str:
    """A registered version's description (Markdown): what it tells apart, what it is built on, and how
    it scored on which test set, so that a version can be judged from the registry alone. `metrics`
    holds evaluate's headline test numbers (reports/metrics.json's `test`): its `log_loss` and
    `images` are given when there."""
    shown = ", ".join(classes[:DESCRIBED_CLASSES])
    if len(classes) > DESCRIBED_CLASSES:
        shown += f", ... (the first {DESCRIBED_CLASSES}; all in the model's artifacts/spec.json)"
    scores = f"accuracy {accuracy:.4f}"
    if isinstance(metrics.get("log_loss"), int | float):
        scores += f", log loss {metrics['log_loss']:.4f}"
    if isinstance(metrics.get("images"), int):
        scores += f" on {metrics['images']} images"
    return "\n".join(
        [
            f"- classes ({len(classes)}): {shown}",
            f"- backbone: {backbone or 'unknown'}",
            f"- test set: {test_set or 'unknown'} (the DVC hash of the prepared data it was scored on)",
            f"- test metrics: {scores}",
        ]
    )


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
    precision: str,
    metrics: dict[str, Any] | None = None,
    min_side: int = 1,
    max_pixels: int | None = None,
) -> str:
    """Log the fine-tuned model to the active run as a pyfunc model (`ImageClassifier`), with its
    signature and an input example; register it with the alias `candidate`, and `champion` too
    when its test accuracy beats the current champion's on the same test set (`test_set`: the DVC
    hash of the prepared data it was scored on). `max_side` is the `data.max_side` its data was
    prepared with, which the served model prepares pictures to (refusing those under `min_side` or
    over `max_pixels`, as prepare drops them); `precision` the `precision` param,
    which it computes in (resolved on the machine that serves it, as `auto` is). The new version's description
    names its classes, backbone (read from the model file) and test set, and its test metrics
    (`accuracy`, and the log loss and number of images of `metrics`: reports/metrics.json's `test`).
    Returns what happened, for the run's tags."""
    if not tracking.enabled():
        return "not logged (PIPELINE_TRACKING=off)"
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    # Optional only so that a request without the column reaches `predict`, which refuses it in one
    # line; MLflow's own refusal echoes the whole request over several lines.
    inputs: list[ColSpec | TensorSpec] = [ColSpec("binary", COLUMN, required=False)]
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"p.{c}") for c in classes]
    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
    with tempfile.TemporaryDirectory() as tmp, tracking.store_lock():
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(model_spec(classes, threshold, max_side, precision, min_side, max_pixels)), encoding="utf-8"
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=__file__,  # models from code: this file, not a pickled object
            artifacts={"model": str(model_path), "spec": str(spec)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=signature,
            input_example=pd.DataFrame({COLUMN: [example.read_bytes()]}),
            pip_requirements=_requirements(),
        )
        if registered_model is None:
            outcome = "not registered (evaluate.registered_model is null)"
            mlflow.set_tag("model.registry", outcome)
            return outcome
        description = describe(classes, test_set, backbone_of(model_path), accuracy, metrics or {})
        version, outcome = register(
            info.model_uri, registered_model, accuracy, test_set, tracking.active_run_id(), description
        )
        mlflow.set_tags({"model.registry": outcome, "model.version": str(version)})
    log.info("%s", outcome)
    return outcome


def register(
    model_uri: str, name: str, accuracy: float, test_set: str | None, run_id: str, description: str | None = None
) -> tuple[str, str]:
    """Register the model at `model_uri` as a new version of `name`, tagged with its test accuracy,
    its test set and its run, and described by `description` (see `describe`); give it the alias
    `candidate`, and `champion` when it earns it. Returns the version and what was decided."""
    import mlflow

    version = mlflow.register_model(model_uri, name).version
    client = mlflow.MlflowClient(tracking.tracking_uri())
    if description:
        client.update_model_version(name, version, description=description)
    client.set_model_version_tag(name, version, "test.accuracy", str(accuracy))
    client.set_model_version_tag(name, version, TEST_SET, test_set or "unknown")
    client.set_model_version_tag(name, version, "run_id", run_id)
    set_alias(client, name, "candidate", version)
    return version, f"{name} v{version}: {settle_champion(client, name, version, accuracy, test_set)}"


#: How many times `settle_champion` moves the alias before it gives up (each move follows a read
#: that found a better version; only evaluations finishing at the same moment make more than one).
SETTLE_ROUNDS = 20


def settle_champion(client: Any, name: str, version: str, accuracy: float, test_set: str | None) -> str:
    """Give `champion` to the best version of `name`, and say what that meant for `version` (just
    registered, with its `test.accuracy` and test set tags).

    The best version is the one with the highest test accuracy among the versions scored on the
    champion's test set (on `version`'s when there is no champion yet); of equals the earliest, so a
    newer version must beat it. Accuracies on different test sets are not compared: a champion set by
    hand to another test set stays until a version on that test set beats it.

    Several evaluations may register versions at once (a team's members logging to one server), and
    the registry has no lock. So the alias is moved, then the versions read again, until a read finds
    it on the best version: whichever evaluation reads last sees every version registered before it,
    and the champion ends on the best of them, whatever the order the moves landed in.
    """
    before = _alias(client, name, "champion")
    champion = before
    for _ in range(SETTLE_ROUNDS):
        basis = (test_set or "unknown") if champion is None else champion.tags.get(TEST_SET, "unknown")
        best = _best_version(client, name, basis)
        if best is None or (champion is not None and best.version == champion.version):
            break
        set_alias(client, name, "champion", best.version)
        champion = _alias(client, name, "champion")
    else:
        log.warning("%s: the champion alias kept moving; it is on v%s", name, champion.version if champion else "?")
    if champion is None:  # `version`'s accuracy is not a number
        return f"candidate only (test accuracy {accuracy:.4f} cannot be compared)"
    if str(champion.version) == str(version):
        if before is None:
            return f"candidate and champion (test accuracy {accuracy:.4f}, the first champion)"
        if str(before.version) == str(version):  # another evaluation moved the alias to it
            return f"candidate and champion (test accuracy {accuracy:.4f}, the best on its test set)"
        return (
            f"candidate and champion (test accuracy {accuracy:.4f} beats v{before.version}'s {_accuracy(before):.4f})"
        )
    theirs = champion.tags.get(TEST_SET, "unknown")
    if test_set is None or theirs != test_set:
        return (
            f"candidate only (test accuracy {accuracy:.4f} on test set {(test_set or 'unknown')[:12]}; champion "
            f"v{champion.version} was scored on test set {theirs[:12]}: accuracies on different test sets "
            "are not compared. To make this version the champion, set its alias by hand)"
        )
    best = f"v{champion.version}'s {_accuracy(champion):.4f}"
    return f"candidate only (test accuracy {accuracy:.4f} does not beat champion {best})"


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    """Point `alias` of `name` at `version`. A server on PostgreSQL refuses one of two requests that
    create the same alias at the same moment (a unique key violated): that one is sent again."""
    tracking.retry_conflicts(client.set_registered_model_alias, name, alias, version)


def _alias(client: Any, name: str, alias: str) -> Any:
    """The version of `name` with `alias`, None when no version has it."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _accuracy(version: Any) -> float:
    try:
        return float(version.tags.get("test.accuracy", "-inf"))
    except ValueError:
        return float("-inf")


def _best_version(client: Any, name: str, test_set: str) -> Any:
    """The version of `name` scored on `test_set` with the highest test accuracy (of equals, the
    earliest); None when there is none."""
    scored = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get(TEST_SET) == test_set and _accuracy(v) > float("-inf")
    ]
    return max(scored, key=lambda v: (_accuracy(v), -int(v.version)), default=None)


# MLflow loads the model by running this file ("models from code"): no pickled object is stored.
mlflow.models.set_model(ImageClassifier())
