"""The MLflow pyfunc model of a classifier: encoded pictures in, class and probabilities out.

Input: a DataFrame with one column, `image`, each row the bytes of one picture file (JPEG, PNG...;
MLflow's scoring server decodes base64 in dataframe_split or dataframe_records JSON). Output: one
row per picture: `label`, `confidence` and `p.<class>` for every class. Pictures go through
classifier.inference, as predict does. A request over the model's limits is refused before any
picture is decoded (`check_limits`), one request at a time decodes and predicts, and a request
still waiting or working when the scoring server's timeout has passed (it answered 504 then) is
given up before its next picture.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc.model import PythonModel

from classifier.data import pictures

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


class BadRequest(MlflowException):
    """A request the model cannot answer: the scoring server answers HTTP 400 with this one line
    (HTTP 503 with the error code TEMPORARILY_UNAVAILABLE).

    The scoring server puts the request's whole frame before the message of any MlflowException
    that `predict` raises (`Failed to predict data '<frame>'. \\nError: ...`): several lines that
    echo the pictures back. The answer is made by `serialize_as_json`, which keeps the line as
    raised; the error code INVALID_PARAMETER_VALUE is what makes it a 400 and not a 500.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)
        self.line = message

    def serialize_as_json(self) -> str:
        answer = json.loads(super().serialize_as_json())
        answer["message"] = self.line
        return json.dumps(answer)


class ImageClassifier(PythonModel):
    """Loads models/model.keras and its class names; see the module docstring for the data."""

    def load_context(self, context) -> None:
        from classifier.model import backend

        backend.select()  # TensorFlow where it is installed and no GPU is (or KERAS_BACKEND), else JAX
        from classifier import inference

        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        # The precision evaluate ran in on the same machine, so that its scores are the served ones.
        self.model = inference.load_model(context.artifacts["model"], spec.get("precision", "float32"))
        self.classes: list[str] = spec["classes"]
        self.threshold: float = spec["threshold"]
        # Models logged before min_side and max_pixels were recorded: any size, any number of pixels.
        self.limits = inference.Limits(spec["max_side"], spec.get("min_side", 1), spec.get("max_pixels"))
        # One request at a time decodes and predicts: the server's threads wait here, so memory holds
        # one request's pictures, not one per thread.
        self.busy = threading.Lock()
        # The scoring server answers 504 past this many seconds, but its thread works on: give it up.
        self.seconds: float = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        deadline = time.monotonic() + self.seconds
        files = _pictures(model_input)
        check_limits(files, self.limits.max_pixels)
        if not self.busy.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._given_up("waiting for the requests before it")
        try:
            return self._predict(files, deadline)
        finally:
            self.busy.release()

    def _given_up(self, doing: str) -> BadRequest:
        return BadRequest(
            f"the request was given up after {self.seconds:g} s ({MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name}), "
            f"{doing}: send fewer or smaller pictures in each request, or try again in a moment",
            error_code=TEMPORARILY_UNAVAILABLE,
        )

    def _predict(self, files: list[bytes], deadline: float | None = None) -> pd.DataFrame:
        from classifier import inference
        from classifier.metrics.scores import predicted_classes

        try:
            probs = inference.probabilities(self.model, files, self.limits, deadline)
        except inference.OutOfTime as err:
            raise self._given_up(str(err)) from err
        except inference.UnusablePicture as err:
            if _is_base64_picture(files[err.index]):
                problem = (
                    "is the base64 of a picture, not the picture: it was encoded twice, or sent under inputs "
                    "or instances, whose base64 MLflow does not decode"
                )
            elif err.reason == "too_small":
                problem = f"is too small to classify: {err}"
            else:
                problem = f"is not a usable picture: {pictures.REASONS[err.reason]}"
            raise BadRequest(f"row {err.index} {problem}. {WHAT_TO_SEND}") from err
        chosen = predicted_classes(probs, self.threshold)
        out = pd.DataFrame(
            {"label": [self.classes[i] for i in chosen], "confidence": probs[np.arange(len(chosen)), chosen]}
        )
        for i, name in enumerate(self.classes):
            out[f"p.{name}"] = probs[:, i]
        return out


def check_limits(files: list[bytes], max_pixels: int | None = None) -> None:
    """Refuse a request over the served model's limits (MAX_ROWS, MAX_REQUEST_BYTES, and from the
    pictures' headers, MAX_PICTURE_PIXELS or `max_pixels` and MAX_REQUEST_PIXELS) with `BadRequest`."""

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

    from classifier.data.pictures import FORMATS

    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=FORMATS):
            return True
    except (ValueError, OSError, Image.DecompressionBombError):  # not base64; no picture (or a huge one) in it
        return False


# MLflow loads the model by running this file ("models from code"): no pickled object is stored.
mlflow.models.set_model(ImageClassifier())
