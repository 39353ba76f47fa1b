"""The pipeline's stages and the modules they share (see README.md).

Importing the package quietens what is noise in a user's terminal, before TensorFlow or MLflow
load: TensorFlow's C++ start-up notices (oneDNN, CPU instructions, absl) and MLflow's
artifact-transfer progress bars. A value already in the environment wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
