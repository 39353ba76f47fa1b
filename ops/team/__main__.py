"""`python -m ops.team up|down|status|add-user`: the team's stack on this machine (see ops.team.cli)."""

from ops import runner
from ops.team.cli import main

runner.run(main)
