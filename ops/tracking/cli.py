"""`python -m ops.tracking log <stage> [--run-id ID]`: log a stage's saved outputs afterwards;
`python -m ops.tracking find <path>`: the runs that wrote an output."""

from __future__ import annotations

import argparse
import sys

from ops.tracking.lineage import dvc_stages
from ops.tracking.runs import relog
from ops.tracking.store import RERUN_TO_LOG, tracking_uri
from ops.tracking.version import find
from ops.tracking.worker import serve


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Log a stage's saved outputs afterwards, or find the run of an output."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    log_cmd = sub.add_parser("log", help="log the saved outputs of a stage whose logging failed")
    log_cmd.add_argument("stage", choices=[name for name in dvc_stages() if name not in RERUN_TO_LOG])
    log_cmd.add_argument("--run-id", help="the stage's run, as its error message names it (default: a new run)")
    find_cmd = sub.add_parser("find", help="the MLflow runs that wrote an output, found by its DVC hash")
    find_cmd.add_argument("path", help="an output named in dvc.yaml, e.g. models/model.keras")
    find_cmd.add_argument("--md5", help="the output's DVC hash (default: the one dvc.lock records)")
    serve_cmd = sub.add_parser("serve", help="(started by a stage) do the stage's MLflow logging")
    serve_cmd.add_argument("stage")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.stage)
    elif args.command == "log":
        run_id = relog(args.stage, args.run_id)
        print(f"logged {args.stage} to {tracking_uri()} as run {run_id}", file=sys.stderr)
    else:
        print("\n".join(find(args.path, args.md5)))
