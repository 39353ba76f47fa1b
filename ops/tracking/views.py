"""Comparisons of pipeline versions that the MLflow UI opens from a link, with no clicks: the
versions best first, their headline test metrics and the params they changed in columns wide
enough to read, and one click away (the Chart button) what differs between them.

MLflow's runs page reads a saved view from the experiment tag `mlflow.sharedViewState.<key>` when its
address carries `viewStateShareKey=<key>`; its own Share button saves views so. A view holds the
search (filter and order) and the page's state: the columns shown, their order and widths, the
charts and their sections. The names below are MLflow's own (its UI's search facets and page state,
MLflow 3.17), not a public API: tests/ops/test_views.py finds each of them in the installed UI, so an
MLflow that renamed one fails there rather than in a browser.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from classifier.metrics import ranking
from ops.tracking.store import retry_conflicts

#: The experiment tag a view is saved in (its key follows) and the address parameter naming the key.
SHARE_TAG = "mlflow.sharedViewState."
SHARE_PARAM = "viewStateShareKey"
#: How the UI recognises a compressed view: this prefix, then the base64 of the zlib-deflated JSON.
COMPRESSED = "deflate;"
#: The fields of a view the UI reads (all others are ignored): the search, then the page's state.
SEARCH_FIELDS = ("searchFilter", "orderByKey", "orderByAsc")
STATE_FIELDS = (
    "selectedColumns",
    "columnOrder",
    "columnWidths",
    "compareRunCharts",
    "compareRunSections",
    "isAccordionReordered",
    "hideEmptyCharts",
)
#: The UI's ids of the run name and date columns (always shown, first).
RUN_NAME = "attributes.`Run Name`"
DATE = "runDateAndNestInfo"
#: The version's tag naming the models it registered (`top v1, finetuned v2, ensemble v3`), shown as
#: a column: the UI's own Models column lists only the models a run logged itself, and a version's
#: were logged by its stages' runs.
MODELS_TAG = "pipeline.models"
#: The chart of every difference between the runs compared (metrics and params, one row each).
DIFFERENCE = {
    "type": "DIFFERENCE",
    "chartName": "What differs between these versions",
    "compareGroups": ["Model metrics", "Parameters"],
    "showDifferencesOnly": True,
    "showChangeFromBaseline": True,
    "baselineColumnUuid": "",
}

#: The metric each version is ranked by (1 = the best, by `ranking`), which the views order by.
RANK = "rank"
#: The version's metrics a comparison shows as columns, after its rank and the params that differ,
#: when the versions have them: the fine-tuned model's headline test metrics.
COLUMNS = ("test.accuracy", "test.log_loss", "test.ece", "test.top3_accuracy")
#: The charts of what differs come in this order: fine-tuning's, then the test metrics, then the rest.
FIRST_CHARTS = ("finetune.", "test.")
#: The view of every version, which `dvc repro` prints and the demo links to.
ALL_VERSIONS = "versions"

#: Pixels per character of a column's widest text, and the room its header's icons take.
CHAR_WIDTH = 6
PADDING = 36


def column(kind: str, name: str) -> str:
    """The UI's id of a column: `metrics.\\`test.accuracy\\``, `params.\\`top.units\\``..."""
    return f"{kind}.`{name}`"


def differing(values: Sequence[dict[str, Any]]) -> list[str]:
    """The keys, sorted, whose value is not the same in every dict of `values` (a key some lack
    differs too)."""
    keys = sorted({key for one in values for key in one})
    return [key for key in keys if len({repr(one.get(key)) for one in values}) > 1]


def chart_order(metric: str) -> tuple[int, str]:
    """Charts sort by FIRST_CHARTS, then by name."""
    first = [i for i, prefix in enumerate(FIRST_CHARTS) if metric.startswith(prefix)]
    return (first[0] if first else len(FIRST_CHARTS), metric)


def _width(texts: Iterable[str]) -> int:
    return max(len(text) for text in texts) * CHAR_WIDTH + PADDING


