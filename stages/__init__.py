"""The pipeline's stages, one entry point each: `python -m stages.<name>` (see dvc.yaml).

Each runs its main() through ops.runner.run, which also keeps TensorFlow's and MLflow's start-up
noise out of the terminal (ops.runner.QUIET).
"""
