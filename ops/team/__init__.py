"""The team's stack on one machine: PostgreSQL (runs, registry, logins), an S3 store (SeaweedFS:
artifacts and the DVC remote) and an MLflow server with logins (`python -m ops.team`)."""
