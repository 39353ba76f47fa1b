"""The saved views of the MLflow UI: what a link opens, and the names of MLflow's UI they rely on."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from classifier.metrics import ranking
from ops.tracking import views


def run(run_id: str, name: str, metrics: dict, params: dict, start: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, run_name=name, start_time=start),
        data=SimpleNamespace(metrics=metrics, params=params, tags={views.MODELS_TAG: "top v1, finetuned v2"}),
    )


BASE = run(
    "a" * 32,
    "1f2e3d4",
    {"test.accuracy": 0.9875, "test.log_loss": 0.05, "finetune.val_accuracy": 0.97, "baseline.loss": 0.3},
    {"finetune.learning_rate": "0.0001", "top.units": "256"},
    start=1,
)
EXPERIMENT = run(
    "b" * 32,
    "exp-3f2a1 finetune.learning_rate=0.0002",
    {"test.accuracy": 0.9875, "test.log_loss": 0.04, "finetune.val_accuracy": 0.98, "baseline.loss": 0.3},
    {"finetune.learning_rate": "0.0002", "top.units": "256"},
    start=2,
)


def ui_bundle() -> str:
    """The installed MLflow UI's JavaScript, all of it."""
    import mlflow

    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(path.read_text(encoding="utf-8", errors="replace") for path in build.glob("*.js"))


def test_the_names_a_view_relies_on_are_those_of_the_installed_mlflow_ui():
    bundle = ui_bundle()
    names = [views.SHARE_TAG, views.SHARE_PARAM, views.COMPRESSED, views.DATE, "Run Name"]
    names += [*views.SEARCH_FIELDS, *views.STATE_FIELDS, *views.DIFFERENCE, *views.DIFFERENCE["compareGroups"]]
    names += ["metricSectionId", "isGenerated", "isReordered", "runsCountToCompare", 'RUN_NAME:"Run Name"']
    missing = [name for name in names if name not in bundle]
    assert not missing, f"MLflow's UI no longer knows {missing}: see ops/tracking/views.py"


def test_a_comparison_orders_by_rank_and_shows_the_headline_metrics_and_the_params_that_differ():
    view = views.comparison([BASE, EXPERIMENT], "attributes.run_id IN ('a', 'b')")
    assert view["searchFilter"] == "attributes.run_id IN ('a', 'b')"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`rank`", True)
    assert view["selectedColumns"] == [
        "metrics.`rank`",
        "params.`finetune.learning_rate`",  # top.units is the same in both: no column
        "metrics.`test.accuracy`",
        "metrics.`test.log_loss`",  # the versions have no test.ece, test.top3_accuracy: no column
        "tags.`pipeline.models`",
    ]
    assert view["columnOrder"] == [views.RUN_NAME, views.DATE, *view["selectedColumns"]]
    # no column is cut: each as wide as its longest text, the run names as the longest name
    widths = view["columnWidths"]
    assert widths[views.RUN_NAME] == len(EXPERIMENT.info.run_name) * views.CHAR_WIDTH + views.PADDING
    assert widths["params.`finetune.learning_rate`"] == len("finetune.learning_rate") * views.CHAR_WIDTH + views.PADDING
    assert widths["tags.`pipeline.models`"] == len("top v1, finetuned v2") * views.CHAR_WIDTH + views.PADDING
    assert set(widths) == {views.RUN_NAME, *view["selectedColumns"]}


