"""The grid file: validation with file:line messages, and expansion into runs and shared stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from stl.jobs.errors import GridError
from stl.jobs.grid.parse import GridFile, load_yaml, parse_grid
from stl.jobs.specs import StageKind
from tests.helpers import grid_dict, write_grid


def problems_of(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(GridError) as info:
        parse_grid(path, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_expands_every_combination_and_shares_stages(tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = [0, 1]
    path = tmp_path / "g.yaml"
    import yaml

    path.write_text(yaml.safe_dump(grid))
    expanded = parse_grid(path)
    # model(1) x mtl(2) x instructions(1) x shots(2) x seed(2)
    assert len(expanded.runs) == 8
    mtl_stages = [s for s in expanded.stages.values() if s.kind == StageKind.mtl]
    # one MTL model per seed serves both shots values and both eval tasks
    assert len(mtl_stages) == 2
    users_of_mtl = {sid: sum(sid in run.stages for run in expanded.runs)
                    for sid, spec in expanded.stages.items() if spec.kind == StageKind.mtl}
    assert sorted(users_of_mtl.values()) == [2, 2]
    few_shot = [r for r in expanded.runs if r.cell["shots"] == 4 and r.cell["mtl"] == "in-domain"]
    kinds = [expanded.stages[s].kind for s in few_shot[0].stages]
    assert kinds == [StageKind.mtl, StageKind.finetune, StageKind.eval, StageKind.finetune, StageKind.eval]
    assert len({r.run_id for r in expanded.runs}) == 8


def test_single_values_are_axes_of_one(tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["grid"] = {"model": "tiny:t5", "mtl": "none", "instructions": False, "shots": 0, "seed": 3}
    import yaml

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    expanded = parse_grid(path)
    assert [r.cell for r in expanded.runs] == [
        {"model": "tiny:t5", "mtl": "none", "instructions": False, "shots": 0, "seed": 3}]


def test_string_shots_names_file_line_and_field(tmp_path: Path, demo_data: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(f"""name: g
data: {demo_data}
tasks:
  train: [sentiment_classification]
  eval: [emotion_classification]
grid:
  model: [tiny:bart]
  shots: [0, "16"]
