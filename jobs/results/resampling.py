"""Bootstrap intervals for effect sizes: how much the mean relative gain moves when the seeds and the
tasks it was measured on are drawn again."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

REPLICATES = 2000
LEVEL = 0.95



@dataclass(frozen=True)
class ComparedGroup:
    """The runs (seeds) on each side of one comparison: each run's values per task of `task_type`."""

    task_type: str
    a_runs: Sequence[Mapping[str, float]]
    b_runs: Sequence[Mapping[str, float]]


def bootstrap_interval(
    groups: Sequence[ComparedGroup], *, replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of the mean over groups of (B − A) / A.

    Each replicate draws, with replacement, the tasks of every task type (one draw shared by all groups, as
    the tasks are the same for every cell) and, per group and side, the runs. A run's score is the mean of
    its drawn tasks. Groups whose A is 0 in a replicate are left out of that replicate's mean, as they are
    of the reported mean. None when there is nothing to resample.
    """
    groups = [g for g in groups if g.a_runs and g.b_runs]
    if not groups:
        return None
    tasks_of_type: dict[str, list[str]] = {}
    for group in groups:
        found = tasks_of_type.setdefault(group.task_type, [])
        for run in (*group.a_runs, *group.b_runs):
            found.extend(task for task in run if task not in found)
    for found in tasks_of_type.values():
        found.sort()
    rng = random.Random(seed)
    statistics_drawn: list[float] = []
    for _ in range(replicates):
        drawn = {task_type: rng.choices(tasks, k=len(tasks)) for task_type, tasks in tasks_of_type.items()}
        relatives = []
        for group in groups:
            a = _side_mean(rng.choices(group.a_runs, k=len(group.a_runs)), drawn[group.task_type])
            b = _side_mean(rng.choices(group.b_runs, k=len(group.b_runs)), drawn[group.task_type])
            if a is not None and b is not None and a != 0:
                relatives.append((b - a) / a)
        if relatives:
            statistics_drawn.append(statistics.fmean(relatives))
    if not statistics_drawn:
        return None
    statistics_drawn.sort()
    tail = (1 - level) / 2
    low = statistics_drawn[int(tail * (len(statistics_drawn) - 1))]
    high = statistics_drawn[int(round((1 - tail) * (len(statistics_drawn) - 1)))]
    return low, high


def _side_mean(runs: Sequence[Mapping[str, float]], tasks: Sequence[str]) -> float | None:
    scores = []
    for run in runs:
        values = [run[task] for task in tasks if task in run]
        if values:
            scores.append(statistics.fmean(values))
    return statistics.fmean(scores) if scores else None