def test_the_charts_of_what_differs_come_first_and_the_rest_is_out_of_the_way():
    view = views.comparison([BASE, EXPERIMENT], "")
    charts = view["compareRunCharts"]
    assert charts[0]["type"] == "DIFFERENCE" and charts[0]["showDifferencesOnly"] is True
    by_section = {
        section: [c["metricKey"] for c in charts[1:] if c["metricSectionId"] == section and not c["deleted"]]
        for section in ("differs", "same")
    }
    # fine-tuning's metrics first, then the test metrics; identical ones (and the accuracy tie) apart
    assert by_section == {
        "differs": ["finetune.val_accuracy", "test.log_loss"],
        "same": ["test.accuracy", "baseline.loss"],
    }
    assert [s["name"] for s in view["compareRunSections"]] == ["What differs", "The same in every version"]
    assert [s["display"] for s in view["compareRunSections"]] == [True, False], "the second section is closed"
    assert view["isAccordionReordered"] is True, "else the UI sorts the sections by name"
    # every metric has a chart, or the UI would add one: the rank's is there, deleted
    assert [c["metricKey"] for c in charts if c.get("deleted")] == ["rank"]


def test_a_view_is_saved_compressed_as_the_ui_reads_it_and_stays_within_mlflows_limit():
    metrics = {f"stage{i}.metric{j}": float(i * j) for i in range(8) for j in range(8)}
    many = [run(str(i), f"version {i}", metrics | {"test.accuracy": i / 10}, {"p": str(i)}) for i in range(20)]
    view = views.comparison(many, "tags.`pipeline.stage` = 'pipeline'")
    value = views.encode(view)
    assert value.startswith("deflate;")
    assert views.decode(value) == view
    assert views.decode(json.dumps(view)) == view, "a plain JSON value reads too"
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

    assert len(value) < len(json.dumps(view)) / 5 and len(value) < MAX_EXPERIMENT_TAG_VAL_LENGTH / 10


def test_versions_rank_by_accuracy_then_log_loss_then_age():
    older_tie = run("c", "c", {"test.accuracy": 0.9, "test.log_loss": 0.2}, {}, start=1)
    newer_tie = run("d", "d", {"test.accuracy": 0.9, "test.log_loss": 0.2}, {}, start=2)
    unscored = run("e", "e", {}, {}, start=0)
    ranks = views.ranks([unscored, newer_tie, BASE, older_tie, EXPERIMENT])
    assert ranks == {EXPERIMENT.info.run_id: 1, BASE.info.run_id: 2, "c": 3, "d": 4, "e": 5}


@pytest.mark.parametrize(
    ("scores", "order"),
    [
        ([(0.9, 0.3), (0.95, 0.5)], [1, 0]),  # accuracy first
        ([(0.9, 0.3), (0.9, 0.2)], [1, 0]),  # then the log loss
        ([(None, 0.1), (0.5, None), ("", "")], [1, 0, 2]),  # a missing accuracy last, a missing loss after others
        ([(float("nan"), 0.1), (0.1, 9.0)], [1, 0]),
    ],
)
def test_the_ranking_rule(scores, order):
    assert sorted(range(len(scores)), key=lambda i: ranking.sort_key(*scores[i])) == order


def test_a_link_opens_the_view_saved_under_its_key():
    assert views.link("http://127.0.0.1:5000/", "7", "versions") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=versions&workflowType=machine_learning"
    )


def test_a_compare_link_names_the_runs_and_their_experiment():
    link = views.compare_link("http://h:5000", "3", ["a", "b"])
    assert link.startswith("http://h:5000/#/compare-runs?")
    query = urllib.parse.parse_qs(link.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ["a", "b"] and json.loads(query["experiments"][0]) == ["3"]


def test_a_view_saved_by_another_writer_at_the_same_moment_is_saved_again():
    """Two compare stages of a team save the same view at one instant: the store refuses the second
    insert of the tag (PostgreSQL's UniqueViolation, as the server reports it), which is sent again."""
    from mlflow.exceptions import MlflowException

    class Client:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
            self.calls.append((experiment_id, key))
            if len(self.calls) == 1:
                raise MlflowException(
                    "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "
                    '"experiment_tag_pk"'
                )

    client = Client()
    views.save(client, "1", "versions", {"searchFilter": ""})
    assert client.calls == [("1", views.SHARE_TAG + "versions")] * 2
