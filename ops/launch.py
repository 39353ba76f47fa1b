"""A stage as several processes: one machine's (`python -m ops.launch`), or a cluster's (Slurm's `srun`).

featurize, finetune, baseline and evaluate can run as several processes, on one machine or many, with
Keras on JAX: every process trains on its part of each batch and ends with the same weights, and
process 0 writes the outputs and logs to MLflow. DVC still runs the stage's one command: with
PIPELINE_LAUNCH set (say `srun`, in a Slurm allocation), the stage runs itself through that launcher
(`relaunch`), waits for its processes and ends as they do.

    python -m ops.launch --processes 2 -- python -m stages.finetune ...

starts the command as processes 0..N-1 on this machine, with Keras's variables
(KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID) naming a coordinator on 127.0.0.1;
if one fails, the others are stopped. `PIPELINE_LAUNCH="python -m ops.launch --processes 2 --" dvc
repro` does the same through DVC (the tests run it so). docs/gpus.md shows a Slurm job.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from classifier.model import backend
from ops import runner

log = logging.getLogger(__name__)

#: The launcher a stage that can run as several processes runs itself through (a command line).
LAUNCH = "PIPELINE_LAUNCH"
#: Set in the processes a launcher started, so that they do not launch again.
LAUNCHED = "PIPELINE_LAUNCHED"


def relaunch(stage: str) -> None:
    """Called first by a stage that can run as several processes. Where PIPELINE_LAUNCH is set and
    this process was not launched by it, run the stage through it and exit as it does. In the
    launched processes other than 0, turn MLflow logging off: process 0 logs for all."""
    launcher = os.environ.get(LAUNCH, "").strip()
    if launcher and not os.environ.get(LAUNCHED):
        command = [*shlex.split(launcher), sys.executable, "-m", f"stages.{stage}", *sys.argv[1:]]
        log.info("%s: running %s", LAUNCH, shlex.join(command))
        launcher_process = subprocess.Popen(command, env={**os.environ, LAUNCHED: "1"})
        try:
            code = launcher_process.wait()
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the launcher stops its processes
            launcher_process.terminate()
            try:
                launcher_process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher_process.kill()
            raise
        sys.exit(code)
    if not backend.cluster().writes:
        os.environ["PIPELINE_TRACKING"] = "off"


#: Seconds the other processes have to stop once one has failed, after which they are killed.
STOP_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], processes: int, port: int | None = None) -> int:
    """Run `command` as `processes` processes joined through a coordinator on 127.0.0.1:`port`
    (a free one by default); the exit code of the first to fail, else 0."""
    address = f"127.0.0.1:{port or free_port()}"
    children = []
    for index in range(processes):
        env = {
            **os.environ,
            LAUNCHED: "1",
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": address,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes),
            "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
            # JAX's coordinator binds to every interface unless told: here it serves this machine alone.
            "JAX_COORDINATOR_BIND_ADDRESS": address,
        }
        children.append(subprocess.Popen(command, env=env))
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()  # JAX takes SIGTERM as a notice of preemption and goes on
                child.wait()
    if failed:
        log.error("a process failed (exit %d): the others were stopped", failed[0])
        return failed[0]
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="how many processes to start (2 or more)")
    parser.add_argument("--port", type=int, help="the coordinator's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --, e.g. -- python -m stages.finetune ...")
    if args.processes < 1:
        parser.error(f"--processes must be 1 or more, not {args.processes}")
    sys.exit(launch(command, args.processes, args.port))


if __name__ == "__main__":
    runner.run(main)
