"""`python -m ops.team up|down|status|add-user NAME`: the team's stack on this machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from classifier.errors import StageError
from ops.team.services import add_user, down, service_pid, stop, up
from ops.team.state import DIR_VARIABLE, SERVICES, default_dir, exclusive, load, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help=f"the stack's folder (default ${DIR_VARIABLE} or .team)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="create (the first time) and start the stack; print what members need")
    start.add_argument(
        "--host",
        help="where the MLflow server and S3 listen, fixed when the stack is created (default 127.0.0.1; 0.0.0.0: all)",
    )
    start.add_argument("--public-host", help="the name members reach this machine by (default: from --host)")
    commands.add_parser("down", help="stop the stack; its folder keeps everything")
    commands.add_parser("status", help="which services run")
    user = commands.add_parser("add-user", help="an MLflow login for a member, written to members/NAME.env")
    user.add_argument("name")
    one = commands.add_parser("stop", help="stop one service (`up` starts it again)")
    one.add_argument("service", choices=SERVICES)
    args = parser.parse_args()
    root = args.dir or default_dir()

    if args.command == "up":
        began = time.monotonic()
        started = up(root, args.host, args.public_host)
        print(summary(started))
        print(f"Up in {time.monotonic() - began:.1f} s.")
        return
    stack = load(root)
    if stack is None:
        raise StageError(f"no team stack in {root}: `make team-up` creates one")
    if args.command == "down":
        with exclusive(root):
            stopped = down(stack)
        print(f"Stopped {', '.join(stopped) or 'nothing (nothing was running)'}; everything stays in {root}.")
    elif args.command == "status":
        for service in SERVICES:
            pid = service_pid(stack, service)
            print(f"{service:9} {'running, pid ' + str(pid) if pid else 'stopped'}")
    elif args.command == "add-user":
        path = add_user(stack, args.name)
        print(f"{args.name} can log in: hand over {path} (it holds the password), to `source` in the project.")
    elif args.command == "stop":
        with exclusive(root):
            stopped_one = stop(stack, args.service)
        print(f"{args.service}: {'stopped' if stopped_one else 'was not running'}")
