"""`python -m ops.serving <model-uri>`: serve a registered model over HTTP (see ops.serving.server)."""

from ops import runner
from ops.serving.server import main

runner.run(main)
