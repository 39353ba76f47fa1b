"""A demo folder may come from someone else (the README says it can be copied): its git settings run
nothing when the demo commits there or DVC runs git there."""

from __future__ import annotations

import subprocess

from ops import demo


def test_a_copied_demo_folder_runs_none_of_its_git_hooks_or_fsmonitor(tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    marker = tmp_path / "ran"
    for script, what in ((folder / ".git" / "hooks" / "pre-commit", "hook"), (tmp_path / "monitor", "fsmonitor")):
        script.write_text(f"#!/bin/sh\necho {what} >> {marker}\n")
        script.chmod(0o755)
    subprocess.run(["git", "config", "core.fsmonitor", str(tmp_path / "monitor")], cwd=folder, check=True)
    (folder / "params.yaml").write_text("seed: 1\n")

    demo.commit(folder, "a change")
    # every git process of the pipeline's environment (DVC's among them) reads the same settings
    status = subprocess.run(["git", "status", "--short"], cwd=folder, env=demo.pipeline_env(), text=True, check=True)
    assert status.returncode == 0
    assert not marker.exists(), marker.read_text()
    log = subprocess.run(["git", "log", "--format=%s"], cwd=folder, capture_output=True, text=True, check=True)
    assert log.stdout.split("\n")[0] == "a change"


def test_settings_the_environment_gives_git_are_kept():
    env = demo.safe_git_env({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.name", "GIT_CONFIG_VALUE_0": "x"})
    assert env["GIT_CONFIG_COUNT"] == "3"
    assert (env["GIT_CONFIG_KEY_0"], env["GIT_CONFIG_KEY_1"], env["GIT_CONFIG_KEY_2"]) == (
        "user.name",
        "core.hooksPath",
        "core.fsmonitor",
    )
