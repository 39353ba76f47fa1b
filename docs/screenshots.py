"""The docs' MLflow screenshots, taken as a newcomer sees them: a fresh headless browser (no saved
state) opening the link that `dvc exp run` printed, then one click.

    .venv/bin/python docs/screenshots.py                 # builds a demo and an experiment in a temporary folder
    .venv/bin/python docs/screenshots.py --demo demo     # or uses a demo with an experiment run (else builds it there)

Needs Chromium (Debian: `apt-get install chromium`) and Playwright's Python package to drive it
(`.venv/bin/pip install playwright`; its own browser download is not needed). Runs the demo and one
`dvc exp run` with another fine-tuning learning rate, starts `mlflow ui` on 127.0.0.1, and saves:

- docs/mlflow-versions.png: what the printed link opens, before any click;
- docs/mlflow-compare.png: the same after one click, on the chart icon above the table;
- docs/mlflow-artifacts.png: the Compare page the experiment printed next, models.csv of each version
  side by side (one click);
- docs/mlflow-registry.png: the registered model's versions.

It prints each step and click, and fails when the link's page lacks what it must show.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The checkout, for its tests/ helpers (classifier and ops are installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import demo, tracking
from ops.code import ROOT
from ops.tracking import views
from ops.tracking.version import LOCAL_UI
from tests.workspace import free_port

DOCS = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: What `dvc exp run` prints last: the version it came from and the view comparing the two, then
#: MLflow's Compare page of the two.
PRINTED = re.compile(
    r"compared with the version it came from, .+?: (http\S+)\n.*side by side, figures included: (http\S+)"
)
#: The browser window: a common desktop screen (on a first visit MLflow opens its Assistant panel,
#: which takes 400 pixels on the right).
VIEWPORT = {"width": 1920, "height": 1080}
#: The experiment the screenshots show.
EXPERIMENT = ["finetune.learning_rate=0.0002"]


def build(where: Path) -> None:
    """The demo, plus one experiment, which must print its links."""
    subprocess.run([sys.executable, "-m", "ops.demo", "--dir", str(where)], cwd=ROOT, check=True)
    env = demo.pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{where.resolve() / 'mlflow.db'}")
    sets = [arg for value in EXPERIMENT for arg in ("-S", value)]
    done = subprocess.run(
        demo.DVC + ["exp", "run", *sets], cwd=where, env=env, check=True, capture_output=True, text=True
    )
    if PRINTED.search(done.stdout + done.stderr) is None:
        sys.exit(f"`dvc exp run` printed no links to compare:\n{done.stdout}{done.stderr}")


def newest_links() -> tuple[str, str]:
    """The links the newest version compared with the one it came from printed: its view, and the
    Compare page of the two."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment_name())
    for version in client.search_runs(
        [experiment.experiment_id], "tags.`pipeline.stage` = 'pipeline'", order_by=["attributes.start_time DESC"]
    ):
        saved = experiment.tags.get(views.SHARE_TAG + version.info.run_id)
        if saved:
            pair = client.search_runs([experiment.experiment_id], views.decode(saved)["searchFilter"])
            base = next(run.info.run_id for run in pair if run.info.run_id != version.info.run_id)
            ids = [version.info.run_id, base]
            return (
                views.link(LOCAL_UI, experiment.experiment_id, version.info.run_id),
                views.compare_link(LOCAL_UI, experiment.experiment_id, ids),
            )
    sys.exit("no version of this demo was compared with the one it came from: run `dvc exp run` there first")


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


def shoot(links: tuple[str, str], port: int) -> None:
    from playwright.sync_api import sync_playwright

    view, compare = (link.replace(LOCAL_UI, f"http://127.0.0.1:{port}") for link in links)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags + ["--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport=VIEWPORT)  # a new context: no saved state
        print(f"step 1: open the printed link (0 clicks): {view}")
        page.goto(view)
        page.get_by_text("Run Name", exact=False).first.wait_for(timeout=60_000)
        page.wait_for_timeout(4000)
        page.screenshot(path=DOCS / "mlflow-versions.png")
        for header in ("rank", "test.accuracy", "test.log_loss", "finetune.learning_rate", views.MODELS_TAG):
            if not page.get_by_text(header, exact=True).count():
                sys.exit(f"the link's page shows no {header!r} column")
        print("step 2: click the chart icon above the table (1 click)")
        page.locator("label:has(input[value=CHART])").click()
        page.get_by_text("What differs", exact=False).first.wait_for(timeout=30_000)
        page.wait_for_timeout(5000)
        page.screenshot(path=DOCS / "mlflow-compare.png")
        print(
            f"step 3: open the printed Compare link (0 clicks), then models.csv in its artifacts (1 click): {compare}"
        )
        page.goto(compare)
        page.get_by_text("Artifacts", exact=True).last.wait_for(timeout=60_000)
        page.get_by_text("Artifacts", exact=True).last.scroll_into_view_if_needed()
        page.get_by_text("models.csv", exact=True).first.click()
        page.wait_for_timeout(4000)
        page.get_by_text("Artifacts", exact=True).last.scroll_into_view_if_needed()
        page.screenshot(path=DOCS / "mlflow-artifacts.png")
        browser.close()
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"http://127.0.0.1:{port}/#/models/image-classifier?workflowType=machine_learning")
        page.wait_for_timeout(5000)
        page.screenshot(path=DOCS / "mlflow-registry.png")
        browser.close()


def _has_playwright() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, help="a demo with an experiment run, or where to build one and keep it")
    args = parser.parse_args()
    found = {"playwright": _has_playwright(), "chromium": Path(CHROMIUM).exists()}
    missing = [need for need, there in found.items() if not there]
    if missing:
        sys.exit(
            f"error: {' and '.join(missing)} not found, and nothing was built: `.venv/bin/pip install playwright` "
            "and `apt-get install chromium` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        where = args.demo or Path(tmp) / "demo"
        if not (where / "mlflow.db").is_file():
            build(where)
        store = (where / "mlflow.db").resolve()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
        port = free_port()
        server = serve(store, port)
        try:
            shoot(newest_links(), port)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {', '.join(str(p) for p in sorted(DOCS.glob('mlflow-*.png')))}")


if __name__ == "__main__":
    main()
