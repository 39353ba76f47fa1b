"""Logging a classifier as an MLflow model (with only the code it needs to answer), registering it,
and the champion policy: the `champion` alias goes to the best version on the same test set."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

from classifier.metrics import ranking
from ops import code
from ops.serving import pyfunc
from ops.serving.pyfunc import COLUMN
from ops.tracking.store import active_run_id, enabled, retry_conflicts, store_lock, tracking_uri

log = logging.getLogger(__name__)


#: The model version tag holding the DVC hash of the prepared data its test accuracy was measured on.
TEST_SET = "test_set"


#: A registered version's description names at most this many classes.
DESCRIBED_CLASSES = 10


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
    classes: list[str],
    test_set: str | None,
    backbone: str | None,
    accuracy: float,
    metrics: dict[str, Any],
    about: dict[str, Any] | None = None,
) -> str:
    """A registered version's description (Markdown): which model it is and of which pipeline version,
    the params that version changed, what it tells apart, what it is built on, and how it scored on
    which test set, so that a version can be judged from the registry alone. `metrics` holds the
    model's headline test numbers (reports/metrics.json's `test` for the fine-tuned one): its
    `log_loss` and `images` are given when there. `about` (see `log_model`) names the model (`model`,
    `what` it is), the pipeline `version` and the params it `changed` ({key: value}; None: unknown)."""
    about = about or {}
    shown = ", ".join(map(literal, classes[:DESCRIBED_CLASSES]))
    if len(classes) > DESCRIBED_CLASSES:
        shown += f", ... (the first {DESCRIBED_CLASSES}; all in the model's artifacts/spec.json)"
    scores = f"accuracy {accuracy:.4f}"
    if isinstance(metrics.get("log_loss"), int | float):
        scores += f", log loss {metrics['log_loss']:.4f}"
    images = f"{metrics['images']} images, " if isinstance(metrics.get("images"), int) else ""
    changed = about.get("changed")
    model = f"{about['model']} model" if about.get("model") else "a model"
    version = literal(about.get("version") or "an unknown pipeline version")
    lines = [
        f"{model} of {version}: {about.get('what') or backbone or 'a classifier'}",
        "",
        "- params changed from the committed params.yaml: "
        + (
            "unknown (no committed params.yaml)"
            if changed is None
            else ", ".join(literal(f"{key}={value}") for key, value in changed.items()) or "none"
        ),
        f"- test metrics: {scores}",
        f"- test set: {literal(test_set or 'unknown')} ({images}the DVC hash of the prepared data it was scored on)",
        f"- classes ({len(classes)}): {shown}",
        f"- backbone: {backbone or 'unknown'}",
    ]
    return "\n".join(lines)


def literal(text: str) -> str:
    """`text` as Markdown that shows it as it is: the marks that start HTML (`<img ...>`), an entity,
    a link, an image, code, a table cell, emphasis or strike-through are backslash-escaped (`_` inside
    a word, as in learning_rate, starts nothing), so that a class name, a param value or a version
    name is shown, never rendered, where the registry shows the description."""
    return re.sub(r"[\\`*\[\]<>&!|~]|(?<!\w)_|_(?!\w)", lambda mark: "\\" + mark.group(0), text)


#: The registered model's description: what its versions are and what its aliases mean.
REGISTERED_MODEL_DESCRIPTION = (
    "The image classifiers this pipeline registers: each pipeline version registers its **top** model "
    "(the frozen backbone and the head trained on its cached features), its **finetuned** model and, when "
    "`ensemble.backbones` names some, its **ensemble**. Each version's description says which one it is, "
    "of which pipeline version, the params that version changed, and its test set and scores.\n\n"
    "- `candidate`: the newest version.\n"
    f"- `champion`: the best version on the champion's test set ({ranking.IN_WORDS}; of equals, the earliest).\n"
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


def shipped_code(folder: Path) -> Path:
    """The code the served model runs besides its own file, copied into `folder`: the modules of the
    computing package that ops.serving.pyfunc imports (the path from pictures to probabilities), with
    their packages' __init__.py files; the copy's package folder, for `code_paths`."""
    modules = code.closure(pyfunc.__name__) - {pyfunc.__name__}
    for relative in code.files_of(modules):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(code.ROOT / relative, folder / relative)
    return folder / code.COMPUTING


def log_model(
    model_path: Path,
    classes: list[str],
    threshold: float,
    registered_model: str | None,
    accuracy: float,
    test_set: str | None,
    max_side: int,
    precision: str,
    metrics: dict[str, Any] | None = None,
    min_side: int = 1,
    max_pixels: int | None = None,
    about: dict[str, Any] | None = None,
) -> str:
    """Log the fine-tuned model to the active run as a pyfunc model (`ImageClassifier`), with its
    signature (no input example: MLflow would load the model to check it, seconds of every stage
    that logs one, and only warn when it fails); register it with the alias `candidate`, and `champion` too
    when its test accuracy beats the current champion's on the same test set (`test_set`: the DVC
    hash of the prepared data it was scored on). `max_side` is the `data.max_side` its data was
    prepared with, which the served model prepares pictures to (refusing those under `min_side` or
    over `max_pixels`, as prepare drops them); `precision` the `precision` param,
    which it computes in (resolved on the machine that serves it, as `auto` is). `about` says what
    the model is: the logged model is named after its `model` (the models table's name: top,
    finetuned, ensemble), and the version's description (`describe`) gives it, `what` it is, the
    pipeline `version` and the params that version `changed`, its classes, backbone (read from the
    model file), test set and test metrics (`accuracy`, and the log loss and number of images of
    `metrics`). Returns what happened, for the run's tags."""
    if not enabled():
        return "not logged (PIPELINE_TRACKING=off)"
    import tempfile

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    # Optional only so that a request without the column reaches `predict`, which refuses it in one
    # line; MLflow's own refusal echoes the whole request over several lines.
    inputs: list[ColSpec | TensorSpec] = [ColSpec("binary", COLUMN, required=False)]
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"p.{c}") for c in classes]
    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
    with tempfile.TemporaryDirectory() as tmp, store_lock():
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(model_spec(classes, threshold, max_side, precision, min_side, max_pixels)), encoding="utf-8"
        )
        with warnings.catch_warnings():  # no input example, on purpose: MLflow warns of its absence
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=(about or {}).get("model", "model"),
                python_model=pyfunc.__file__,  # models from code: that file, not a pickled object
                artifacts={"model": str(model_path), "spec": str(spec)},
                code_paths=[str(shipped_code(Path(tmp) / "code"))],
                signature=signature,
                pip_requirements=_requirements(),
            )
        if registered_model is None:
            outcome = "not registered (evaluate.registered_model is null)"
            mlflow.set_tag("model.registry", outcome)
            return outcome
        description = describe(classes, test_set, backbone_of(model_path), accuracy, metrics or {}, about)
        log_loss = (metrics or {}).get("log_loss")
        version, outcome = register(
            info.model_uri, registered_model, accuracy, test_set, active_run_id(), description, log_loss
        )
        mlflow.set_tags({"model.registry": outcome, "model.version": str(version)})
    log.info("%s", outcome)
    return outcome


