"""`python -m ops.tracking`: log a stage afterwards, find the run of an output (see ops.tracking.cli)."""

from ops import runner
from ops.tracking.cli import main

runner.run(main)
