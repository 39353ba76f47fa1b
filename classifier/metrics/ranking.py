"""Which scored model is better, one rule everywhere: the models table (reports/models.csv, and so the
model export picks), the registry's `champion` alias and the rank of the pipeline versions in MLflow.

Higher test accuracy first. Of equal accuracy, lower test log loss first: on a small test set two
models often get the same number of pictures right, and the log loss tells them apart by how sure
each was, of its right answers and of its wrong ones (a sure mistake costs most). It is the loss the
models are trained to lower, and the one headline number that almost never ties. A model without a
score comes last.
"""

from __future__ import annotations

import math
from typing import Any

#: The metrics the rule reads, in the order it reads them (test metrics, as in reports/metrics.json).
RULE = ("accuracy", "log_loss")

#: The rule in words, for tables, logs and docs.
IN_WORDS = "highest test accuracy first; of equal accuracy, lowest test log loss"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def sort_key(accuracy: Any, log_loss: Any) -> tuple[float, float]:
    """The key that sorts scores best first (ascending): -accuracy, then log loss; a missing or
    non-numeric value (None, "", "nan") sorts last."""
    acc, loss = _number(accuracy), _number(log_loss)
    return (-acc if acc is not None else math.inf, loss if loss is not None else math.inf)
