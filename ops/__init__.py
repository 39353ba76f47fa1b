"""What records and serves results: never a DVC dependency, so editing it re-runs nothing.

It imports the computing package (classifier), never the other way round.

- tracking/: MLflow runs, lineage and the pipeline version; serving/: the registry, the served
  model and its server; team/: the team's stack on one machine.
- demo, predict: tools a user runs. runner: how a stage or tool runs (errors as one line).
- code: the project's code a module runs (dvc.yaml's code deps, what a logged model ships).
"""
