"""Names of the files in a stage's directory, STL_HOME/stages/<stage-id>/. Light to import."""

from __future__ import annotations

SPEC_FILE = "spec.json"  # the stage's resolved spec, written when a work horse starts it
LOG_FILE = "log.txt"  # everything the stage logged (`stl logs` reads Redis's copy)
CHECKPOINT_DIR = "checkpoint"  # training stages, until they finish (see stl.jobs.ml.train)
MODEL_DIR = "model"  # a finished training stage's model, which child stages start from
DONE_FILE = "done.json"  # the stage finished: its outcome (training) or metrics (eval)
METRICS_FILE = "metrics.json"  # eval stages: per-task metrics with sample predictions
PRUNED_FILE = "pruned.json"  # `stl disk --prune` deleted this stage's model: when, by whom, how much
