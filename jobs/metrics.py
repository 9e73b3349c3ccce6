"""The metrics an eval stage records, in one place: each one's name, label, task type and scoring.

jobs/ml/evaluate.py computes them under these names; jobs/results/analysis.py averages the ones that score a task
type into the pivot's per-type columns and the effect sizes; `eval.metric` (jobs/specs.py) picks among
the choosable ones. docs/extending.md walks through adding one. Light to import: no pydantic, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stl.jobs.states import TaskType


@dataclass(frozen=True)
class Metric:
    name: str  # as results store it (the `metric` of a result row, the keys of its `metrics`)
    label: str  # as tables and figures name it
    task_type: TaskType
    scoring: str  # how jobs/ml/evaluate.py scores an example, for people reading results
    # Counts as a run's score for its task type: the pivot's per-type columns and --effect average it.
    scores_type: bool = True
    # `eval.metric` may choose it as the one a classification eval reports first.
    choosable: bool = False


ACCURACY = "accuracy"
ACCURACY_NORM = "accuracy_norm"
ACCURACY_GEN = "accuracy_gen"
EXACT_MATCH = "exact_match"
ROUGE_L = "rougeL"

METRICS: tuple[Metric, ...] = (
    Metric(ACCURACY, "accuracy", TaskType.classification, choosable=True,
           scoring="rank classification: the option with the highest summed log-likelihood (T0)"),
    Metric(ACCURACY_NORM, "accuracy per token", TaskType.classification, choosable=True,
           scoring="rank classification by log-likelihood per answer token (lm-eval's acc_norm)"),
    Metric(ACCURACY_GEN, "generated accuracy", TaskType.classification, choosable=True,
           scoring="the greedy answer, credited when it names an accepted answer (InstructDial's run_eval)"),
    # A task whose rows do not all list options: not comparable with the accuracies, so it scores no type.
    Metric(EXACT_MATCH, "exact match", TaskType.classification, scores_type=False,
           scoring="the greedy answer equals an accepted answer"),
    Metric(ROUGE_L, "ROUGE-L", TaskType.generation,
           scoring="ROUGE-L F-measure with stemming against the best accepted answer, 0..1"),
)

# The values `eval.metric` accepts, as a type pydantic checks; a test keeps it equal to the choosable METRICS.
ChoosableMetric = Literal["accuracy", "accuracy_norm", "accuracy_gen"]

# Per task type, the metrics that score it, in order: a run's score for the type is the mean over its tasks
# of the first one recorded (or of the classification accuracy the grid's eval.metric chose).
TYPE_METRICS: dict[str, tuple[str, ...]] = {
    task_type.value: tuple(m.name for m in METRICS if m.task_type is task_type and m.scores_type)
    for task_type in TaskType
}
METRIC_LABELS: dict[str, str] = {metric.name: metric.label for metric in METRICS}


def metric_label(name: str) -> str:
    """How tables and figures name a metric; a name this stl does not know (from a newer one) as it is."""
    return METRIC_LABELS.get(name, name)
