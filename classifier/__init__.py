"""The computing package: everything that computes an output of the pipeline.

The stages (stages/) read their arguments and params and call it; dvc.yaml lists, for each stage,
the modules of this package it runs, so an edit here re-runs exactly the stages it can change.
It never imports the stages or ops (which records and serves results).

- config, params: params.yaml, typed and checked (a bad value names its key).
- data/: sources, fetching, archives, folders, pictures, cleaning, the split, the manifest.
- model/: backbones, heads, bottleneck features, training, fine-tuning, the baseline, the
  ensemble, histories, devices and precision.
- metrics/: scores, report files, figures, the models table.
- inference: pictures -> class probabilities, for evaluate, predict and the served model.
- saving: atomic, byte-stable writes; errors: the one error a user can fix.
"""
