"""The axis and metric registries agree with what reads them: a new entry cannot be half-added."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from stl.jobs.axes import AXES, AXIS, EVAL_TOKENS, FEW_SHOT_TOKENS, format_cell, token_key_fields
from stl.jobs.metrics import METRICS, TYPE_METRICS, ChoosableMetric, metric_label
from stl.jobs.specs import EvalConfig, StageSpec, TrainConfig

if TYPE_CHECKING:
    from pytest import MonkeyPatch


def test_eval_metric_accepts_exactly_the_choosable_metrics() -> None:
    choosable = get_args(ChoosableMetric)
    assert tuple(metric.name for metric in METRICS if metric.choosable) == choosable
    assert EvalConfig.model_fields["metric"].default in choosable
    for name in choosable:
        assert EvalConfig(metric=name).metric == name


def test_metric_names_are_unique_and_each_task_type_has_a_score() -> None:
    names = [metric.name for metric in METRICS]
    assert len(set(names)) == len(names)
    assert TYPE_METRICS == {"classification": ("accuracy", "accuracy_norm", "accuracy_gen"),
                            "generation": ("rougeL",)}
    assert metric_label("rougeL") == "ROUGE-L" and metric_label("from-a-newer-stl") == "from-a-newer-stl"


def test_every_axis_has_one_grid_field_with_its_type_and_default() -> None:
    from stl.jobs.grid.parse import Axes

    assert set(Axes.model_fields) == set(AXIS)
    for axis in AXES:
        field = Axes.model_fields[axis.name]
        if axis.required:
            assert field.is_required(), axis.name
        else:
            assert field.default == (None if axis.default is None else list(axis.default)), axis.name
            assert all(type(value) is axis.type for value in axis.default or ()), axis.name
        assert axis.stage_field is None or axis.stage_field in StageSpec.model_fields, axis.name


def test_token_caches_key_on_the_stage_fields_that_decide_their_ids() -> None:
    # A change here changes every cache key: the caches are rebuilt once, which costs only time.
    spec = StageSpec(kind="finetune", model="tiny:bart", seed=3, instructions=False, data="/d.jsonl", tasks=("t",),
                     shots=8)
    assert token_key_fields(spec, FEW_SHOT_TOKENS) == {"shots": 8, "seed": 3, "instructions": False}
    assert token_key_fields(spec, EVAL_TOKENS) == {"instructions": False}


def test_cells_read_as_the_grid_file_spells_them() -> None:
    cell = {"split": "s1", "model": "tiny:bart", "mtl": "none", "instructions": False, "shots": 8, "seed": 1}
    assert format_cell(cell) == "split=s1 model=tiny:bart mtl=none instructions=false shots=8 seed=1"
    assert format_cell(cell, short=True) == "split=s1 tiny:bart mtl=none no-instr 8-shot seed 1"
    assert format_cell({"newer": True}, short=True) == "newer=true"


def test_a_results_row_whose_axes_are_all_in_the_title_shows_just_its_seed() -> None:
    from stl.cli.render import result_table_rows

    row = {"run": "0123456789abcdef", "cell": {"model": "tiny:bart", "seed": 0}, "task": "t",
           "task_type": "generation", "metric": "rougeL", "value": 0.5}
    assert result_table_rows([row], hide={"model"})[0][1] == "seed=0"


def test_an_axis_that_shapes_no_stage_sets_its_field_on_the_stages_it_reaches(monkeypatch: MonkeyPatch) -> None:
    from stl.jobs import axes

    # The example of docs/extending.md: how long the MTL stage trains, and nothing else.
    mtl_steps = axes.Axis("mtl_steps", int, default=None, stage_field="train.max_steps", shapes_stages=False,
                          stage_kinds=frozenset({"mtl"}))
    monkeypatch.setattr(axes, "AXES", (*axes.AXES, mtl_steps))
    common = {"model": "tiny:bart", "data": "/d.jsonl", "tasks": ("t",), "train": TrainConfig()}
    cell = {"model": "tiny:bart", "instructions": False, "mtl_steps": 7, "seed": 0}
    mtl = axes.with_axis_values(StageSpec(kind="mtl", **common), cell)
    finetune = axes.with_axis_values(StageSpec(kind="finetune", shots=4, **common), cell)
    assert (mtl.train.max_steps, mtl.instructions) == (7, False)  # type: ignore[union-attr]
    assert (finetune.train.max_steps, finetune.instructions) == (1000, False)  # type: ignore[union-attr]
    # the stage is the one the grid would have written out by hand: same id
    assert mtl.stage_id == StageSpec(kind="mtl", instructions=False, **{**common, "train": TrainConfig(max_steps=7)}
                                     ).stage_id
    assert axes.stage_value(mtl.model_dump(mode="json"), "train.max_steps") == 7
    assert axes.stage_value(StageSpec(kind="eval", model="m", data="/d", tasks=()), "train.max_steps") is None
