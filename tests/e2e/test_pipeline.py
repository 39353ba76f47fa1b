"""End to end through the real `dvc repro`, in a temporary git repository, with the tiny config.

The pipeline logs to a real `mlflow server` started here on 127.0.0.1 (sqlite backend, served
artifacts). The tests run in file order on one repository: each builds on what the previous left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from classifier.metrics import ranking
from ops import demo
from ops.code import ROOT
from ops.serving import registry
from ops.tracking import views
from tests.conftest import TINY
from tests.workspace import (
    LOGGED,
    STAGES,
    base_env,
    dvc,
    dvc_repro,
    free_port,
    locked_hashes,
    queue_workers,
    ran_stages,
    run,
    set_param,
    stop_queue,
    wait_until_answering,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("pipeline"),
]  # one worker: the tests build on one repository, in file order

#: The keys of reports/metrics.json's "test" object (DVC and MLflow: test.accuracy, ...).
TEST_METRICS = {"accuracy", "precision", "recall", "f1", "log_loss", "ece", "roc_auc", "images"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of a real MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts served by
    it), stopped after the file's tests."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            # without the four processes of MLflow's GenAI job runner, which the pipeline does not use
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{uri}/health", process, log, timeout=60)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_ids(uri: str, version: int = 0) -> dict[str, str]:
    """The run of each stage that the pipeline version made `version`-th latest links."""
    return {s: pipeline_versions(uri)[version].data.tags[f"run.{s}"] for s in LOGGED}


def pipeline_versions(uri: str) -> list:
    """The pipeline-version runs, newest first."""
    c = client(uri)
    experiment = c.get_experiment_by_name("image-classifier")
    return c.search_runs(
        [experiment.experiment_id], "tags.`pipeline.stage` = 'pipeline'", order_by=["attributes.start_time DESC"]
    )


@pytest.fixture(scope="module")
def repo(server, tmp_path_factory):
    """The tiny pipeline in a fresh git repository, reproduced once against the MLflow server."""
    workspace = demo.make_workspace(tmp_path_factory.mktemp("pipeline") / "repo", TINY, git=True)
    env = base_env() | {"MLFLOW_TRACKING_URI": server}
    ran = dvc_repro(workspace, env)
    return {"path": workspace, "env": env, "first_run": ran, "server": server}


def client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def test_first_repro_runs_every_stage_and_writes_outputs(repo):
    workspace = repo["path"]
    assert repo["first_run"] == STAGES
    for output in [
        "data/raw/source.json",
        "data/prepared/manifest.csv",
        "data/features/train.npz",
        "models/backbone.weights.h5",
        "models/top.keras",
        "models/frozen/model.keras",
        "models/model.keras",
        "reports/train_top/history.csv",
        "reports/train_top/reliability.png",
        "reports/finetune/history.csv",
        "reports/evaluate/confusion.png",
        "reports/evaluate/roc.png",
        "reports/evaluate/training_curves.png",
        "reports/evaluate/reliability.png",
        "reports/evaluate/predictions.csv",
        "reports/audit/suspects.csv",
        "reports/audit/suspects.png",
    ]:
        assert (workspace / output).is_file(), output
    # the metrics files: headline numbers only, nested under the names MLflow gives them
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    assert set(metrics) == {"test"} and set(metrics["test"]) == TEST_METRICS
    assert metrics["test"]["images"] == 2 * TINY["data"]["split"]["test"]
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert 0 <= metrics["test"][key] <= 1, key
    assert metrics["test"]["log_loss"] > 0
    for stage, name in (("train_top", "top"), ("finetune", "finetune")):
        final = json.loads((workspace / f"reports/{stage}/metrics.json").read_text())
        scored = {"test"} if name == "top" else set()  # the frozen backbone with its head is scored too
        assert set(final) == {name}
        assert set(final[name]) == {"loss", "accuracy", "val_loss", "val_accuracy", "epoch"} | scored
        assert final[name]["epoch"] == TINY[name]["epochs"], "no patience: the last epoch is kept"
    frozen = json.loads((workspace / "reports/train_top/metrics.json").read_text())["top"]["test"]
    assert set(frozen) == TEST_METRICS and frozen["images"] == metrics["test"]["images"]
    # the details: plain cached outputs
    data = json.loads((workspace / "reports/data.json").read_text())
    assert data["classes"]["horizontal"] == {"train": 12, "validation": 6, "test": 6}
    assert json.loads((workspace / "models/classes.json").read_text()) == ["horizontal", "vertical"]
    with open(workspace / "reports/evaluate/per_class.csv", newline="") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["horizontal", "vertical"]
    confusion = json.loads((workspace / "reports/evaluate/confusion.json").read_text())
    assert confusion["classes"] == ["horizontal", "vertical"]
    assert sum(map(sum, confusion["rows_actual_columns_predicted"])) == metrics["test"]["images"]
    with open(workspace / "reports/models.csv", newline="") as f:  # the baseline and ensemble are switched off
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"finetuned", "top"}
    assert float(rows["finetuned"]["accuracy"]) == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert float(rows["top"]["accuracy"]) == pytest.approx(frozen["accuracy"], abs=1e-6)
    assert float(rows["top"]["ece"]) == pytest.approx(frozen["ece"], abs=1e-6)
    # the label audit: every train and validation picture ranked
    with open(workspace / "reports/audit/suspects.csv", newline="") as f:
        suspects = list(csv.DictReader(f))
    assert len(suspects) == 2 * (TINY["data"]["split"]["train"] + TINY["data"]["split"]["validation"])
    assert json.loads((workspace / "reports/audit/metrics.json").read_text())["audit"]["pictures"] == len(suspects)

    shown = json.loads(dvc("metrics", "show", "--json", cwd=workspace, env=repo["env"]).stdout)
    files = next(iter(shown.values()))["data"]
    assert {path: set(content["data"]) for path, content in files.items()} == {
        "reports/train_top/metrics.json": {"top"},
        "reports/finetune/metrics.json": {"finetune"},
        "reports/metrics.json": {"test"},
        "reports/baseline/metrics.json": set(),  # switched off in TINY
        "reports/ensemble/metrics.json": set(),
        "reports/audit/metrics.json": {"audit"},
        "reports/export/metrics.json": set(),  # switched off in TINY
    }
    plots = json.loads(dvc("plots", "show", "--json", cwd=workspace, env=repo["env"]).stdout)["data"]
    assert set(plots) == {
        "top_accuracy",
        "top_loss",
        "finetune_accuracy",
        "finetune_loss",
        "baseline_accuracy",
        "ensemble_accuracy",
        "test_accuracy_by_model",
        "confusion_matrix",
        "roc",
        "reports/evaluate/confusion.png",
        "reports/evaluate/roc.png",
        "reports/evaluate/training_curves.png",
        "reports/train_top/reliability.png",
        "reports/evaluate/reliability.png",
        "reports/baseline/reliability.png",
        "reports/ensemble/reliability.png",
        "reports/audit/suspects.png",
    }
    # DVC's confusion matrix: actual on the rows (y) as in confusion.png, counting confusion.json's cells
    spec = plots["confusion_matrix"][0]["content"]
    encoding = spec["spec"]["encoding"]
    assert encoding["y"]["field"] == "actual" and encoding["x"]["field"] == "predicted"
    drawn = Counter((p["actual"], p["predicted"]) for p in spec["data"]["values"])
    names = confusion["classes"]
    expected = {
        (names[i], names[j]): n
        for i, row in enumerate(confusion["rows_actual_columns_predicted"])
        for j, n in enumerate(row)
        if n
    }
    assert dict(drawn) == expected
    assert not (workspace / "reports" / "runs").exists(), "tracking writes nothing into the pipeline's outputs"


def test_mlflow_holds_one_pipeline_version_linking_every_stage_run(repo):
    import mlflow

    workspace, c = repo["path"], client(repo["server"])
    experiment = c.get_experiment_by_name("image-classifier")
    runs = {r.info.run_id: r for r in c.search_runs([experiment.experiment_id])}
    ids = run_ids(repo["server"])
    versions = [r for r in runs.values() if r.data.tags["pipeline.stage"] == "pipeline"]
    assert len(versions) == 1
    version = versions[0]

    # the version's row: every param, flattened, and the key metrics
    assert version.data.params["finetune.learning_rate"] == "0.01"
    assert version.data.params["data.split.train"] == "12"
    assert version.data.params["model.backbone"] == "vgg16"
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    top = json.loads((workspace / "reports/train_top/metrics.json").read_text())
    # (as models.csv shows them, to table.DECIMALS decimals)
    assert version.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert version.data.metrics["test.log_loss"] == pytest.approx(metrics["test"]["log_loss"], abs=1e-6)
    assert version.data.metrics["top.val_accuracy"] == pytest.approx(top["top"]["val_accuracy"])
    assert "finetune.val_accuracy" in version.data.metrics
    # its name (no commit yet: "pipeline"), its curves, its duration and its model
    assert version.info.run_name == "pipeline"
    for name, epochs in (("top.val_accuracy", TINY["top"]["epochs"]), ("finetune.loss", TINY["finetune"]["epochs"])):
        assert sorted(m.step for m in c.get_metric_history(version.info.run_id, name)) == list(range(1, epochs + 1))
    earliest = min(r.info.start_time for r in runs.values() if r.info.run_id != version.info.run_id)
    assert version.info.start_time == earliest and version.info.end_time > version.info.start_time
    linked = c.get_run(version.info.run_id).outputs.model_outputs
    assert {c.get_logged_model(m.model_id).source_run_id for m in linked} == {ids["train_top"], ids["evaluate"]}
    assert sorted(c.get_logged_model(m.model_id).name for m in linked) == ["finetuned", "top"]
    # train_top registered the frozen-backbone model first (v1), evaluate the fine-tuned one (v2)
    assert version.data.tags["top.model.version"] == "1" and version.data.tags["model.version"] == "2"
    with open(workspace / "reports/models.csv", newline="") as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    # the first row of the table is the best, by the one rule the registry's champion follows too
    key = {name: ranking.sort_key(row["accuracy"], row["log_loss"]) for name, row in table.items()}
    assert list(table) == sorted(table, key=key.get)
    best = "2" if key["finetuned"] < key["top"] else "1"  # of equals, the earlier stays champion
    # each registry version says what it is; the registered model, what its versions and aliases are
    described = c.get_model_version("image-classifier", "2").description
    assert described.startswith("finetuned model of pipeline: vgg16, last 1 block fine-tuned\n")
    assert "- params changed from the committed params.yaml: unknown (no committed params.yaml)" in described
    assert c.get_model_version("image-classifier", "1").description.startswith("top model of pipeline: vgg16 frozen")
    assert c.get_registered_model("image-classifier").description == registry.REGISTERED_MODEL_DESCRIPTION
    # the version carries the models table and every figure, for Compare; it ranks first of one
    # (at the root of its artifacts, which is where MLflow's Compare page looks)
    carried = {a.path for a in c.list_artifacts(version.info.run_id)}
    assert {"models.csv", "evaluate.confusion.png", "evaluate.training_curves.png", "audit.suspects.png"} <= carried
    assert {"evaluate.reliability.png", "train_top.reliability.png", "baseline.reliability.png"} <= carried
    assert version.data.metrics["rank"] == 1
    assert version.data.tags["pipeline.models"] == "top v1, finetuned v2"
    # the view of every version, saved with the experiment, which the link opens
    saved = views.decode(experiment.tags[views.SHARE_TAG + views.ALL_VERSIONS])
    # (one version: no param differs, so the metrics follow the rank)
    assert saved["selectedColumns"][:3] == ["metrics.`rank`", "metrics.`test.accuracy`", "metrics.`test.log_loss`"]
    assert [r.info.run_id for r in c.search_runs([experiment.experiment_id], saved["searchFilter"])] == [
        version.info.run_id
    ]

    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    out_hash = locked_hashes(workspace)
    head = run(["git", "rev-parse", "--verify", "-q", "HEAD"], workspace, repo["env"], check=False)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"  # no commit yet at the first run
    for stage, run_id in ids.items():
        stage_run = runs[run_id]
        tags = stage_run.data.tags
        assert version.data.tags[f"run.{stage}"] == run_id
        assert tags["pipeline.stage"] == stage and stage_run.info.run_name == stage
        assert tags["mlflow.parentRunId"] == version.info.run_id
        assert tags["git.commit"] == commit and tags["git.dirty"] in ("true", "false")
        assert stage_run.info.status == "FINISHED"
        # the DVC hash of everything it wrote, as dvc.lock records it
        assert {k[len("dvc.out.") :]: v for k, v in tags.items() if k.startswith("dvc.out.")} == {
            out["path"]: out["md5"] for out in lock[stage]["outs"]
        }
    # DVC content hashes of what each stage read and wrote, as in dvc.lock
    featurize = runs[ids["featurize"]]
    assert featurize.data.tags["dvc.in.data/prepared"] == out_hash["data/prepared"]
    assert featurize.data.tags["dvc.out.data/features"] == out_hash["data/features"]
    assert runs[ids["finetune"]].data.tags["dvc.out.models/model.keras"] == out_hash["models/model.keras"]
    assert runs[ids["evaluate"]].data.tags["dvc.in.models/model.keras"] == out_hash["models/model.keras"]
    inputs = {d.dataset.name: d.dataset.digest for d in c.get_run(ids["featurize"]).inputs.dataset_inputs}
    assert inputs == {"data/prepared": out_hash["data/prepared"]}
    # per-epoch curves of the training stages, named as their final values in the metrics files
    for stage, name in (("train_top", "top"), ("finetune", "finetune")):
        logged = runs[ids[stage]].data.metrics
        scored = {f"top.test.{k}" for k in TEST_METRICS} if name == "top" else set()
        assert (
            set(logged) == {f"{name}.{k}" for k in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch")} | scored
        )
        history = sorted(c.get_metric_history(ids[stage], f"{name}.val_accuracy"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, TINY[name]["epochs"] + 1)), "epochs 1, 2, ... of the stage"
        final = json.loads((workspace / f"reports/{stage}/metrics.json").read_text())[name]["val_accuracy"]
        assert history[-1].value == pytest.approx(final, abs=1e-6)
    # the evaluate run: the same names as reports/metrics.json
    assert {k for k in runs[ids["evaluate"]].data.metrics if k.startswith("test.")} == {
        f"test.{k}" for k in TEST_METRICS
    }
    # prepare's counts reach MLflow as numbers, though reports/data.json is no DVC metric
    data = json.loads((workspace / "reports/data.json").read_text())
    prepared = runs[ids["prepare"]].data.metrics
    assert prepared["classes.horizontal.train"] == data["classes"]["horizontal"]["train"] == 12
    assert prepared["images_kept"] == data["images_kept"] and prepared["dropped.empty"] == 0
    # artifacts of the training stages
    assert "reports" in [a.path for a in c.list_artifacts(ids["finetune"])]
    assert {"confusion.png", "roc.png", "training_curves.png"} <= {
        Path(a.path).name for a in c.list_artifacts(ids["evaluate"], "reports/evaluate")
    }

    # the model: registered, aliased, loadable with pyfunc, scoring like evaluate
    candidate = c.get_model_version_by_alias("image-classifier", "candidate")
    champion = c.get_model_version_by_alias("image-classifier", "champion")
    assert candidate.version == "2" and champion.version == best
    assert "candidate and champion" in runs[ids["train_top"]].data.tags["model.registry"]
    assert ("candidate and champion" in runs[ids["evaluate"]].data.tags["model.registry"]) == (best == "2")
    model = mlflow.pyfunc.load_model("models:/image-classifier@candidate")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    with open(workspace / "reports/evaluate/predictions.csv") as f:
        expected = list(csv.DictReader(f))[:4]
    pictures = [next((workspace / "data/prepared/test").rglob(row["path"])) for row in expected]
    import pandas as pd

    scored = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in pictures]}))
    assert list(scored["label"]) == [row["predicted"] for row in expected]
    assert list(scored["confidence"]) == pytest.approx([float(row["confidence"]) for row in expected], abs=1e-5)
    assert list(scored.columns) == ["label", "confidence", "p.horizontal", "p.vertical"]

    # the run that wrote an output, from its DVC hash: one command
    found = run([sys.executable, "-m", "ops.tracking", "find", "models/model.keras"], workspace, repo["env"])
    assert found.stdout.split()[:2] == [ids["finetune"], "finetune"]


def test_second_repro_runs_nothing_and_logs_nothing(repo):
    c = client(repo["server"])
    experiment = c.get_experiment_by_name("image-classifier")
    before = len(c.search_runs([experiment.experiment_id]))
    assert dvc_repro(repo["path"], repo["env"]) == []
    assert len(c.search_runs([experiment.experiment_id])) == before


def test_finetune_change_reruns_finetune_and_evaluate_linked_to_earlier_runs(repo):
    workspace, c = repo["path"], client(repo["server"])
    before = run_ids(repo["server"])
    set_param(workspace, "finetune", "learning_rate", 0.005)
    done = dvc("repro", cwd=workspace, env=repo["env"])
    assert ran_stages(done.stdout) == ["finetune", "evaluate", "export", "compare"]
    # a fine-tuning that ends below the head it started from says so, in its log and in the table
    head = json.loads((workspace / "reports/train_top/metrics.json").read_text())["top"]["val_accuracy"]
    tuned = json.loads((workspace / "reports/finetune/metrics.json").read_text())["finetune"]["val_accuracy"]
    warned = f"fine-tuning lowered validation accuracy from {head:.4f} (the head, row top) to {tuned:.4f}"
    assert (warned in done.stdout + done.stderr) == (tuned < head)
    with open(workspace / "reports/models.csv", newline="") as f:
        notes = {row["model"]: row.get("note", "") for row in csv.DictReader(f)}
    assert bool(notes["finetuned"]) == (tuned < head), notes
    after = run_ids(repo["server"])
    changed = [s for s in LOGGED if before[s] != after[s]]
    assert changed == ["finetune", "evaluate"]
    versions = pipeline_versions(repo["server"])
    assert len(versions) == 2
    newest = versions[0]
    assert newest.data.params["finetune.learning_rate"] == "0.005"
    assert {s: newest.data.tags[f"run.{s}"] for s in LOGGED} == after, "unchanged upstream runs are linked"
    # the reused runs keep their first version as parent; the new ones nest under the new version
    assert c.get_run(after["featurize"]).data.tags["mlflow.parentRunId"] == versions[1].info.run_id
    assert c.get_run(after["finetune"]).data.tags["mlflow.parentRunId"] == newest.info.run_id
    # registry: the new model (v3, after the frozen-backbone v1 and the first fine-tuned v2) is the
    # candidate; champion only if it scored higher than both
    candidate = c.get_model_version_by_alias("image-classifier", "candidate")
    champion = c.get_model_version_by_alias("image-classifier", "champion")
    assert candidate.version == "3"
    tags = [c.get_model_version("image-classifier", v).tags for v in ("1", "2", "3")]
    scores = [ranking.sort_key(t["test.accuracy"], t["test.log_loss"]) for t in tags]
    assert champion.version == str(scores.index(min(scores)) + 1), "the best; of equals the earliest"
    outcome = c.get_run(after["evaluate"]).data.tags["model.registry"]
    assert ("champion" in outcome.split(":")[1].split("(")[0]) == (scores[2] < min(scores[:2]))
    # the second version is ranked among the two
    ranks = sorted(v.data.metrics["rank"] for v in pipeline_versions(repo["server"]))
    assert ranks == [1, 2]


def test_top_change_reruns_from_train_top_not_featurize(repo):
    """The stages whose own deps changed (what runs after them follows when their outputs change)."""
    params = repo["path"] / "params.yaml"
    committed = params.read_text()
    set_param(repo["path"], "top", "units", 8)
    try:
        dry = dvc("repro", "--dry", cwd=repo["path"], env=repo["env"]).stdout
        assert ran_stages(dry) == ["train_top", "finetune", "ensemble", "compare"]  # all read top.units
    finally:
        params.write_text(committed)


def test_unreachable_tracking_server_fails_fast_before_any_work(repo, tmp_path):
    workspace = repo["path"]
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = run(
        [
            sys.executable,
            "-m",
            "stages.train_top",
            "data/features",
            "models/backbone.weights.h5",
            "data/prepared",
            "models/top.keras",
            "models/frozen",
            "reports/train_top",
        ],
        workspace,
        repo["env"] | {"MLFLOW_TRACKING_URI": uri},
        check=False,
    )
    assert time.monotonic() - started < 30  # mostly importing TensorFlow; the check itself takes < 5 s
    assert done.returncode == 2
    assert f"The MLflow tracking server {uri} is not reachable" in done.stderr
    assert "Nothing was run." in done.stderr and "Epoch 1" not in done.stdout


def test_queued_experiments_run_in_parallel_into_the_embedded_store(repo):
    workspace = repo["path"]
    env = {k: v for k, v in repo["env"].items() if k != "MLFLOW_TRACKING_URI"}  # the default: mlflow.db
    run(["git", "add", "-A"], workspace, env)
    run(["git", "commit", "-qm", "baseline"], workspace, env)
    # A change that re-runs the two stages that score on a threshold (train_top and evaluate), export
    # (switched off) and compare: each experiment logs its own runs and version.
    for threshold in ("0.3", "0.7"):
        dvc("exp", "run", "--queue", "-S", f"evaluate.threshold={threshold}", cwd=workspace, env=env)
    # The workers `queue start` leaves running would hold a pipe of its: its output goes to a file.
    with open(workspace.parent / "queue-start.log", "w") as out:
        subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"],
            cwd=workspace,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )
    try:
        deadline = time.monotonic() + 600
        while True:  # what the queue says of the experiments, not whether its workers end
            status = dvc("queue", "status", cwd=workspace, env=env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the queued experiments did not end within 600 s:\n{status}")
            time.sleep(1)
        failed = [line.split()[1] for line in status.splitlines()[1:] if "Failed" in line]
        logs = "".join(
            dvc("queue", "logs", name, cwd=workspace, env=env, check=False).stdout[-3000:] for name in failed
        )
        assert status.count("Success") == 2, status + logs
    finally:
        stop_queue(workspace, env)
    assert queue_workers(workspace) == [], "no worker is left behind"

    shown = json.loads(dvc("exp", "show", "--json", cwd=workspace, env=env).stdout)
    thresholds = set()
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                thresholds.add(data["params"]["params.yaml"]["data"]["evaluate"]["threshold"])
                assert "accuracy" in data["metrics"]["reports/metrics.json"]["data"]["test"]
    assert {0.3, 0.7} <= thresholds
    # docs/experiments.md's `dvc exp show`, as written there: the kept metrics and the changed param alone
    page = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    command = re.search(r"^(dvc exp show --only-changed .+?)$\n(?!  )", page, re.MULTILINE | re.DOTALL).group(1)
    words = shlex.split(command.replace("\\\n", " "))
    header = dvc(*words[1:], "--csv", cwd=workspace, env=env).stdout.splitlines()[0].split(",")
    assert header == [
        "Experiment",
        "rev",
        "typ",
        "finetune.val_accuracy",
        "test.accuracy",
        "test.log_loss",
        "evaluate.threshold",
    ]

    c = client(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = c.get_experiment_by_name("image-classifier")
    runs = c.search_runs([experiment.experiment_id])
    versions = [r for r in runs if r.data.tags["pipeline.stage"] == "pipeline"]
    assert sorted(r.data.params["evaluate.threshold"] for r in versions) == ["0.3", "0.7"]
    for version in versions:
        assert version.data.tags.get("dvc.experiment")
        threshold = version.data.params["evaluate.threshold"]
        assert version.info.run_name == f"{version.data.tags['dvc.experiment']} evaluate.threshold={threshold}"
        evaluated = c.get_run(version.data.tags["run.evaluate"])
        assert evaluated.info.status == "FINISHED"
        assert evaluated.data.tags["dvc.experiment"] == version.data.tags["dvc.experiment"]
        assert evaluated.data.params["evaluate.threshold"] == threshold
    shutil.rmtree(workspace / ".dvc" / "tmp", ignore_errors=True)
