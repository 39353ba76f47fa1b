"""The README's demo path, run as written: `make demo` (here `python -m ops.demo` on the tiny
config), then the experiment and the MLflow
link it prints, whose commands the README shows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ops.code import ROOT
from ops.tracking import views
from tests.workspace import (
    base_env,
    free_port,
    ran_stages,
    run,
    wait_until_answering,
)

#: `make demo` with the tiny config: the same code path, in seconds rather than minutes.
DEMO_ON_TINY = """
import sys
from ops import demo
from tests.conftest import TINY
demo.demo_params = lambda cache: (TINY, "Pictures: the tests' tiny generated set.")
sys.argv = ["ops.demo", "--dir", sys.argv[1]]
demo.main()
"""


def readme_section(title: str) -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8").split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo on the tiny config, run to its end: its environment and what it printed."""
    env = base_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo's own store, as `make demo` has
    folder = tmp_path_factory.mktemp("demo") / "demo"
    done = run([sys.executable, "-c", DEMO_ON_TINY, str(folder)], ROOT, env)
    return {"env": env, "printed": done.stdout + done.stderr}


@pytest.mark.slow
def test_the_readme_demo_path_runs_as_written(demo_run, tmp_path):
    env, printed = demo_run["env"], demo_run["printed"]
    section = readme_section("The offline demo")
    assert "make demo" in section

    # The experiment, as the demo prints it and the README shows it, in a shell where nothing is
    # activated: the system's programs alone on PATH, as in a new terminal.
    unactivated = {**env, "PATH": "/usr/bin:/bin"}
    unactivated.pop("VIRTUAL_ENV", None)
    folder, dvc, experiment = re.search(r"an experiment:\s+cd (\S+) && (\S+) (exp run .+)", printed).groups()
    assert (dvc, f"../.venv/bin/dvc {experiment}") == (
        str(Path(sys.executable).parent / "dvc"),
        section.split("cd demo && ")[1].split("  ")[0],
    )
    done = run([dvc, *shlex.split(experiment)], Path(folder), unactivated)
    assert ran_stages(done.stdout) == ["finetune", "evaluate", "export", "compare"]

    # The MLflow UI, as printed, shows both versions (the demo's and the experiment's) in its link.
    mlflow_program, store = re.search(r"MLflow:\s+(\S+) ui --backend-store-uri (\S+)", printed).groups()
    assert mlflow_program == str(Path(sys.executable).parent / "mlflow")
    assert "../.venv/bin/mlflow ui --backend-store-uri" in section
    link = re.search(r"then open (\S+)", printed).group(1)
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen(
            [mlflow_program, "ui", "--backend-store-uri", store, "--port", str(port)],
            cwd=tmp_path,
            env=unactivated,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/", ui, log, timeout=120)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    import mlflow

    # The experiment ends with the link comparing it with the demo's version: the view that link
    # opens finds the two, ranked, shows the param that changed, and is what the demo's link has too.
    compared = re.search(r"compared with the version it came from, (.+?): (\S+)", done.stdout + done.stderr)
    assert compared, done.stderr[-3000:]
    c = mlflow.MlflowClient(store)
    for shown in (compared.group(2), link):
        key = urllib.parse.parse_qs(urllib.parse.urlparse(shown).fragment.split("?", 1)[1])["viewStateShareKey"][0]
        experiment = c.get_experiment(re.search(r"experiments/(\d+)/runs", shown).group(1))
        view = views.decode(experiment.tags[views.SHARE_TAG + key])
        versions = c.search_runs([experiment.experiment_id], view["searchFilter"], order_by=["metrics.`rank` ASC"])
        rates = {version.info.run_name: float(version.data.params["finetune.learning_rate"]) for version in versions}
        assert len(rates) == 2 and 0.0002 in rates.values(), rates
        assert [version.data.metrics["rank"] for version in versions] == [1, 2]
        assert "params.`finetune.learning_rate`" in view["selectedColumns"]
    assert rates[compared.group(1)] != 0.0002, "the version it came from is the demo's"
    # and MLflow's Compare page of the two, where their figures and tables stand side by side
    side = re.search(r"the two side by side, figures included: (\S+)", done.stdout + done.stderr).group(1)
    query = urllib.parse.parse_qs(urllib.parse.urlparse(side).fragment.split("?", 1)[1])
    assert sorted(json.loads(query["runs"][0])) == sorted(version.info.run_id for version in versions)
    for version in versions:
        assert {"models.csv", "evaluate.confusion.png"} <= {a.path for a in c.list_artifacts(version.info.run_id)}
