"""The axis and metric registries agree with what reads them: a new entry cannot be half-added."""

from __future__ import annotations

import json
from pathlib import Path
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
        assert axis.stage_field is None or _is_stage_field(axis.stage_field), axis.name


def _is_stage_field(stage_field: str) -> bool:
    """`seed` names a StageSpec field, `train.max_steps` a field of one of its sections."""
    section, _, name = stage_field.rpartition(".")
    if not section:
        return name in StageSpec.model_fields
    if section not in StageSpec.model_fields:
        return False
    models = get_args(StageSpec.model_fields[section].annotation)
    return any(name in getattr(model, "model_fields", {}) for model in models)


def test_a_section_field_is_a_stage_field_and_a_typo_is_not() -> None:
    assert _is_stage_field("seed") and _is_stage_field("train.max_steps") and _is_stage_field("eval.batch_size")
    assert not _is_stage_field("train.max_step") and not _is_stage_field("trian.max_steps")
    assert not _is_stage_field("sed")


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


PRODUCT = Path(__file__).resolve().parents[1]
# The registry and the grid file's schema: the two files a new axis whose values go into stages as written
# (shapes_stages=False) may touch.
AXIS_FILES = {Path("jobs/axes.py"), Path("jobs/grid/parse.py")}


def test_axes_that_shape_no_stage_are_named_only_in_the_registry_and_the_grid_schema() -> None:
    # Code elsewhere that names such an axis handles it by hand: the next one like it would need the same.
    import ast

    names = {axis.name for axis in AXES if not axis.shapes_stages}
    assert names, "the registry has an axis that shapes no stage (instructions)"
    named_elsewhere = []
    for package in ("cli", "jobs", "worker"):
        for path in sorted((PRODUCT / package).rglob("*.py")):
            relative = path.relative_to(PRODUCT)
            if relative in AXIS_FILES:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(relative))):
                if isinstance(node, ast.Constant) and node.value in names:
                    named_elsewhere.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not named_elsewhere, "\n".join(named_elsewhere)


def test_a_new_axis_reaches_runs_stages_status_results_and_disk_from_the_registry_alone(
        tmp_path: Path, demo_data: Path, monkeypatch: MonkeyPatch) -> None:
    """docs/extending.md's worked example, `mtl_steps`, added to the registry only. The grid schema's field
    (its other file) is left out: the cells are given to the expansion directly."""
    import sys

    import yaml

    from stl.cli.render import result_csv_rows
    from stl.jobs import axes
    from stl.jobs.grid.parse import _expand, parse_grid
    from stl.jobs.queue.disk import _describe_stage
    from stl.jobs.results.analysis import build_pivot
    from tests.helpers import grid_dict

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_dict(demo_data), sort_keys=False))
    expanded = parse_grid(path)  # mtl: none and in-domain, shots 0 and 4
    mtl_steps = axes.Axis("mtl_steps", int, default=None, stage_field="train.max_steps", shapes_stages=False,
                          stage_kinds=frozenset({"mtl"}), short=lambda steps: f"{steps} MTL steps",
                          stage_text=lambda _: "")
    extended = (*axes.AXES, mtl_steps)
    for module in [m for name, m in sys.modules.items() if name.startswith("stl.")]:
        if getattr(module, "AXES", None) is axes.AXES:  # every module that reads the registry
            monkeypatch.setattr(module, "AXES", extended)
    monkeypatch.setattr(axes, "AXIS", {axis.name: axis for axis in extended})

    cells = [{**run.cell, "mtl_steps": steps} for run in expanded.runs for steps in (2000, 8000)]
    runs, stages = _expand(expanded.grid, tmp_path, cells)

    assert len({run.run_id for run in runs}) == len(cells) == 2 * len(expanded.runs)
    mtl = {spec.train.max_steps: spec for spec in stages.values() if spec.kind == "mtl"}  # type: ignore[union-attr]
    assert set(mtl) == {2000, 8000}
    assert {spec.train.max_steps for spec in stages.values() if spec.kind == "finetune"} == {6}  # type: ignore[union-attr]
    without_mtl = {run.stages for run in runs if run.cell["mtl"] == "none"}
    assert len(without_mtl) == 2  # one per shots value: the value changes nothing, so nothing trains twice

    assert axes.format_cell(runs[-1].cell, short=True).endswith("4-shot seed 0 8000 MTL steps")
    rows = [{"grid": "g", "run": run.run_id, "cell": run.cell, "task": "t", "task_type": "generation",
             "metric": "rougeL", "value": 0.5} for run in runs]
    assert "mtl_steps" in result_csv_rows(rows)[0]
    assert "mtl_steps" in build_pivot(rows).row_axes
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    (stage_dir / "spec.json").write_text(json.dumps(mtl[8000].model_dump(mode="json")))
    kind, about = _describe_stage(stage_dir)
    assert kind == "mtl" and "8000 steps" in about and "mtl_steps" not in about
