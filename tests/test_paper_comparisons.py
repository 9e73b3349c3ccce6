"""The study's two headline comparisons, each one `stl results` command, on synthetic results shaped like
the paper's: general MTL (BART-large -> BART0++) +31 %, in-domain MTL +37.6 %. The other cells carry other
gains, so the numbers come out only if --where keeps exactly the cells the paper compares."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from typer.testing import CliRunner

from stl.cli.main import app
from stl.jobs import keys
from stl.jobs.grid.parse import parse_grid

if TYPE_CHECKING:
    from pathlib import Path

    import redis

MODELS = ["facebook/bart-base", "facebook/bart-large", "yuchenlin/BART0pp"]
TASKS = {"classification": ["relation_classification", "answer_selection"],
         "generation": ["beginswith_controlled_generation", "knowledge_grounded_generation"]}
# In-domain MTL's relative gain per model and task type at the paper's setting (zero-shot, instructions on).
IN_DOMAIN = {"classification": [0.418, 0.80, 0.377], "generation": [0.115, 0.293, 0.253]}  # mean 0.376
GENERAL = {"classification": 0.40, "generation": 0.22}  # BART0++ over BART-large without MTL: mean 0.31


def baseline(task_type: str, task_index: int, seed: int) -> float:
    return (0.30 if task_type == "classification" else 0.10) + 0.04 * seed + 0.05 * task_index


def value(cell: dict[str, Any], task_type: str, task_index: int) -> float:
    model = MODELS.index(cell["model"])
    paper_setting = cell["instructions"] is True and cell["shots"] == 0
    score = baseline(task_type, task_index, cell["seed"])
    if model == 2:  # BART0++ is BART-large after general-purpose MTL
        score *= 1 + (GENERAL[task_type] if paper_setting else 0.9)
    elif model == 0:
        score *= 0.8
    if cell["mtl"] == "in-domain":
        score *= 1 + (IN_DOMAIN[task_type][model] if paper_setting else 0.05)
    return score


@pytest.fixture
def paper_results(tmp_path: Path, stl_env: Path, conn: redis.Redis, demo_data: Path) -> str:
    grid = {"name": "paper-shape", "data": str(demo_data),
            "tasks": {"train": ["sentiment_classification"], "eval": ["emotion_classification"]},
            "grid": {"model": MODELS, "mtl": ["none", "in-domain"], "instructions": [True, False],
                     "shots": [0, 4], "seed": [0, 1, 2]},
            "train": {"max_steps": 2, "batch_size": 2}, "finetune": {"max_steps": 2, "batch_size": 2},
            "eval": {"max_examples": 4}}
    path = tmp_path / "paper-shape.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert CliRunner().invoke(app, ["enqueue", str(path)]).exit_code == 0
    for run in parse_grid(path).runs:
        results = {task: json.dumps({"task": task, "task_type": task_type, "metric": metric, "n": 4, "samples": [],
                                     "value": value(run.cell, task_type, index)})
                   for task_type, metric in (("classification", "accuracy"), ("generation", "rougeL"))
                   for index, task in enumerate(TASKS[task_type])}
        conn.hset(keys.run_results(run.run_id), mapping=results)
        conn.hset(keys.run(run.run_id), "status", "finished")
    return "paper-shape"


def effect(grid: str, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["results", grid, "--json", *args])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout)["effect"])


def test_the_general_mtl_headline_is_one_command(paper_results: str) -> None:
    report = effect(paper_results, "--effect", "model=facebook/bart-large:yuchenlin/BART0pp",
                    "--where", "mtl=none", "--where", "instructions=true", "--where", "shots=0")
    assert report["compared"] == 2 and report["overall"] == pytest.approx(0.31)
    low, high = report["interval_95"]
    assert low < 0.31 < high and high - low < 0.5  # seeds and tasks move it, but not past sense
    unfiltered = effect(paper_results, "--effect", "model=facebook/bart-large:yuchenlin/BART0pp")
    assert unfiltered["compared"] == 16 and unfiltered["overall"] != pytest.approx(0.31, abs=0.05)


def test_the_in_domain_mtl_headline_is_one_command(paper_results: str) -> None:
    report = effect(paper_results, "--effect", "mtl=none:in-domain", "--where", "instructions=true",
                    "--where", "shots=0")
    assert report["compared"] == 6 and report["overall"] == pytest.approx(0.376)
    assert report["interval_95"][0] < 0.376 < report["interval_95"][1]
    unfiltered = effect(paper_results, "--effect", "mtl=none:in-domain")
    assert unfiltered["compared"] == 24 and unfiltered["overall"] < 0.2


def test_where_filters_the_pivot_and_refuses_what_is_not_there(paper_results: str) -> None:
    pivot = json.loads(CliRunner().invoke(app, ["results", paper_results, "--json", "--where",
                                                "model=yuchenlin/BART0pp,facebook/bart-base", "--by", "model"]).stdout)
    assert [row["key"]["model"] for row in pivot["pivot"]["rows"]] == ["facebook/bart-base", "yuchenlin/BART0pp"]
    for bad, said in (("shots=16", "shots has no value '16'"), ("size=0", "unknown axis 'size'"),
                      ("shots", "malformed --where")):
        result = CliRunner().invoke(app, ["results", paper_results, "--where", bad])
        assert result.exit_code == 2 and said in result.stderr, result.output
