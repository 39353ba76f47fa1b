"""The figures evaluate draws and the plots dvc.yaml defines show what they claim: the confusion
matrix with actual classes on the rows in the PNG and in DVC's plot, counts shown, natural class
order, the ROC's AUC and averaging for many classes, and each training stage on its own epoch axis."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from classifier.metrics import figures, reports, scores
from classifier.model import images
from ops.code import ROOT


def dvc_plot(plot_id: str) -> dict:
    """The definition of a top-level plot in dvc.yaml."""
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, dict) and plot_id in entry:
            return entry[plot_id]
    raise KeyError(plot_id)


@pytest.fixture
def known(tmp_path):
    """A test split whose confusion matrix is known: classes sorted as text, as the model has them."""
    classes = ["eight", "five", "four"]
    labels = np.array([0, 0, 1, 2, 2, 2])  # eight, eight, five, four, four, four
    predicted = np.array([2, 0, 1, 2, 2, 0])  # one eight taken for a four, one four for an eight
    probs = np.eye(3)[predicted] * 0.7 + 0.1
    split = images.Split(paths=[f"p{i}.jpg" for i in range(6)], labels=labels, classes=classes)
    metrics = scores.compute_metrics(labels, probs, classes, 0.5)
    reports.write_plot_data(tmp_path, split, probs, 0.5, scores.roc(labels, probs))
    # rows actual four, five, eight; columns predicted four, five, eight
    expected = {("four", "four"): 2, ("four", "eight"): 1, ("five", "five"): 1, ("eight", "four"): 1}
    expected |= {("eight", "eight"): 1}
    return {"out": tmp_path, "metrics": metrics, "expected": expected, "natural": ["four", "five", "eight"]}


def cells(matrix: np.ndarray, classes: list[str]) -> dict[tuple[str, str], int]:
    """{(row class, column class): count} of the non-zero cells."""
    return {(classes[i], classes[j]): int(v) for (i, j), v in np.ndenumerate(matrix) if v}


def test_png_confusion_matrix_has_actual_rows_in_natural_order_with_counts(known):
    confusion = known["metrics"]["confusion"]
    fig = figures.confusion_figure(np.array(confusion["rows_actual_columns_predicted"]), confusion["classes"], 0.5)
    ax = fig.axes[0]
    drawn = np.asarray(ax.images[0].get_array())
    assert ax.get_ylabel() == "actual" and ax.get_xlabel() == "predicted"
    rows = [t.get_text() for t in ax.get_yticklabels()]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert rows == columns == known["natural"]
    assert cells(drawn, rows) == known["expected"]
    # each cell's count is written on it: text at (column j, row i)
    written = {(rows[int(t.get_position()[1])], columns[int(t.get_position()[0])]): int(t.get_text()) for t in ax.texts}
    assert {k: v for k, v in written.items() if v} == known["expected"]


def test_dvc_confusion_plot_has_actual_rows_like_the_png_and_shows_counts(known):
    """Render dvc.yaml's definition with DVC's own renderer over predictions.csv: the y axis (rows)
    is the actual class, and the cells count the same (actual, predicted) pairs as the PNG."""
    from dvc_render import VegaRenderer

    definition = dvc_plot("confusion_matrix")
    ((data_file, y_field),) = definition["y"].items()
    with open(known["out"] / Path(data_file).name, newline="") as f:
        rows = list(csv.DictReader(f))
    renderer = VegaRenderer(rows, "confusion_matrix", template=definition["template"], x=definition["x"], y=y_field)
    spec = renderer.get_filled_template()
    encoding = spec["spec"]["encoding"]
    assert encoding["y"]["field"] == "actual" and encoding["x"]["field"] == "predicted"
    drawn = Counter((r[encoding["y"]["field"]], r[encoding["x"]["field"]]) for r in spec["data"]["values"])
    assert dict(drawn) == known["expected"]
    # the template writes each cell's count (the confusion_normalized one has no count to show)
    text_layers = [layer for layer in spec["spec"]["layer"] if layer.get("mark") == "text"]
    assert text_layers[0]["encoding"]["text"]["condition"]["field"] == "xy_count"


def test_confusion_png_title_is_inside_the_figure(tmp_path):
    """A long class name or a two-class matrix must not push the title out of the picture."""
    for classes in (["cat", "dog"], ["American_Staffordshire_terrier", "Chihuahua", "Staffordshire_bullterrier"]):
        n = len(classes)
        fig = figures.confusion_figure(np.arange(n * n).reshape(n, n), classes, 0.123)
        fig.savefig(tmp_path / "confusion.png")
        renderer = fig.canvas.get_renderer()
        title = fig.axes[0].title.get_window_extent(renderer)
        box = fig.bbox
        assert box.x0 <= title.x0 and title.x1 <= box.x1 and box.y0 <= title.y0 and title.y1 <= box.y1, classes
        for label in fig.axes[0].get_yticklabels() + fig.axes[0].get_xticklabels():
            extent = label.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0, label.get_text()


def test_many_class_roc_title_gives_the_micro_average_and_its_auc():
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 4
    probs = rng.dirichlet(np.ones(4), 60) + np.eye(4)[labels] * rng.uniform(0, 1, (60, 1))
    probs /= probs.sum(axis=1, keepdims=True)
    curve = scores.roc(labels, probs)
    micro = float(np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2))  # area under the drawn curve
    macro = np.mean([scores.roc_auc((labels == i).astype(int), probs[:, i]) for i in range(4)])
    assert curve.auc == pytest.approx(micro)
    assert curve.macro_auc == pytest.approx(macro)
    ax = figures.roc_figure(curve, ["a", "b", "c", "d"]).axes[0]
    assert "micro-average" in ax.get_title()
    assert f"micro-average AUC {micro:.3f}" in ax.get_title() and f"macro-average AUC {macro:.3f}" in ax.get_title()
    assert f"micro-average (AUC {micro:.3f})" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert scores.compute_metrics(labels, probs, list("abcd"), 0.5)["test"]["roc_auc"] == pytest.approx(macro)


def test_two_class_roc_title_names_the_positive_class_and_auc():
    labels = np.array([0, 0, 1, 1])
    probs = scores.as_class_probabilities(np.array([[0.1], [0.6], [0.4], [0.9]]))
    ax = figures.roc_figure(scores.roc(labels, probs), ["cat", "dog"]).axes[0]
    assert "'dog' as positive" in ax.get_title() and "AUC 0.750" in ax.get_title()


def write_history(path: Path, epochs: int, start: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "accuracy", "val_loss", "val_accuracy"])
        for e in range(1, epochs + 1):
            writer.writerow([e, 1 / e, start + 0.01 * e, 1.1 / e, start + 0.005 * e])
    return path


def test_training_curves_draw_each_stage_on_its_own_epoch_axis(tmp_path):
    """Each history.csv counts its own epochs from 1, and so does the figure: a column of panels per
    stage (loss above, accuracy below) whose epochs are 1..n, each stage in its own colour, the
    stages of a row on one y scale, with whole-number epoch ticks. A stage without epochs has no
    column."""
    top = write_history(tmp_path / "train_top" / "history.csv", 30, 0.6)
    fine = write_history(tmp_path / "finetune" / "history.csv", 5, 0.8)
    off = write_history(tmp_path / "baseline" / "history.csv", 0, 0.5)
    series = figures.training_series([top, fine, off, tmp_path / "ensemble" / "history.csv"])
    assert [(stage, epochs.tolist()) for stage, epochs, _ in series] == [
        ("top", list(range(1, 31))),
        ("finetune", [1, 2, 3, 4, 5]),
        ("baseline", []),
    ]
    fig = figures.training_figure([top, fine, off])
    fig.canvas.draw()
    panels = {}
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        (stage,) = {label.split()[0] for label in lines}
        assert set(lines) == {f"{stage} train", f"{stage} validation"}
        assert lines[f"{stage} train"].get_linestyle() == "-" and lines[f"{stage} validation"].get_linestyle() == "--"
        key = ax.get_title().removeprefix(f"{stage}: ")
        assert ax.get_title() == f"{stage}: {key}" and key in ("loss", "accuracy")
        panels[stage, key] = (ax, lines)
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert set(panels) == {(stage, key) for stage in ("top", "finetune") for key in ("loss", "accuracy")}
    for stage, n, path in (("top", 30, top), ("finetune", 5, fine)):
        history = figures.read_history(path)
        for key in ("loss", "accuracy"):
            ax, lines = panels[stage, key]
            for label, column in ((f"{stage} train", key), (f"{stage} validation", f"val_{key}")):
                assert list(lines[label].get_xdata()) == list(range(1, n + 1)), (stage, key)
                assert np.allclose(lines[label].get_ydata(), history[column])
        assert panels[stage, "accuracy"][0].get_xlabel() == f"epoch of {stage}"
    colour = {stage: panels[stage, "loss"][1][f"{stage} train"].get_color() for stage in ("top", "finetune")}
    assert colour["top"] != colour["finetune"]
    for key in ("loss", "accuracy"):
        assert panels["top", key][0].get_ylim() == panels["finetune", key][0].get_ylim(), "one y scale per row"
    loss, accuracy = panels["top", "loss"][0], panels["top", "accuracy"][0]
    assert loss.get_position().y0 > accuracy.get_position().y1, "loss above accuracy"
    top_width = panels["top", "loss"][0].get_position().width
    fine_width = panels["finetune", "loss"][0].get_position().width
    assert fine_width < top_width and fine_width >= 0.3 * top_width, "a short stage stays readable"


def test_a_stage_of_one_epoch_is_drawn_at_epoch_1_with_a_whole_number_tick(tmp_path):
    fig = figures.training_figure([write_history(tmp_path / "finetune" / "history.csv", 1, 0.8)])
    fig.canvas.draw()
    for ax in fig.axes:
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1], [1]]
        assert [line.get_marker() for line in ax.get_lines()] == ["o", "o"], "a point shows"
        assert [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] == [1]


def test_training_curves_without_any_history_say_so(tmp_path):
    off = write_history(tmp_path / "baseline" / "history.csv", 0, 0.5)
    fig = figures.training_figure([off, tmp_path / "train_top" / "history.csv"])
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["no training history"] * 2
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]


def test_dvc_training_plots_draw_each_stage_apart():
    """No DVC plot mixes the head's epochs with fine-tuning's (both count from 1)."""
    entries = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    plots = dict(next(iter(entry.items())) for entry in entries if isinstance(entry, dict))
    training = {name: spec for name, spec in plots.items() if any(f.endswith("history.csv") for f in spec["y"])}
    assert set(training) == {
        "top_accuracy",
        "top_loss",
        "finetune_accuracy",
        "finetune_loss",
        "baseline_accuracy",
        "ensemble_accuracy",
    }
    stage_history = {
        "top": "reports/train_top/history.csv",
        "finetune": "reports/finetune/history.csv",
        "baseline": "reports/baseline/history.csv",
        "ensemble": "reports/ensemble/history.csv",
    }
    for name, spec in training.items():
        assert list(spec["y"]) == [stage_history[name.split("_")[0]]], name
        assert spec["x"] == "epoch"


def test_reliability_diagram_draws_each_bins_accuracy_and_names_the_ece(tmp_path):
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.95, 0.03, 0.02], [0.92, 0.05, 0.03], [0.9, 0.05, 0.05], [0.3, 0.65, 0.05], [0.3, 0.65, 0.05]])
    cal = scores.calibration(labels, probs, 0.5)
    fig = figures.reliability_figure(cal, "fine-tuned model")
    fig.savefig(tmp_path / "reliability.png")
    ax, counts = fig.axes
    assert ax.get_title() == f"fine-tuned model\nreliability on the test split, ECE {cal.ece:.3f}"
    bars = [(round(p.get_x(), 2), round(p.get_height(), 2)) for p in ax.patches]
    assert bars == [(0.6, 0.5), (0.8, 0.0), (0.9, 1.0)], "one bar per bin with predictions: its accuracy"
    assert [round(p.get_height()) for p in counts.patches] == cal.counts.tolist()
    renderer = fig.canvas.get_renderer()
    title = ax.title.get_window_extent(renderer)
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1, "the title fits"


def test_a_switched_off_models_reliability_diagram_says_so(tmp_path):
    figures.write_reliability(tmp_path / "reliability.png", None, None, 0.5, "baseline (switched off)")
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures.reliability_figure(None, "baseline (switched off)")
    assert [t.get_text() for t in fig.axes[0].texts] == ["no model scored"]


def test_the_contact_sheet_shows_each_picture_with_its_caption(tmp_path):
    from PIL import Image

    pictures = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (i * 30, 0, 0)).save(path)
        pictures.append(path)
    captions = [f"#{i + 1} cat -> dog?" for i in range(7)]
    out = tmp_path / "sheet.png"
    figures.write_contact_sheet(out, pictures, captions, "suspects")
    with Image.open(out) as sheet:
        assert sheet.size == (1320, 540), "6 columns, 2 rows"
    figures.write_contact_sheet(tmp_path / "empty.png", [], [], "no suspects")
    with Image.open(tmp_path / "empty.png") as sheet:
        assert sheet.size == (220, 300), "one empty cell saying so"