def comparison(runs: Sequence[Any], search_filter: str) -> dict[str, Any]:
    """The view comparing `runs` (MLflow runs of pipeline versions, which `search_filter` finds),
    ordered by RANK.

    Columns: the rank, the params whose values differ between the runs, COLUMNS the runs have, and
    the models each registered (MODELS_TAG): the most telling first, as a narrow window shows the
    first ones; each as wide as its header and values, the run names as wide as the longest.
    Charts: first the chart of every difference, then a chart of each metric whose value differs
    (FIRST_CHARTS first), in an open section; those of the metrics that are the same in every run
    in a closed section after it."""
    metrics = [dict(run.data.metrics) for run in runs]
    params = [dict(run.data.params) for run in runs]
    shown = [name for name in COLUMNS if any(name in one for one in metrics)]
    changed = differing(params)
    models = [run.data.tags.get(MODELS_TAG, "") for run in runs]
    selected = [column("metrics", RANK), *(column("params", p) for p in changed)]
    selected += [*(column("metrics", m) for m in shown), column("tags", MODELS_TAG)]
    widths = {column("metrics", m): _width([m, "0.000000"]) for m in [RANK, *shown]}
    widths |= {column("params", p): _width([p, *(str(one.get(p, "")) for one in params)]) for p in changed}
    widths[column("tags", MODELS_TAG)] = _width([MODELS_TAG, *models])
    widths[RUN_NAME] = _width([run.info.run_name or "" for run in runs] + ["Run Name"])
    differ = set(differing(metrics))
    keys = sorted({key for one in metrics for key in one} - {RANK}, key=chart_order)
    sections = [
        {"uuid": "differs", "name": "What differs", "display": True, "isReordered": True, "deleted": False},
        {"uuid": "same", "name": "The same in every version", "display": False, "isReordered": True, "deleted": False},
    ]
    charts: list[dict[str, Any]] = [{**DIFFERENCE, "uuid": "difference", "metricSectionId": "differs"}]
    for section, wanted in (("differs", True), ("same", False)):
        charts += [_chart(key, section) for key in keys if (key in differ) == wanted]
    # The rank is a column, not a chart; a metric without a chart would get one from the UI.
    charts.append(_chart(RANK, "same") | {"deleted": True})
    return {
        "searchFilter": search_filter,
        "orderByKey": column("metrics", RANK),
        "orderByAsc": True,
        "selectedColumns": selected,
        "columnOrder": [RUN_NAME, DATE, *selected],
        "columnWidths": widths,
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }


def _chart(metric: str, section: str) -> dict[str, Any]:
    """The chart of one metric: a bar chart, which the UI turns into a line chart when the metric has
    several steps (a curve) since it is marked as one the UI made."""
    return {"type": "BAR", "uuid": f"metric-{metric}", "metricKey": metric, "metricSectionId": section} | {
        "isGenerated": True,
        "deleted": False,
        "runsCountToCompare": 10,
    }


def encode(view: dict[str, Any]) -> str:
    """A view as the tag's value: compressed (COMPRESSED), as the UI reads it, so that a view of many
    charts stays within MLflow's limit on an experiment tag's length."""
    return COMPRESSED + base64.b64encode(zlib.compress(json.dumps(view).encode("utf-8"))).decode("ascii")


def decode(value: str) -> dict[str, Any]:
    """The view a tag's value holds (compressed or plain JSON)."""
    if value.startswith(COMPRESSED):
        value = zlib.decompress(base64.b64decode(value[len(COMPRESSED) :])).decode("utf-8")
    return json.loads(value)


def save(client: Any, experiment_id: str, key: str, view: dict[str, Any]) -> None:
    """Save `view` with the experiment, under `key` (see `link`); sent again when another writer (a
    teammate's compare stage, saving the same view) inserted the tag at the same moment."""
    retry_conflicts(client.set_experiment_tag, experiment_id, SHARE_TAG + key, encode(view))


def link(base: str, experiment_id: str, key: str) -> str:
    """The address that opens the view saved under `key` in the MLflow UI at `base`."""
    query = urllib.parse.urlencode({SHARE_PARAM: key, "workflowType": "machine_learning"})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def compare_link(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The address of MLflow's Compare page for `run_ids`: their params, metrics and the artifacts at
    the root of each (the version's figures and models table) side by side."""
    query = urllib.parse.urlencode(
        {
            "runs": json.dumps(list(run_ids)),
            "experiments": json.dumps([experiment_id]),
            "workflowType": "machine_learning",
        }
    )
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


def ranks(runs: Sequence[Any]) -> dict[str, int]:
    """{run id: its rank}, 1 for the best of `runs` by `ranking` (its test accuracy, then its test
    log loss), of equals the earlier first."""
    order = sorted(
        runs,
        key=lambda run: (
            *ranking.sort_key(run.data.metrics.get("test.accuracy"), run.data.metrics.get("test.log_loss")),
            run.info.start_time or 0,
        ),
    )
    return {run.info.run_id: place for place, run in enumerate(order, start=1)}
