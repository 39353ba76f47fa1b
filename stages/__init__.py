"""The pipeline's ten DVC stages, one entry point each: `python -m stages.<name>` (see dvc.yaml).

Importing the package sets defaults (a value already in the environment wins) that keep noise out
of a user's terminal, before TensorFlow or MLflow load: TensorFlow's C++ start-up notices (oneDNN,
CPU instructions, absl) and MLflow's artifact-transfer progress bars; and it turns off MLflow's
usage telemetry, which calls out to the network. It starts no process and opens no store. None of
this changes what a stage computes.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports to MLflow's makers
