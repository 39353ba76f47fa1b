"""The registered model: the MLflow pyfunc model that answers (pyfunc), how it is logged, registered
and chosen as champion (registry), and its HTTP server (server, `python -m ops.serving`)."""