""")
    assert problems_of(path) == [f'{path}:8: grid.shots.1: expected an integer, got "16"']


def test_unknown_task_missing_file_and_bad_arch_are_reported_together(tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["tasks"]["eval"] = ["emotion_classification", "no_such_task"]
    grid["grid"]["model"] = ["tiny:lstm"]
    grid["mixtures"] = {"general": {"data": "missing.jsonl", "tasks": ["x"]}}
    grid["grid"]["mtl"] = ["general"]
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    problems = problems_of(path)
    text = "\n".join(problems)
    assert 'unknown task "no_such_task"' in text
    # no close match: the line lists the data's tasks
    assert ("its tasks are act_classification, answer_generation, emotion_classification, intent_classification, "
            "question_generation, response_generation, sentiment_classification, summarization") in text
    assert "data file not found" in text and "missing.jsonl" in text
    assert "tiny:lstm" in text
    assert all(line.startswith(f"{path}:") for line in problems)


def test_grid_over_the_run_limit_is_refused(tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["grid"]["seed"] = list(range(100))
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert "over the limit of 50" in problems_of(path, max_runs=50)[0]
    assert len(parse_grid(path, max_runs=400).runs) == 400


def test_learning_rate_in_plain_exponent_form_is_a_number(tmp_path: Path, demo_data: Path) -> None:
    path = write_grid(tmp_path, demo_data)
    path.write_text(path.read_text().replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert parse_grid(path).grid.train.learning_rate == pytest.approx(1e-3)


def test_split_axis_comes_from_task_splits(tmp_path: Path, demo_data: Path) -> None:
    grid = grid_dict(demo_data)
    grid["tasks"] = {
        "s1": {"train": ["sentiment_classification"], "eval": ["emotion_classification"]},
        "s2": {"train": ["intent_classification"], "eval": ["summarization"]},
    }
    grid["grid"]["shots"] = [0]
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    expanded = parse_grid(path)
    assert {r.cell["split"] for r in expanded.runs} == {"s1", "s2"}
    assert len(expanded.runs) == 4


def test_few_shot_examples_must_fit_beside_the_eval_examples(tmp_path: Path, demo_data: Path) -> None:
    # The demo tasks have 48 rows each; the first eval.max_examples of a task are scored, so shots are
    # drawn from the rest, and a finetune stage records how many rows it leaves out.
    fits = parse_grid(write_grid(tmp_path, demo_data, grid={**grid_dict(demo_data)["grid"], "shots": [4]},
                                 eval={"max_examples": 44}))
    assert {spec.holdout for spec in fits.stages.values() if spec.kind == StageKind.finetune} == {44}
    assert {spec.holdout for spec in fits.stages.values() if spec.kind != StageKind.finetune} == {0}
    path = write_grid(tmp_path, demo_data, grid={**grid_dict(demo_data)["grid"], "shots": [0, 4, 8, 9]},
                      eval={"max_examples": 44})
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:") and "grid.shots.2: " in problem
    assert ("has 48 rows; the first 44 are its eval examples (eval.max_examples: 44), which leaves 4 to draw "
            "shots: 8 from; lower eval.max_examples to 40 or less, or lower shots (also too small: summarization); "
            "1 larger shots value(s) do not fit either") in problem


def test_a_task_listed_twice_is_refused(tmp_path: Path, demo_data: Path) -> None:
    tasks = {"train": ["sentiment_classification"],
             "eval": ["summarization", "emotion_classification", "summarization"]}
    path = write_grid(tmp_path, demo_data, tasks=tasks)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:") and "tasks.eval: a task is listed more than once: summarization" in problem


def test_train_compile_takes_a_boolean_or_reduce_overhead_and_refuses_the_rest_in_one_line(
    tmp_path: Path, demo_data: Path
) -> None:
    settings = grid_dict(demo_data)["train"]
    path = write_grid(tmp_path, demo_data, train={**settings, "compile": "reduce-overhead"})
    stages = parse_grid(path).stages.values()
    assert {spec.train.compile for spec in stages if spec.kind == StageKind.mtl and spec.train} == {"reduce-overhead"}
    path = write_grid(tmp_path, demo_data, train={**settings, "compile": "fast"})
    line = path.read_text().splitlines().index("  compile: fast") + 1
    assert problems_of(path) == [f"{path}:{line}: train.compile: expected true, false or reduce-overhead, got \"fast\""]


def test_eval_compile_is_a_boolean_carried_into_eval_stages_only(tmp_path: Path, demo_data: Path) -> None:
    settings = grid_dict(demo_data)["eval"]
    path = write_grid(tmp_path, demo_data, eval={**settings, "compile": True})
    stages = parse_grid(path).stages.values()
    assert {spec.eval.compile for spec in stages if spec.eval is not None} == {True}
    assert all(spec.eval is None for spec in stages if spec.kind != StageKind.eval)
    path = write_grid(tmp_path, demo_data, eval={**settings, "compile": 3})
    line = path.read_text().splitlines().index("  compile: 3") + 1
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line}: eval.compile: "), problem


@pytest.mark.parametrize("document", ["README.md", "docs/grid.md"])
def test_the_documented_grid_is_valid_as_it_stands(tmp_path: Path, document: str) -> None:
    from tests.conftest import REPO, instructdial_sample

    sample = instructdial_sample()
    text = (REPO / document).read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    relative = "../shared/data/instructdial/sample_text2text.jsonl"
    assert f"data: {relative}" in block  # relative to the repository's top, where the README says to save it
    path = tmp_path / "readme.yaml"
    path.write_text(block.replace(relative, str(sample)))
    expanded = parse_grid(path)
    assert len(expanded.runs) == 3 * 2 * 2 * 2 * 3
    assert {spec.kind for spec in expanded.stages.values()} == set(StageKind)


def test_sources_and_mixtures_that_cannot_work_are_refused_at_enqueue(tmp_path: Path, demo_data: Path) -> None:
    import yaml

    def problems(**overrides: object) -> list[str]:
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({**grid_dict(demo_data), **overrides}, sort_keys=False))
        return problems_of(path)

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    for empty in ("empty.jsonl", "blank.jsonl"):
        [line] = problems(data=str(tmp_path / empty))
        assert f"data: {tmp_path / empty} holds no rows" in line
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for source, says in ((str(tmp_path / "loop-a"), "cannot use the path"),
                         ("~no-such-user-here/x.jsonl", "cannot use the path"),
                         ("hf:", "is not a Hugging Face dataset"), ("hf:a:b:c", "is not a Hugging Face dataset"),
                         ("hf:foo bar", "is not a Hugging Face dataset"), ("hf:../../etc", "is not a Hugging Face")):
        mixtures = {"general": {"data": source, "tasks": ["act_classification"]}}
        [line] = problems(mixtures=mixtures)
        assert ":" in line.split(" ", 1)[0] and "mixtures.general.data: " in line and says in line, line
    # a held-out task may not be trained on through a mixture of the same data, nor a mixture shadow an mtl value
    leaking = {"general": {"data": str(demo_data), "tasks": ["act_classification", "summarization"]},
               "none": {"data": str(demo_data), "tasks": ["act_classification"]}}
    lines = problems(mixtures=leaking)
    assert any("mixtures.general.tasks: held-out tasks also appear in this mixture: summarization" in line
               for line in lines), lines
    assert any('mixtures.none: "none" is a value of the mtl axis already' in line for line in lines), lines
    # the same task name in another dataset's mixture is another task
    assert parse_grid(write_grid(tmp_path, demo_data, filename="hf.yaml", mixtures={
        "general": {"data": "hf:bigscience/P3:default", "tasks": ["summarization"]}})).runs
    [line] = problems(train={**grid_dict(demo_data)["train"], "checkpoint_every": 10**20})
    assert "train.checkpoint_every" in line
    [line] = problems(data="d" * 300 + ".jsonl")  # stat() itself fails: File name too long
    assert "data: cannot use " in line and "File name too long" in line


def test_a_relative_model_path_is_the_grid_files_so_two_grids_folders_are_two_models(
        tmp_path: Path, demo_data: Path) -> None:
    import yaml

    specs = {}
    for folder in ("study-a", "study-b"):
        (tmp_path / folder / "my-model").mkdir(parents=True)
        (tmp_path / folder / "my-model" / "config.json").write_text("{}")
        grid = grid_dict(demo_data)
        grid["grid"].update(model=["./my-model"], mtl=["none"], shots=[0])
        path = tmp_path / folder / "grid.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        expanded = parse_grid(path)
        [run] = expanded.runs
        assert run.cell["model"] == "./my-model"  # as written, in results
        specs[folder] = expanded.stages[run.stages[0]]
    assert specs["study-a"].model == str(tmp_path / "study-a" / "my-model")
    assert specs["study-a"].stage_id != specs["study-b"].stage_id


def test_a_local_model_folder_is_looked_at_before_anything_is_queued(tmp_path: Path, demo_data: Path) -> None:
    (tmp_path / "weights.bin").write_text("")
    (tmp_path / "empty-folder").mkdir()
    grid = grid_dict(demo_data)
    grid["grid"]["model"] = ["./no-such-model", "./weights.bin", "./empty-folder", "tiny:bart"]
    path = write_grid(tmp_path, demo_data, grid=grid["grid"])
    with pytest.raises(GridError) as caught:
        parse_grid(path)
    lines = caught.value.problems
    assert len(lines) == 3, lines
    assert "grid.model.0: model folder not found: " in lines[0] and str(tmp_path / "no-such-model") in lines[0]
    assert "grid.model.1: " in lines[1] and "is a file; point it at a model folder" in lines[1]
    assert "grid.model.2: " in lines[2] and "holds no config.json" in lines[2]
    assert all(line.startswith(f"{path}:") for line in lines)


PRESETS = sorted((Path(__file__).resolve().parents[1] / "grids").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_in_grids_follows_the_grid_schema(preset: Path) -> None:
    # paper.yaml's data is not on this machine, so enqueue cannot check it whole; the schema it can.
    raw, _ = load_yaml(preset)
    GridFile.model_validate(raw)


def test_the_presets_are_all_found() -> None:
    assert {path.name for path in PRESETS} >= {"example.yaml", "instructdial-sample.yaml", "paper.yaml"}
