"""The PNG figures: evaluate's confusion matrix, ROC curve, and training curves (each training stage
in its own panels, its epochs counted 1, 2, ... within the stage); the reliability diagram of every
scored model (`write_reliability`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier import saving

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from classifier.metrics.scores import Calibration, Roc


#: The reliability diagram's file in a scoring stage's reports folder.
RELIABILITY = "reliability.png"


#: Above this many classes the confusion matrix PNG shows colours only, no counts.
MAX_ANNOTATED_CLASSES = 20


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], accuracy: float) -> Figure:
    """The confusion matrix as a heat map: rows are the actual class, columns the predicted one,
    both in the order of `classes`; each cell shows its count (up to MAX_ANNOTATED_CLASSES classes)."""
    plt = _pyplot()
    n = len(classes)
    side = 3.0 + (0.45 if n <= MAX_ANNOTATED_CLASSES else 0.2) * n
    longest = max((len(c) for c in classes), default=1)
    fig, ax = plt.subplots(figsize=(side + 0.07 * longest + 1.2, side + 0.07 * longest), layout="constrained")
    image = ax.imshow(confusion, cmap="Blues", vmin=0)
    font = 10 if n <= MAX_ANNOTATED_CLASSES else 6
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 or longest > 10 else 0, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= MAX_ANNOTATED_CLASSES:
        high = confusion.max() / 2 if confusion.size else 0
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > high else "black", fontsize=font)
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    ax.set_title(f"Test confusion matrix\naccuracy {accuracy:.3f} on {int(confusion.sum())} images", fontsize=11)
    return fig


def roc_figure(curve: Roc, classes: Sequence[str]) -> Figure:
    """The ROC curve with its AUC; for more than two classes the title and legend say it is the
    micro-average of the one-vs-rest curves, and give the macro-average AUC too."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")

    def auc_text(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    if curve.classes == 2:
        title = f"Test ROC, '{classes[1]}' as positive\nAUC {auc_text(curve.auc)}"
        label = f"model (AUC {auc_text(curve.auc)})"
    else:
        title = (
            f"Test ROC, micro-average of {curve.classes} one-vs-rest curves\n"
            f"micro-average AUC {auc_text(curve.auc)}, macro-average AUC {auc_text(curve.macro_auc)}"
        )
        label = f"micro-average (AUC {auc_text(curve.auc)})"
    ax.plot(curve.fpr, curve.tpr, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    return fig


#: The colour of each training stage's curves, in the order the histories are given.
STAGE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")

#: The least width of a stage's panels, as a fraction of the widest's: a stage of a few epochs
#: beside one of fifty stays readable.
MIN_PANEL_WIDTH = 0.4


def training_figure(histories: Sequence[Path]) -> Figure:
    """Loss (top row) and accuracy (bottom row) per epoch, train (solid) and validation (dashed): a
    column for each training stage that has epochs, in its own colour, on an epoch axis of its own
    numbered 1, 2, ... as its history.csv and MLflow count them. A column is as wide as its stage's
    epochs (at least MIN_PANEL_WIDTH of the widest); a row shares its y axis, so the stages
    compare. Epoch ticks are whole numbers; without any history, the frame says so."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    keys = ("loss", "accuracy")
    drawn = [
        (stage, epochs, history, STAGE_COLOURS[i % len(STAGE_COLOURS)])
        for i, (stage, epochs, history) in enumerate(training_series(histories))
        if len(epochs)
    ]
    if not drawn:
        fig, empty = plt.subplots(len(keys), 1, figsize=(6, 6.5), squeeze=False, layout="constrained")
        for ax, key in zip(empty[:, 0], keys, strict=True):
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=key, ylabel=key, xlabel="epoch")
        return fig
    longest = max(len(epochs) for _, epochs, _, _ in drawn)
    widths = [max(len(epochs), MIN_PANEL_WIDTH * longest) for _, epochs, _, _ in drawn]
    fig, axes = plt.subplots(
        len(keys),
        len(drawn),
        figsize=(min(16.0, 3.0 + 4.0 * len(drawn)), 6.5),
        width_ratios=widths,
        sharex="col",
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    for row, key in enumerate(keys):
        for column, (stage, epochs, history, colour) in enumerate(drawn):
            ax = axes[row, column]
            # Markers (filled: train, hollow: validation) keep a stage of one epoch visible.
            style = {"color": colour, "marker": "o" if len(epochs) <= 30 else None, "markersize": 5}
            ax.plot(epochs, history[key], label=f"{stage} train", **style)
            ax.plot(epochs, history[f"val_{key}"], "--", markerfacecolor="white", label=f"{stage} validation", **style)
            ax.set_xlim(0.5, len(epochs) + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_title(f"{stage}: {key}")
            ax.legend(fontsize=8)
            if column == 0:
                ax.set_ylabel(key)
            if row == len(keys) - 1:
                ax.set_xlabel(f"epoch of {stage}")
    return fig


def _save(fig: Figure, path: Path) -> None:
    """`fig` as a PNG at `path`, atomically (and by process 0 alone, run as several: `saving.atomic_path`)."""
    with saving.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def reliability_figure(cal: Calibration | None, model: str) -> Figure:
    """The reliability diagram: each confidence bin's accuracy against its mean confidence (on the
    diagonal when calibrated), with the number of predictions per bin below; `cal` None draws the
    frame of a model that was not trained."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True, layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    if cal is None or cal.ece is None:
        ax.text(0.5, 0.5, "no model scored", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{model}\nreliability on the test split")
    else:
        width = np.diff(cal.edges)
        shown = cal.counts > 0
        ax.bar(
            cal.edges[:-1][shown],
            cal.accuracy[shown],
            width=width[shown],
            align="edge",
            alpha=0.7,
            edgecolor="black",
            label="accuracy in the bin",
        )
        ax.plot(
            cal.confidence[shown],
            cal.accuracy[shown],
            "o",
            color="black",
            markersize=3,
            label="at the bin's mean confidence",
        )
        counts.bar(cal.edges[:-1], cal.counts, width=width, align="edge", color="grey", edgecolor="black")
        ax.set_title(f"{model}\nreliability on the test split, ECE {cal.ece:.3f}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    counts.set(xlabel="confidence (probability of the predicted class)", ylabel="predictions")
    return fig


def write_reliability(
    path: Path, labels: np.ndarray | None, probs: np.ndarray | None, threshold: float, model: str
) -> None:
    """The reliability diagram of `model`'s test `probs` as a PNG at `path` (its frame only when
    `labels` is None: a stage switched off still writes its declared output)."""
    plt = _pyplot()
    cal = None
    if labels is not None and probs is not None:
        from classifier.metrics.scores import calibration  # scikit-learn: a switched-off stage's frame needs none

        cal = calibration(labels, probs, threshold)
    fig = reliability_figure(cal, model)
    _save(fig, path)
    plt.close(fig)


def write_contact_sheet(path: Path, pictures: Sequence[Path], captions: Sequence[str], title: str) -> None:
    """`pictures` in a grid of up to 6 columns, each with its caption, as a PNG at `path` (a sheet that
    says so when there are none)."""
    from PIL import Image

    plt = _pyplot()
    columns = max(1, min(6, len(pictures)))
    rows = max(1, -(-len(pictures) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, picture, caption in zip(axes.ravel(), pictures, captions, strict=False):
        with Image.open(picture) as image:  # a JPEG prepare wrote
            image.thumbnail((256, 256))
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_title(caption, fontsize=8)
    if not pictures:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def write_figures(
    out: Path, metrics: dict[str, Any], curve: Roc, classes: Sequence[str], histories: Sequence[Path]
) -> None:
    """confusion.png, roc.png and training_curves.png into `out`; `classes` in the model's order.
    (reliability.png is `write_reliability`'s.)"""
    plt = _pyplot()
    confusion = metrics["confusion"]
    figures = {
        "confusion.png": confusion_figure(
            np.array(confusion["rows_actual_columns_predicted"]), confusion["classes"], metrics["test"]["accuracy"]
        ),
        "roc.png": roc_figure(curve, classes),
        "training_curves.png": training_figure(histories),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def read_history(path: Path) -> dict[str, np.ndarray]:
    """A history.csv as {column: values}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    return {key: np.array([float(r[key]) for r in rows]) for key in columns}


def training_series(histories: Sequence[Path]) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """(stage, epochs, history) of each history.csv that exists, in the order given; `epochs` is the
    history's own `epoch` column, 1, 2, ... within the stage (empty for a stage switched off). The
    stage is named as its metrics are (`top`, `finetune`): the history's folder without `train_`."""
    series = []
    for path in histories:
        if path.is_file():
            history = read_history(path)
            series.append((path.parent.name.removeprefix("train_"), history["epoch"].astype(int), history))
    return series
