"""The pipeline version (`log_pipeline_version`, by compare): one run with every param, the key
metrics of every model, its rank among the versions, the figures and the models table, and a link to
the run of every stage, found by the hashes dvc.lock records; the saved views that compare it with
the version it came from and with every version (`views`); a failed attempt's row; and `find`, the
runs that wrote an output.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from classifier import config
from classifier.errors import StageError
from classifier.metrics import ranking, table
from ops.tracking import views
from ops.tracking.lineage import (
    LOCK_FILE,
    committed,
    dvc_stages,
    git_commit,
    lineage_tags,
    locked_hashes,
    loggable_params,
    outputs_digest,
    stage_outputs,
)
from ops.tracking.metrics import CURVE_PREFIX, all_metrics, history_rows
from ops.tracking.store import (
    enabled,
    ensure_experiment,
    experiment_name,
    logging_failed,
    retry_conflicts,
    store_lock,
    store_uri,
    tracking_client,
    tracking_uri,
)
from ops.tracking.worker import in_worker

log = logging.getLogger(__name__)

PIPELINE_RUN = "pipeline"


#: The pipeline version's headline metrics, named as in the metrics files (flattened) and in DVC.
KEY_METRICS = (
    "top.val_accuracy",
    "finetune.val_accuracy",
    "test.accuracy",
    "test.top3_accuracy",
    "test.log_loss",
    "test.ece",
    "top.test.accuracy",
    "baseline.test.accuracy",
    "ensemble.test.accuracy",
    "audit.flagged",
)


def version_name(params: config.Params, changed: dict[str, Any] | None = None) -> str:
    """What a version is called: its DVC experiment, else its commit, and the params it changed
    from the committed params.yaml (`exp-3f2a1 finetune.learning_rate=0.0002`); `changed`: those
    params when the caller has them (`changed_params`)."""
    commit, _ = git_commit()
    name = os.environ.get("DVC_EXP_NAME") or (commit[:7] if commit != "unknown" else PIPELINE_RUN)
    changed = (changed if changed is not None else changed_params(params)) or {}
    shown = [f"{key}={value}" for key, value in changed.items()][:3]
    if len(changed) > len(shown):
        shown.append(f"+{len(changed) - len(shown)} more")
    return " ".join([name, *shown])


def changed_params(params: config.Params) -> dict[str, Any] | None:
    """The params whose values differ from the committed params.yaml; None when there is none to
    compare with (outside git, or params.yaml not committed)."""
    text = committed(config.PARAMS_FILE)
    if text is None:
        return None
    try:
        before = config.flatten(config.parse(yaml.safe_load(text)))
    except (yaml.YAMLError, config.ParamsError):
        return None
    return {k: v for k, v in loggable_params(params).items() if before.get(k) != v}


def _log_curves(client: Any, run_id: str) -> set[str]:
    """The per-epoch history of each training stage, as step metrics of the version: its Compare
    and chart views draw them (`top.val_accuracy`, `finetune.val_accuracy`, ...). Returns their names."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    names: set[str] = set()
    for stage, prefix in CURVE_PREFIX.items():
        for path in stage_outputs(stage):
            if path.endswith("history.csv") and Path(path).is_file():
                rows = history_rows(Path(path))
                points = [Metric(prefix + k, v, stamp, step) for step, values in rows for k, v in values.items()]
                for start in range(0, len(points), 1000):  # log_batch takes at most 1000 metrics
                    client.log_batch(run_id, metrics=points[start : start + 1000])
                names |= {point.key for point in points}
    return names


def _link_models(client: Any, experiment_id: str, source_run: str, version_id: str) -> None:
    """Show the models `source_run` logged (the fine-tuned model) on the version's row too."""
    from mlflow.entities import LoggedModelOutput

    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{source_run}'"
    )
    if models:
        client.log_outputs(version_id, [LoggedModelOutput(m.model_id, step=0) for m in models])


#: The address of the MLflow UI that `mlflow ui` serves by default, for a store that is not a server.
LOCAL_UI = "http://127.0.0.1:5000"

#: The version's tag holding `lineage.outputs_digest` of its dvc.lock: what finds the version a
#: `dvc exp run` came from (the one whose outputs the committed dvc.lock records).
OUTPUTS_TAG = "pipeline.outputs"

