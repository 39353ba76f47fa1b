"""ops.launch: a command as several processes joined through 127.0.0.1, and a stage run through the
launcher PIPELINE_LAUNCH names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ops import launch
from ops.code import ROOT

#: Each process writes the variables it was given, then process 1 fails while the others wait,
#: taking SIGTERM as JAX does (as a notice, going on).
SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: None)
index = os.environ["KERAS_DISTRIBUTION_PROCESS_ID"]
keys = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "PIPELINE_LAUNCHED")
keys += ("JAX_COORDINATOR_BIND_ADDRESS",)
Path(sys.argv[1], index).write_text(json.dumps({key: os.environ[key] for key in keys}))
if index == sys.argv[2]:
    sys.exit(3)
time.sleep(120)
"""


def test_launch_gives_each_process_its_place_and_stops_the_others_when_one_fails(tmp_path):
    started = time.monotonic()
    code = launch.launch([sys.executable, "-c", SCRIPT, str(tmp_path), "1"], 3, port=41234)
    assert code == 3
    assert time.monotonic() - started < 5 + launch.STOP_SECONDS  # the two others were killed, not waited for
    seen = {int(p.name): json.loads(p.read_text()) for p in tmp_path.iterdir()}
    assert sorted(seen) == [0, 1, 2]
    for values in seen.values():
        assert values == {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:41234",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "3",
            "PIPELINE_LAUNCHED": "1",
            "JAX_COORDINATOR_BIND_ADDRESS": "127.0.0.1:41234",
        }


#: Two processes join through JAX's coordinator; process 0 writes the addresses its port listens on.
COORDINATED = """
import os, sys
from pathlib import Path
import jax
address = os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"]
index = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
jax.distributed.initialize(address, int(os.environ["KERAS_DISTRIBUTION_NUM_PROCESSES"]), index)
if index == 0:
    port = "%04X" % int(address.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(":" + port):
                listening.append(local.rsplit(":", 1)[0])
    Path(sys.argv[1]).write_text(" ".join(listening))
jax.distributed.shutdown()
"""


def test_the_coordinator_listens_on_this_machine_alone(tmp_path):
    """JAX binds its (unauthenticated) coordinator to every interface by default: the launcher's
    processes find it on 127.0.0.1, and nothing else can reach it."""
    code = launch.launch([sys.executable, "-c", COORDINATED, str(tmp_path / "listening")], 2)
    assert code == 0
    # /proc/net's hex: 127.0.0.1 in tcp, as ::ffff:127.0.0.1 in tcp6; every interface would be 0s
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    listening = (tmp_path / "listening").read_text().split()
    assert listening and set(listening) <= loopback, listening


def test_launch_ends_with_0_when_every_process_does_and_asks_for_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "ops.launch", "--processes", "2", "--", sys.executable, "-c", "pass"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "ops.launch", "--processes", "2"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "name the command to run after --" in missing.stderr


def _relaunch(env: dict) -> subprocess.CompletedProcess:
    script = (
        "import os, sys\nsys.argv = ['featurize', 'data/prepared', 'out']\nfrom ops import launch\n"
        "launch.relaunch('featurize')\nprint('tracking', os.environ.get('PIPELINE_TRACKING', 'on'))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "KERAS_DISTRIBUTION_", "SLURM_"))}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=False
    )


def test_a_stage_runs_itself_through_pipeline_launch_once_and_logs_from_process_0_alone():
    # the launcher (here `echo`, which prints what it was asked to run) gets the stage's own command
    through = _relaunch({"PIPELINE_LAUNCH": "echo launched:"})
    assert through.returncode == 0
    assert through.stdout.strip() == f"launched: {sys.executable} -m stages.featurize data/prepared out"
    # a process the launcher started does not launch again; the processes other than 0 log nothing
    first = _relaunch({"PIPELINE_LAUNCH": "echo", "PIPELINE_LAUNCHED": "1"})
    assert first.stdout.strip() == "tracking on"
    others = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"}
    assert _relaunch({"PIPELINE_LAUNCH": "echo", "PIPELINE_LAUNCHED": "1", **others}).stdout.strip() == "tracking off"
    assert _relaunch(others).stdout.strip() == "tracking off"