def register(
    model_uri: str,
    name: str,
    accuracy: float,
    test_set: str | None,
    run_id: str,
    description: str | None = None,
    log_loss: float | None = None,
) -> tuple[str, str]:
    """Register the model at `model_uri` as a new version of `name`, tagged with its test accuracy
    and log loss, its test set and its run, and described by `description` (see `describe`); give it
    the alias `candidate`, and `champion` when it earns it. The registered model gets its own
    description (REGISTERED_MODEL_DESCRIPTION). Returns the version and what was decided."""
    import mlflow

    version = mlflow.register_model(model_uri, name).version
    client = mlflow.MlflowClient(tracking_uri())
    if client.get_registered_model(name).description != REGISTERED_MODEL_DESCRIPTION:
        client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    if description:
        client.update_model_version(name, version, description=description)
    client.set_model_version_tag(name, version, "test.accuracy", str(accuracy))
    if log_loss is not None:
        client.set_model_version_tag(name, version, "test.log_loss", str(log_loss))
    client.set_model_version_tag(name, version, TEST_SET, test_set or "unknown")
    client.set_model_version_tag(name, version, "run_id", run_id)
    set_alias(client, name, "candidate", version)
    outcome = settle_champion(client, name, version, accuracy, test_set, log_loss)
    return version, f"{name} v{version}: {outcome}"


#: How many times `settle_champion` moves the alias before it gives up (each move follows a read
#: that found a better version; only evaluations finishing at the same moment make more than one).
SETTLE_ROUNDS = 20


def settle_champion(
    client: Any, name: str, version: str, accuracy: float, test_set: str | None, log_loss: float | None = None
) -> str:
    """Give `champion` to the best version of `name`, and say what that meant for `version` (just
    registered, with its `test.accuracy`, `test.log_loss` and test set tags).

    The best version is the best by `ranking` (highest test accuracy, then lowest test log loss)
    among the versions scored on the champion's test set (on `version`'s when there is no champion
    yet); of equals the earliest, so a newer version must beat it. Scores on different test sets are
    not compared: a champion set by hand to another test set stays until a version on that test set
    beats it.

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
        return f"candidate and champion ({_scores(accuracy, log_loss)} beats v{before.version}'s {_scores_of(before)})"
    theirs = champion.tags.get(TEST_SET, "unknown")
    if test_set is None or theirs != test_set:
        return (
            f"candidate only (test accuracy {accuracy:.4f} on test set {(test_set or 'unknown')[:12]}; champion "
            f"v{champion.version} was scored on test set {theirs[:12]}: accuracies on different test sets "
            "are not compared. To make this version the champion, set its alias by hand)"
        )
    best = f"v{champion.version}'s {_scores_of(champion)}"
    return f"candidate only ({_scores(accuracy, log_loss)} does not beat champion {best})"


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    """Point `alias` of `name` at `version`. A server on PostgreSQL refuses one of two requests that
    create the same alias at the same moment (a unique key violated): that one is sent again."""
    retry_conflicts(client.set_registered_model_alias, name, alias, version)


def _alias(client: Any, name: str, alias: str) -> Any:
    """The version of `name` with `alias`, None when no version has it."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _sort_key(version: Any) -> tuple[float, float]:
    """`ranking.sort_key` of a version's test accuracy and log loss tags."""
    return ranking.sort_key(version.tags.get("test.accuracy"), version.tags.get("test.log_loss"))


def _scores(accuracy: float, log_loss: float | None) -> str:
    loss = f", log loss {log_loss:.4f}" if isinstance(log_loss, int | float) else ""
    return f"test accuracy {accuracy:.4f}{loss}"


def _scores_of(version: Any) -> str:
    """A version's test scores, as its tags have them."""
    accuracy, loss = _sort_key(version)
    return _scores(-accuracy, None if loss == float("inf") else loss)


def _best_version(client: Any, name: str, test_set: str) -> Any:
    """The best version of `name` scored on `test_set` (`ranking`: test accuracy, then log loss; of
    equals, the earliest); None when there is none."""
    scored = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get(TEST_SET) == test_set and _sort_key(v)[0] < float("inf")
    ]
    return min(scored, key=lambda v: (*_sort_key(v), int(v.version)), default=None)