#: What the version run carries for Compare's artifact view: the models table, and the figures of
#: every stage (found among the reports/ outputs dvc.yaml declares).
REPORTS = "reports/"


def ui_base() -> str:
    """Where the MLflow UI of the tracking store is: the tracking server itself, else LOCAL_UI."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def versions_url(base: str | None = None) -> str:
    """The address of the view of every pipeline version, best first (`views.ALL_VERSIONS`, saved by
    each version), in the MLflow UI at `base` (default `ui_base()`)."""
    experiment = tracking_client().get_experiment_by_name(experiment_name())
    if experiment is None:
        return f"{base or ui_base()}/"
    return views.link(base or ui_base(), experiment.experiment_id, views.ALL_VERSIONS)


def runs_that_wrote(outputs: dict[str, str], stage: str | None = None, max_results: int = 100) -> list[Any]:
    """The finished runs, newest first, that wrote every output in `outputs` ({path: DVC hash})."""
    client = tracking_client()
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None or not outputs:
        return []
    conditions = [f"tags.`dvc.out.{path}` = '{md5}'" for path, md5 in outputs.items()]
    if stage:
        conditions.append(f"tags.`pipeline.stage` = '{stage}'")
    conditions.append("attributes.status = 'FINISHED'")
    return client.search_runs(
        [experiment.experiment_id],
        " and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def switched_off(params: config.Params) -> set[str]:
    """The stages that `params` switch off: they run, but write empty outputs and log no run."""
    off = set()
    if not params.baseline.enabled:
        off.add("baseline")
    if not params.ensemble.backbones:
        off.add("ensemble")
    if not params.export.formats:
        off.add("export")
    return off


@in_worker
def log_pipeline_version(params: config.Params, stage: str = "compare") -> str | None:
    """Open the run of this pipeline version, linking the run of every stage; return its id
    (None when tracking is off).

    Called by the last stage, `stage`, which has no run of its own, once dvc.lock records every
    other stage. Each stage's run is the newest that wrote the outputs dvc.lock records for it, so a
    stage reused unchanged (or restored from DVC's run-cache) links the run that first wrote its
    outputs; a stage switched off (`switched_off`) has none. Runs made in this version get it as
    their parent: they nest under it in the MLflow UI. The version shows the models that train_top,
    evaluate and ensemble logged, and carries evaluate's `model.*` tags (train_top's as `top.model.*`,
    the ensemble's as `ensemble.model.*`).
    """
    if not enabled():
        return None
    import mlflow
    from mlflow.entities import Param

    client = tracking_client()
    hashes = locked_hashes()
    runs: dict[str, str] = {}
    skipped = switched_off(params) | {stage}
    for name in dvc_stages():
        if name in skipped:
            continue
        if found := runs_that_wrote({p: hashes[p] for p in stage_outputs(name) if p in hashes}, name, 1):
            runs[name] = found[0].info.run_id
        else:
            log.warning("no run in %s wrote the %s outputs dvc.lock records: not linked", tracking_uri(), name)
    metrics = {k: v for k, v in all_metrics().items() if k in KEY_METRICS}
    tags = lineage_tags(PIPELINE_RUN) | {f"run.{name}": run_id for name, run_id in runs.items()}
    if LOCK_FILE.is_file():
        tags[OUTPUTS_TAG] = outputs_digest(LOCK_FILE.read_text(encoding="utf-8"), last=stage)
    try:
        with store_lock():
            experiment = ensure_experiment(client)
            linked = {name: client.get_run(run_id) for name, run_id in runs.items()}
            new = [r for r in linked.values() if "mlflow.parentRunId" not in r.data.tags]  # made in this version
            for name, prefix in (("evaluate", ""), ("train_top", "top."), ("ensemble", "ensemble.")):
                if name in linked:
                    tags |= {prefix + k: v for k, v in linked[name].data.tags.items() if k.startswith("model.")}
            tags[views.MODELS_TAG] = _models(tags)
            version = client.create_run(
                experiment.experiment_id,
                run_name=version_name(params),
                tags=tags,
                start_time=_first_start(new),  # the version spans the work of its stages
            )
            version_id = version.info.run_id
            client.log_batch(version_id, params=[Param(k, str(v)) for k, v in loggable_params(params).items()])
            curves = _log_curves(client, version_id)
            for key, value in metrics.items():
                if key not in curves:  # a curve ends on the final value already
                    # rounded as the models table shows them: the UI's columns show every digit
                    client.log_metric(version_id, key, round(value, table.DECIMALS))
            for name in ("train_top", "evaluate", "ensemble"):
                if name in runs:
                    _link_models(client, experiment.experiment_id, runs[name], version_id)
            _log_reports(client, version_id)
            for other in new:
                retry_conflicts(client.set_tag, other.info.run_id, "mlflow.parentRunId", version_id)
            client.set_terminated(version_id)
            versions = _rank_versions(client, experiment.experiment_id)
            base = _base_version(client, experiment.experiment_id, version_id)
            links = _save_views(client, experiment.experiment_id, versions, base, version_id)
    except Exception as err:
        raise logging_failed(stage, "logging the pipeline version", err) from err
    mlflow.set_tracking_uri(tracking_uri())
    log.info("pipeline version: MLflow run %s, linking %s", version_id, ", ".join(runs))
    rank = next((r.data.metrics.get(views.RANK) for r in versions if r.info.run_id == version_id), None)
    log.info(
        "pipeline version %s: rank %s of %d (%s)",
        version.info.run_name,
        f"{rank:.0f}" if rank else "?",
        len(versions),
        ranking.IN_WORDS,
    )
    if base is not None and version_id in links:
        log.info("compared with the version it came from, %s: %s", base.info.run_name, links[version_id])
        log.info("the two side by side, figures included: %s", links[COMPARE])
    log.info("every version, best first: %s", links[views.ALL_VERSIONS])
    if not tracking_uri().startswith(("http://", "https://")):
        # by its path: the command works in a shell where the venv is not activated
        mlflow_ui = Path(sys.executable).parent / "mlflow"
        log.info("to open them, start the MLflow UI first: %s ui --backend-store-uri %s", mlflow_ui, tracking_uri())
    return version_id


def _models(tags: dict[str, str]) -> str:
    """The models a version registered, named as the models table names them, from its `model.version`
    tags: `top v1, finetuned v2, ensemble v3` ("none registered" when there are none)."""
    found = [
        f"{model} v{tags[prefix + 'model.version']}"
        for model, prefix in (("top", "top."), (table.FINETUNED, ""), ("ensemble", "ensemble."))
        if tags.get(prefix + "model.version")
    ]
    return ", ".join(found) or "none registered"


#: At most this many versions are ranked (the best, by the `ranking` the views order by, come first).
RANKED = 5000

#: What finds the versions: the pipeline's version runs that finished (a failed attempt's row is no version).
VERSIONS_FILTER = f"tags.`pipeline.stage` = '{PIPELINE_RUN}' and attributes.status = 'FINISHED'"


def _log_reports(client: Any, version_id: str) -> None:
    """The models table and every stage's figures (the .png files among its reports/ outputs,
    folders searched) as artifacts at the root of the version, named by their path under reports/
    (`models.csv`, `evaluate.confusion.png`, `train_top.reliability.png`...): MLflow's Compare page
    shows the files at the root that two runs have in common side by side."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in dvc_stages():
            for output in stage_outputs(name):
                path = Path(output)
                if not output.startswith(REPORTS):
                    continue
                for file in sorted(path.rglob("*.png")) if path.is_dir() else [path]:
                    if file.is_file() and (file.suffix == ".png" or file.name == "models.csv"):
                        flat = file.as_posix().removeprefix(REPORTS).replace("/", ".")
                        shutil.copyfile(file, Path(tmp) / flat)
        client.log_artifacts(version_id, tmp)


