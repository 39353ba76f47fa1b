"""DVC re-runs exactly what changed, and restores from its cache what it has run before.

Real `dvc repro` and `dvc exp run` on the tiny config, in git repositories. The tests run in file
order on one clone (`clone`, a team member's): each builds on what the previous left.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.workspace import (
    STAGES,
    commit,
    dvc,
    dvc_repro,
    locked_hashes,
    ran_stages,
    restored_stages,
    run,
    set_param,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("team"),
]  # one worker: bob's clone of tests/ops/test_team.py's team


@pytest.fixture(scope="module")
def clone(team_members):
    """bob's clone of the tiny pipeline (tests/teamstack.py), reproduced once with tracking on (to
    the team's MLflow server, while alice reproduced hers), its results committed here."""
    bob = team_members["bob"]
    run(["git", "add", "-A"], bob["path"], bob["env"])
    run(["git", "commit", "-qm", "reproduced", "--allow-empty"], bob["path"], bob["env"])
    return {"path": bob["path"], "env": bob["env"], "ran": ran_stages(bob["log"])}


def exp_run(clone: dict, *sets: str) -> str:
    """`dvc exp run -S ...` in the clone; its output."""
    args = [a for s in sets for a in ("-S", s)]
    return dvc("exp", "run", *args, cwd=clone["path"], env=clone["env"]).stdout


def test_a_clean_run_runs_every_stage_and_records_every_output(clone):
    # That two clean clones write the same bytes is checked by tests/ops/test_team.py: two members at once.
    assert clone["ran"] == STAGES
    assert len(locked_hashes(clone["path"])) == 30


def test_a_comment_in_the_tracking_code_changes_nothing(clone):
    workspace, env = clone["path"], clone["env"]
    tracking = workspace / "ops" / "tracking" / "runs.py"
    tracking.write_text(tracking.read_text() + "\n# a comment\n")
    try:
        assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."
        assert dvc_repro(workspace, env) == []
    finally:
        run(["git", "checkout", "ops/tracking/runs.py"], workspace, env)


def test_a_param_changed_and_back_restores_every_stage_from_the_cache(clone):
    before = locked_hashes(clone["path"])
    changed = exp_run(clone, "finetune.learning_rate=0.02")
    assert ran_stages(changed) == ["finetune", "evaluate", "export", "compare"]
    assert locked_hashes(clone["path"])["models/model.keras"] != before["models/model.keras"]

    back = exp_run(clone, "finetune.learning_rate=0.01")  # the committed value
    assert ran_stages(back) == []
    assert restored_stages(back) == ["finetune", "evaluate", "export", "compare"]
    assert locked_hashes(clone["path"]) == before
    assert json.loads((clone["path"] / "reports/metrics.json").read_text())["test"]["images"] == 12


def test_a_forced_retrain_with_the_same_params_runs_nothing_after_it(clone):
    workspace, env = clone["path"], clone["env"]
    before = locked_hashes(workspace)
    assert dvc_repro(workspace, env, "--force", "--single-item", "train_top") == ["train_top"]
    assert locked_hashes(workspace) == before, "the same bytes"
    assert dvc_repro(workspace, env) == []


def test_a_new_training_seed_keeps_the_split(clone):
    workspace, env = clone["path"], clone["env"]
    manifest = (workspace / "data/prepared/manifest.csv").read_bytes()
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("seed: 7\n", "seed: 8\n", 1))
    assert "seed: 8\ndeterministic" in params.read_text(), "the training seed changed, not data.seed"
    try:
        status = dvc("status", cwd=workspace, env=env).stdout
        assert [s for s in STAGES if re.search(rf"^{s}:", status, re.MULTILINE)] == [
            "featurize",
            "train_top",
            "finetune",
            "baseline",  # switched off in TINY, yet its seed is a dep: switched on, it trains with it
            "ensemble",
            "audit",
            "compare",  # every param is its dep
        ]
        assert dvc_repro(workspace, env, "prepare") == []
        assert (workspace / "data/prepared/manifest.csv").read_bytes() == manifest
    finally:
        run(["git", "checkout", "params.yaml"], workspace, env)


def test_checking_out_an_earlier_commit_restores_its_outputs_from_the_cache(clone):
    workspace, env = clone["path"], clone["env"]
    earlier = run(["git", "rev-parse", "HEAD"], workspace, env).stdout.strip()
    before = locked_hashes(workspace)
    set_param(workspace, "finetune", "learning_rate", 0.02)  # run before (above) or now: from the cache or not
    done = dvc("repro", cwd=workspace, env=env).stdout
    assert ran_stages(done) + restored_stages(done) == ["finetune", "evaluate", "export", "compare"]
    commit(workspace, env, "learning rate 0.02")

    run(["git", "checkout", "-q", earlier], workspace, env)
    done = dvc("repro", cwd=workspace, env=env).stdout
    assert ran_stages(done) == []
    # export (switched off in TINY) wrote the same empty outputs for both commits: nothing to restore
    assert restored_stages(done) == ["finetune", "evaluate", "compare"]
    assert locked_hashes(workspace) == before
    assert dvc("status", cwd=workspace, env=env).stdout.strip() == "Data and pipelines are up to date."
