"""The README's MLflow screenshots, taken from a real browser over the offline demo.

    .venv/bin/python docs/screenshots.py                 # builds a demo and an experiment in a temporary folder
    .venv/bin/python docs/screenshots.py --demo demo     # or uses a demo already built (`make demo`)

Needs Chromium (Debian: `apt-get install chromium`) and Playwright's Python package to drive it
(`pip install playwright` in any environment; its own browser download is not needed). Runs the
demo, one `dvc exp run` with another fine-tuning learning rate, starts `mlflow ui` on 127.0.0.1,
and saves docs/mlflow-versions.png (the versions with their key columns), docs/mlflow-compare.png
(two versions compared, with their training curves) and docs/mlflow-registry.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The checkout, for its tests/ and benchmarks/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import demo, tracking
from ops.code import ROOT
from tests.workspace import free_port

DOCS = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: The columns the versions table shows: what a comparison of experiments needs at a glance...
COLUMNS = ["test.accuracy", "test.log_loss", "finetune.val_accuracy", "finetune.learning_rate"]
#: ... and those it hides to make room (nothing to show for this pipeline's versions).
HIDDEN = ["Dataset", "Source"]


def build(where: Path) -> Path:
    """The demo, plus one experiment with twice the fine-tuning learning rate."""
    subprocess.run([sys.executable, "-m", "ops.demo", "--dir", str(where)], cwd=ROOT, check=True)
    env = demo.pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{where.resolve() / 'mlflow.db'}")
    subprocess.run(demo.DVC + ["exp", "run", "-S", "finetune.learning_rate=0.0002"], cwd=where, env=env, check=True)
    return where


def serve(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("mlflow ui did not start")


def shoot(base: str, version_ids: list[str], experiment_id: str) -> None:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags + ["--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 700})
        page.goto(tracking.versions_url(base))
        page.get_by_text("Run Name", exact=False).first.wait_for(timeout=60_000)
        close_assistant(page)
        show_columns(page)
        page.wait_for_timeout(1500)
        page.screenshot(path=DOCS / "mlflow-versions.png")

        page.goto(tracking.versions_url(base) + "&compareRunsMode=CHART")  # the versions' charts, side by side
        page.wait_for_timeout(8000)
        page.screenshot(path=DOCS / "mlflow-compare.png")

        page.goto(f"{base}/#/models/image-classifier?workflowType=machine_learning")
        page.wait_for_timeout(5000)
        page.screenshot(path=DOCS / "mlflow-registry.png")
        browser.close()


def close_assistant(page) -> None:
    """The UI opens a chat side panel, which has nothing to show here: close it if it is there."""
    panel = page.get_by_text("MLflow Assistant")
    if panel.count():
        panel.first.locator("xpath=ancestor::div[.//button][1]").get_by_role("button").last.click()
        page.wait_for_timeout(500)


def show_columns(page) -> None:
    """Tick COLUMNS in the runs table's column selector (the UI then remembers them)."""
    page.get_by_role("button", name="Columns").click()
    for name in COLUMNS + HIDDEN:
        page.get_by_placeholder("Search columns").fill(name)
        page.wait_for_timeout(500)
        page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, help="a demo already built (with an experiment) to use")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.demo or build(Path(tmp) / "demo")
        store = (where / "mlflow.db").resolve()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
        import mlflow

        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(tracking.experiment_name())
        versions = client.search_runs(
            [experiment.experiment_id], "tags.`pipeline.stage` = 'pipeline' and attributes.status = 'FINISHED'"
        )
        port = free_port()
        server = serve(store, port)
        try:
            shoot(f"http://127.0.0.1:{port}", [v.info.run_id for v in versions[:2]], experiment.experiment_id)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {', '.join(str(p) for p in sorted(DOCS.glob('mlflow-*.png')))}")


if __name__ == "__main__":
    main()