def _rank_versions(client: Any, experiment_id: str) -> list[Any]:
    """Give each finished version its rank among them (`views.ranks`) as the metric views.RANK, where
    it changed; return the versions as last read. Several versions logged at the same moment (a
    team's server) each rank what they read: the ranks are read and written again until a read finds
    them right, as the champion alias is settled."""
    versions = client.search_runs([experiment_id], VERSIONS_FILTER, max_results=RANKED)
    for _ in range(3):
        ranks = views.ranks(versions)
        stale = {
            run.info.run_id: ranks[run.info.run_id]
            for run in versions
            if run.data.metrics.get(views.RANK) != ranks[run.info.run_id]
        }
        if not stale:
            break
        for run_id, rank in stale.items():
            client.log_metric(run_id, views.RANK, rank)
        versions = client.search_runs([experiment_id], VERSIONS_FILTER, max_results=RANKED)
    return versions


def _base_version(client: Any, experiment_id: str, version_id: str) -> Any | None:
    """The version this one came from: the newest other finished version whose outputs are those the
    committed dvc.lock records (`dvc exp run` starts from them); None outside git, or when that state
    was never logged."""
    lock = committed(LOCK_FILE)
    if lock is None:
        return None
    found = client.search_runs(
        [experiment_id],
        f"{VERSIONS_FILTER} and tags.`{OUTPUTS_TAG}` = '{outputs_digest(lock)}'",
        order_by=["attributes.start_time DESC"],
        max_results=2,
    )
    return next((run for run in found if run.info.run_id != version_id), None)


