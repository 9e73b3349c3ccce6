"""grids/paper.yaml: its splits are jobs/grid/splits.py's, each a fair draw, and the file enqueues on an export
that holds its tasks; the README quotes its eval count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs.grid.splits import CLASSIFICATION, LEAVE_TASK_TEST, LEAVE_TASK_TRAIN, paper_splits, type_mix
from stl.jobs.ml.examples import task_family
from tests.instructdial_format import get_options_string, row

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "grids" / "paper.yaml"


def test_paper_yaml_lists_the_splits_jobs_splits_makes() -> None:
    grid = yaml.safe_load(PAPER.read_text())
    assert grid["tasks"] == paper_splits()
    assert grid["tasks"]["split1"] == {"train": list(LEAVE_TASK_TRAIN), "eval": list(LEAVE_TASK_TEST)}


def test_every_split_holds_out_six_tasks_of_split_ones_mix_and_trains_on_the_rest() -> None:
    splits = paper_splits()
    universe = {*LEAVE_TASK_TRAIN, *LEAVE_TASK_TEST}
    held_out_sets = set()
    for name, split in splits.items():
        assert len(split["eval"]) == 6 and len(split["train"]) == 36, name
        assert set(split["train"]) | set(split["eval"]) == universe
        assert type_mix(split["eval"], CLASSIFICATION) == type_mix(LEAVE_TASK_TEST, CLASSIFICATION) == (4, 2)
        assert not {task_family(t) for t in split["train"]} & {task_family(t) for t in split["eval"]}
        held_out_sets.add(frozenset(split["eval"]))
    assert len(held_out_sets) == 3  # three different splits, not one drawn three times


def test_the_grid_reference_quotes_paper_yamls_eval_count() -> None:
    count = yaml.safe_load(PAPER.read_text())["eval"]["max_examples"]
    quoted = re.findall(r"scores (\d+) examples per held-out task", (REPO / "docs" / "grid.md").read_text())
    assert quoted == [str(count)]


def test_paper_yaml_enqueues_on_an_export_that_holds_its_tasks(tmp_path: Path) -> None:
    """Every task, with enough rows for 200 eval examples plus 16 shots, in InstructDial's format."""
    tasks = [*LEAVE_TASK_TRAIN, *LEAVE_TASK_TEST]
    with (tmp_path / "text2text.jsonl").open("w") as export:
        for task in tasks:
            for i in range(216):
                line = row(task, f"turn {i}", get_options_string(["yes", "no"]), "yes")
                if task not in CLASSIFICATION:
                    line["input"] = line["prompt"] = f"[CONTEXT] turn {i} [ENDOFDIALOGUE] [QUESTION] say something"
                    line["output"] = f"reply {i}"
                export.write(json.dumps(line) + "\n")
    grid = PAPER.read_text().replace("data: ../data/instructdial/text2text.jsonl", "data: text2text.jsonl")
    (tmp_path / "paper.yaml").write_text(grid)
    result = CliRunner().invoke(app, ["enqueue", "--dry-run", str(tmp_path / "paper.yaml")])
    assert result.exit_code == 0, result.output
    assert "paper: 216 runs" in result.stdout, result.stdout
