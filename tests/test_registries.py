"""The axis and metric registries agree with what reads them: a new entry cannot be half-added."""

from __future__ import annotations

from jobs.metrics import CHOOSABLE_METRICS, METRICS, TYPE_METRICS, metric_label
from jobs.specs import EvalConfig


def test_eval_metric_accepts_exactly_the_choosable_metrics() -> None:
    assert tuple(metric.name for metric in METRICS if metric.choosable) == CHOOSABLE_METRICS
    assert EvalConfig.model_fields["metric"].default in CHOOSABLE_METRICS
    for name in CHOOSABLE_METRICS:
        assert EvalConfig(metric=name).metric == name


def test_metric_names_are_unique_and_each_task_type_has_a_score() -> None:
    names = [metric.name for metric in METRICS]
    assert len(set(names)) == len(names)
    assert TYPE_METRICS == {"classification": ("accuracy", "accuracy_norm", "accuracy_gen"),
                            "generation": ("rougeL",)}
    assert metric_label("rougeL") == "ROUGE-L" and metric_label("from-a-newer-stl") == "from-a-newer-stl"