def _save_views(
    client: Any, experiment_id: str, versions: list[Any], base: Any | None, version_id: str
) -> dict[str, str]:
    """Save the view of every version (views.ALL_VERSIONS) and, when `base` is known, the view of this
    version beside it (under its run id); return {key: the link that opens it}, with the link of the
    Compare page of the two under COMPARE."""
    views.save(client, experiment_id, views.ALL_VERSIONS, views.comparison(versions, VERSIONS_FILTER))
    links = {views.ALL_VERSIONS: views.link(ui_base(), experiment_id, views.ALL_VERSIONS)}
    ids = [version_id, base.info.run_id] if base is not None else []
    pair = [run for run in versions if run.info.run_id in ids]
    if len(pair) == 2:
        found = ", ".join(f"'{run_id}'" for run_id in ids)
        views.save(client, experiment_id, version_id, views.comparison(pair, f"attributes.run_id IN ({found})"))
        links[version_id] = views.link(ui_base(), experiment_id, version_id)
        links[COMPARE] = views.compare_link(ui_base(), experiment_id, ids)
    return links


#: The key of `_save_views`'s links that holds the Compare page of a version and the one it came from.
COMPARE = "compare"


def find(path: str, md5: str | None) -> list[str]:
    """Lines describing the runs that wrote `path` with the DVC hash `md5` (default: dvc.lock's)."""
    import mlflow

    md5 = md5 or locked_hashes().get(path)
    if md5 is None:
        raise StageError(f"dvc.lock records no output {path!r}: give its hash with --md5, or run `dvc repro` first")
    mlflow.set_tracking_uri(store_uri())
    runs = runs_that_wrote({path: md5})
    if not runs:
        raise StageError(
            f"no finished run in {tracking_uri()} (experiment {experiment_name()}) wrote {path} {md5}: "
            "it was made with PIPELINE_TRACKING=off, logged to another store, or restored by `dvc pull`"
        )
    return [
        f"{r.info.run_id}  {r.data.tags.get('pipeline.stage', '?'):<10} "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.info.start_time / 1000))}  "
        f"git {r.data.tags.get('git.commit', 'unknown')[:10]}  {r.data.tags.get('dvc.experiment', '')}".rstrip()
        for r in runs
    ]


def record_failed_attempt(stage: str, params: config.Params) -> None:
    """A failed row for the attempt a stage failed in, with the attempt's stage runs nested under it,
    so that a failure stands with its version's params, not as a lone run among the versions."""
    client = tracking_client()
    experiment = ensure_experiment(client)
    tags = lineage_tags(PIPELINE_RUN) | {"pipeline.failed_stage": stage}
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`pipeline.attempt` = '{tags['pipeline.attempt']}'", max_results=100
    )
    name = f"{version_name(params)} (failed at {stage})"
    failed = client.create_run(experiment.experiment_id, run_name=name, tags=tags, start_time=_first_start(runs))
    for params_key, value in loggable_params(params).items():
        client.log_param(failed.info.run_id, params_key, value)
    for other in runs:
        if "mlflow.parentRunId" not in other.data.tags and other.data.tags.get("pipeline.stage") != PIPELINE_RUN:
            retry_conflicts(client.set_tag, other.info.run_id, "mlflow.parentRunId", failed.info.run_id)
    client.set_terminated(failed.info.run_id, "FAILED")


def _first_start(runs: list[Any]) -> int | None:
    """When the earliest of `runs` started (ms), None for none."""
    return min((r.info.start_time for r in runs), default=None)
