"""The pipeline's stages and the modules they share (see README.md).

Importing the package quietens what is noise in a user's terminal, before TensorFlow or MLflow
load: TensorFlow's C++ start-up notices (oneDNN, CPU instructions, absl) and MLflow's
artifact-transfer progress bars (a value already in the environment wins). When the process is a
stage (`python -m stages.<stage>`), it starts the stage's MLflow worker, which imports MLflow while
the stage imports TensorFlow (see stages/tracking.py). Neither changes what a stage computes.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

if "-m" in sys.orig_argv[:-1]:
    from stages import tracking

    tracking.prestart(sys.orig_argv[sys.orig_argv.index("-m") + 1])
