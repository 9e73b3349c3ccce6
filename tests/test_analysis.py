from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stl.cli.render_analysis import (
    build_effect_table,
    build_pivot_table,
    effect_summary,
    effect_table_rows,
    effect_to_json,
    format_percent,
    format_stat,
    pivot_table_rows,
    pivot_to_csv,
    pivot_to_json,
    pivot_to_markdown,
    type_columns_only,
)
from stl.jobs.errors import UsageError
from stl.jobs.results.analysis import (
    CellStat,
    Pivot,
    PivotRow,
    build_pivot,
    effect_sizes,
    parse_effect,
)

if TYPE_CHECKING:
    from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
METRIC = {"classification": "accuracy", "generation": "rougeL"}


def make_cell(
    model: str = "tiny:bart",
    mtl: str = "none",
    *,
    instructions: bool = True,
    shots: int = 16,
    seed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    return {"model": model, "mtl": mtl, "instructions": instructions, "shots": shots, "seed": seed, **extra}


def run_id(grid: str, cell: dict[str, Any]) -> str:
    return f"{grid}/" + "/".join(f"{key}={value}" for key, value in cell.items())


def result(
    cell: dict[str, Any],
    task: str,
    value: float,
    *,
    task_type: str = "classification",
    metric: str | None = None,
    grid: str = "g",
) -> dict[str, Any]:
    return {
        "grid": grid,
        "run": run_id(grid, cell),
        "cell": cell,
        "task": task,
        "task_type": task_type,
        "metric": metric or METRIC[task_type],
        "value": value,
    }


def summary(cell: dict[str, Any], status: str = "finished", grid: str = "g") -> dict[str, Any]:
    return {"grid": grid, "run": run_id(grid, cell), "cell": cell, "status": status}


def percent(fraction: float | None) -> float:
    assert fraction is not None
    return fraction * 100


def stat_of(row: PivotRow, column: str) -> CellStat:
    stat = row.cells[column]
    assert stat is not None, f"no {column} result in row {row.key}"
    return stat


def only_row(pivot: Pivot, **key: Any) -> PivotRow:
    matches = [row for row in pivot.rows if dict(zip(pivot.row_axes, row.key, strict=True)) == key]
    assert len(matches) == 1, (key, [row.key for row in pivot.rows])
    return matches[0]


# ----------------------------------------------------------------------------------------------
# Pivot


def test_pivot_mean_std_over_seeds_and_per_type_mean_over_tasks() -> None:
    rows = []
    intent = [0.50, 0.60, 0.70]
    act = [0.30, 0.40, 0.80]
    gen = [0.20, 0.25, 0.30]
    for seed in range(3):
        cell = make_cell(seed=seed)
        rows += [
            result(cell, "intent", intent[seed]),
            result(cell, "act", act[seed]),
            result(cell, "response", gen[seed], task_type="generation"),
        ]
    pivot = build_pivot(rows, [summary(make_cell(seed=seed)) for seed in range(3)])

    assert pivot.row_axes == ("model", "mtl", "instructions", "shots")
    assert [(c.name, c.kind, c.metric) for c in pivot.columns] == [
        ("classification", "type", "accuracy"),
        ("generation", "type", "rougeL"),
        ("act", "task", "accuracy"),
        ("intent", "task", "accuracy"),
        ("response", "task", "rougeL"),
    ]
    (row,) = pivot.rows
    assert row.key == ("tiny:bart", "none", True, 16)
    per_seed = [(i + a) / 2 for i, a in zip(intent, act, strict=True)]
    stat = row.cells["classification"]
    assert stat is not None
    assert stat.mean == pytest.approx(statistics.fmean(per_seed))
    assert stat.std == pytest.approx(statistics.stdev(per_seed))
    assert (stat.n, stat.expected, stat.complete) == (3, 3, True)
    intent_stat = row.cells["intent"]
    assert intent_stat is not None
    assert intent_stat.mean == pytest.approx(0.6)
    assert intent_stat.std == pytest.approx(0.1)
    generation = stat_of(row, "generation")
    assert (generation.mean, generation.std, generation.n) == (pytest.approx(0.25), pytest.approx(0.05), 3)


def test_single_seed_has_zero_std() -> None:
    pivot = build_pivot([result(make_cell(), "intent", 0.4)], [summary(make_cell())])
    stat = pivot.rows[0].cells["intent"]
    assert stat == CellStat(mean=0.4, std=0.0, n=1, expected=1)
    assert format_stat(stat) == "0.400 (n=1)"


def test_running_grid_reports_expected_runs_per_row() -> None:
    runs = [
        summary(make_cell(model=model, seed=seed), status)
        for model in ("tiny:bart", "small:t5")
        for seed, status in enumerate(("finished", "finished", "running"))
    ]
    runs += [summary(make_cell(model="base:t5", seed=seed), "queued") for seed in range(3)]
    rows = [result(make_cell(model="tiny:bart", seed=seed), "intent", 0.5 + seed / 10) for seed in range(3)]
    rows += [result(make_cell(model="small:t5", seed=seed), "intent", 0.4) for seed in range(2)]
    pivot = build_pivot(rows, runs)

    assert [row.key[0] for row in pivot.rows] == ["tiny:bart", "small:t5", "base:t5"]  # grid order
    done, partial, waiting = pivot.rows
    assert format_stat(done.cells["intent"]) == "0.600 ± 0.100 (n=3)"
    assert partial.cells["intent"] == CellStat(mean=0.4, std=0.0, n=2, expected=3)
    assert format_stat(partial.cells["intent"]) == "0.400 ± 0.000 (n=2/3)"
    assert (waiting.expected, waiting.pending, partial.pending, done.pending) == (3, 3, 1, 1)  # seed 2 runs on
    assert waiting.cells == {"classification": None, "intent": None}
    assert pivot_table_rows(pivot)[2][-2:] == ["— (n=0/3)", "— (n=0/3)"]  # waiting, not missing


def test_a_row_whose_runs_all_wait_keeps_the_caption_from_claiming_every_row_has_its_runs() -> None:
    runs = [summary(make_cell(model="tiny:bart", seed=seed)) for seed in range(2)]
    runs += [summary(make_cell(model="tiny:t5", seed=seed), "queued") for seed in range(2)]
    rows = [result(make_cell(model="tiny:bart", seed=seed), "intent", 0.5) for seed in range(2)]
    table = build_pivot_table(build_pivot(rows, runs))
    cells = [[str(cell) for cell in column._cells] for column in table.columns]
    assert cells[-1] == ["0.500 ± 0.000 (n=2)", "— (n=0/2)"]
    assert "each row's 2 runs" not in str(table.caption)
    assert "n=k/m" in str(table.caption)


def test_a_row_with_no_result_after_its_runs_ended_stays_a_plain_dash() -> None:
    runs = [summary(make_cell(model="tiny:bart", seed=0)), summary(make_cell(model="tiny:t5", seed=0), "failed")]
    pivot = build_pivot([result(make_cell(model="tiny:bart", seed=0), "intent", 0.5)], runs)
    assert pivot_table_rows(pivot)[1][-1] == "—"


def test_results_without_run_summaries_count_themselves() -> None:
    rows = [result(make_cell(seed=seed), "intent", 0.5) for seed in range(2)]
    stat = build_pivot(rows, []).rows[0].cells["intent"]
    assert stat is not None and (stat.n, stat.expected, stat.complete) == (2, 2, True)


def test_numeric_axes_sort_numerically_and_strings_keep_grid_order() -> None:
    rows = [
        result(make_cell(model=model, shots=shots), "intent", 0.5)
        for model in ("tiny:bart", "base:t5")
        for shots in (64, 8, 16)
    ]
    pivot = build_pivot(rows, [])
    assert [row.key[::3] for row in pivot.rows] == [
        ("tiny:bart", 8),
        ("tiny:bart", 16),
        ("tiny:bart", 64),
        ("base:t5", 8),
        ("base:t5", 16),
        ("base:t5", 64),
    ]


def test_several_grids_merge_with_grid_as_first_axis() -> None:
    rows = [result(make_cell(seed=seed), "intent", 0.4, grid="baseline") for seed in range(2)]
    rows += [result(make_cell(seed=seed), "intent", 0.6, grid="rerun") for seed in range(2)]
    rows += [result(make_cell(mtl="in-domain"), "intent", 0.7, grid="rerun")]
    pivot = build_pivot(rows, [])

    assert pivot.row_axes == ("grid", "model", "mtl", "instructions", "shots")
    same_cell = {"model": "tiny:bart", "mtl": "none", "instructions": True, "shots": 16}
    assert stat_of(only_row(pivot, grid="baseline", **same_cell), "intent").mean == pytest.approx(0.4)
    assert stat_of(only_row(pivot, grid="rerun", **same_cell), "intent").mean == pytest.approx(0.6)
    assert len(pivot.rows) == 3

    pooled = build_pivot(rows, [], by=["mtl"])
    assert pooled.row_axes == ("mtl",)
    none_row = only_row(pooled, mtl="none")
    pooled_stat = stat_of(none_row, "intent")
    assert pooled_stat.mean == pytest.approx(0.5)
    assert pooled_stat.std == pytest.approx(statistics.stdev([0.4, 0.4, 0.6, 0.6]))
    assert (pooled_stat.n, pooled_stat.expected) == (4, 4)


def test_by_picks_and_orders_row_axes() -> None:
    rows = [
        result(make_cell(model=model, mtl=mtl, seed=seed), "intent", value)
        for model, mtl, value in (
            ("tiny:bart", "none", 0.2),
            ("tiny:bart", "in-domain", 0.4),
            ("small:t5", "none", 0.6),
            ("small:t5", "in-domain", 0.8),
        )
        for seed in range(2)
    ]
    pivot = build_pivot(rows, [], by=["mtl", "model"])
    assert pivot.row_axes == ("mtl", "model")
    assert [row.key for row in pivot.rows] == [
        ("none", "tiny:bart"),
        ("none", "small:t5"),
        ("in-domain", "tiny:bart"),
        ("in-domain", "small:t5"),
    ]
    per_model = build_pivot(rows, [], by=["model"])
    assert [(row.key, stat_of(row, "intent").n) for row in per_model.rows] == [
        (("tiny:bart",), 4),
        (("small:t5",), 4),
    ]
    assert build_pivot(rows, [], by=[]).row_axes == ("model", "mtl", "instructions", "shots")
    per_seed = build_pivot(rows, [], by=["seed"])
    assert [row.key for row in per_seed.rows] == [(0,), (1,)]


def test_unknown_or_repeated_by_axis_is_a_usage_error() -> None:
    rows = [result(make_cell(), "intent", 0.5)]
    with pytest.raises(UsageError, match=r"unknown axis 'modle'.*valid axes: grid, model, mtl, instructions"):
        build_pivot(rows, [], by=["modle"])
    with pytest.raises(UsageError, match="twice"):
        build_pivot(rows, [], by=["model", "model"])


def test_optional_split_axis_and_metric_columns() -> None:
    cell_a = make_cell(split="a")
    cell_b = make_cell(split="b")
    rows = [
        result(cell_a, "response", 0.3, task_type="generation"),
        result(cell_a, "response", 0.1, task_type="generation", metric="exact_match"),
        result(cell_a, "slot_fill", 0.5, task_type="generation", metric="exact_match"),
        result(cell_b, "response", 0.5, task_type="generation"),
    ]
    pivot = build_pivot(rows, [])
    assert pivot.row_axes == ("model", "mtl", "instructions", "shots", "split")
    assert [c.name for c in pivot.columns] == [
        "generation",
        "response (exact match)",
        "response (ROUGE-L)",
        "slot_fill",
    ]
    row_a = only_row(pivot, model="tiny:bart", mtl="none", instructions=True, shots=16, split="a")
    # Only ROUGE-L makes the generation score; exact match stays a column of its own.
    assert stat_of(row_a, "generation").mean == pytest.approx(0.3)
    assert stat_of(row_a, "slot_fill").mean == pytest.approx(0.5)
    row_b = only_row(pivot, model="tiny:bart", mtl="none", instructions=True, shots=16, split="b")
    assert row_b.cells["slot_fill"] is None


def test_reevaluated_task_keeps_the_latest_value() -> None:
    rows = [result(make_cell(), "intent", 0.1), result(make_cell(), "intent", 0.9)]
    assert build_pivot(rows, []).rows[0].cells["intent"] == CellStat(mean=0.9, std=0.0, n=1, expected=1)


# ----------------------------------------------------------------------------------------------
# Rendering


def small_pivot() -> Pivot:
    rows = [result(make_cell(model="tiny:bart", seed=s), "intent", v) for s, v in enumerate((0.5, 0.7))]
    rows += [
        result(make_cell(model="tiny:bart", seed=s), "resp", 0.2, task_type="generation") for s in range(2)
    ]
    rows += [result(make_cell(model="small|t5", seed=0), "intent", 0.25)]
    runs = [summary(make_cell(model=model, seed=s)) for model in ("tiny:bart", "small|t5") for s in range(2)]
    return build_pivot(rows, runs, by=["model", "instructions"])


def test_rich_table_cells() -> None:
    table = build_pivot_table(small_pivot(), title="g")
    headers = [str(column.header) for column in table.columns]
    assert headers == [  # instructions is true in every row: the title says so once
        "model",
        "classification\n(mean accuracy)",
        "generation\n(mean ROUGE-L)",
        "intent\n(accuracy)",
        "resp\n(ROUGE-L)",
    ]
    assert str(table.title) == "g: instructions = true"
    cells = [[str(cell) for cell in column._cells] for column in table.columns]
    assert cells[0] == ["tiny:bart", "small|t5"]
    assert cells[1] == ["0.600 ± 0.141 (n=2)", "0.250 (n=1/2)"]
    assert cells[2] == ["0.200 ± 0.000 (n=2)", "—"]
    assert "n=k/m: k of the row's m runs have this result" in str(table.caption)


def test_rich_table_fits_the_terminal() -> None:
    rows = [result(make_cell(model=m, seed=s), task, 0.5 + s / 10, task_type=kind)
            for m in ("tiny:bart", "tiny:t5") for s in range(3)
            for task, kind in (("intent_present_classification", "classification"),
                               ("knowledge_grounded_generation", "generation"))]
    runs = [summary(make_cell(model=m, seed=s)) for m in ("tiny:bart", "tiny:t5") for s in range(3)]
    pivot = build_pivot(rows, runs, by=["model"])
    wide = build_pivot_table(pivot, width=200)
    assert len(wide.columns) == 5 and table_cells(wide)[1] == ["0.600 ± 0.100"] * 2  # every n is 3
    assert str(wide.caption).startswith("mean ± sample std over each row's 3 runs (one per seed)")
    by_seed = build_pivot_table(build_pivot(rows, runs, by=["seed"]), width=200)
    assert str(by_seed.caption).startswith("mean ± sample std over each row's 2 runs (one per model)")
    narrow = build_pivot_table(pivot, width=80)
    assert [str(c.header) for c in narrow.columns] == ["model", "classification\n(mean accuracy)",
                                                       "generation\n(mean ROUGE-L)"]
    assert "per-task columns hidden at this width" in str(narrow.caption)
    one_row = build_pivot_table(build_pivot(rows[:2], runs[:1], by=["model", "instructions"]), width=80)
    assert [str(c.header) for c in one_row.columns][:2] == ["model", "instructions"] and one_row.title is None


def test_one_run_per_row_shows_no_spread() -> None:
    rows = [result(make_cell(model=m), "intent", 0.5) for m in ("tiny:bart", "tiny:t5")]
    table = build_pivot_table(build_pivot(rows, [summary(make_cell(model=m)) for m in ("tiny:bart", "tiny:t5")]))
    assert str(table.caption) == "one run per row: no spread to report"
    assert table_cells(table)[1] == ["0.500", "0.500"]


def table_cells(table: Table) -> list[list[str]]:
    return [[str(cell) for cell in column._cells] for column in table.columns]


def test_markdown_table() -> None:
    assert pivot_to_markdown(small_pivot()) == (
        "| model | instructions | classification (mean accuracy) | generation (mean ROUGE-L) "
        "| intent (accuracy) | resp (ROUGE-L) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |\n"
        "| tiny:bart | true | 0.600 ± 0.141 (n=2) | 0.200 ± 0.000 (n=2) | 0.600 ± 0.141 (n=2) "
        "| 0.200 ± 0.000 (n=2) |\n"
        "| small\\|t5 | true | 0.250 (n=1/2) | — | 0.250 (n=1/2) | — |\n"
    )


def test_csv_output() -> None:
    parsed = list(csv.DictReader(io.StringIO(pivot_to_csv(small_pivot()))))
    assert list(parsed[0])[:5] == [
        "model",
        "instructions",
        "runs",
        "classification mean",
        "classification std",
    ]
    assert parsed[0]["model"] == "tiny:bart" and parsed[0]["instructions"] == "true"
    assert float(parsed[0]["intent mean"]) == pytest.approx(0.6)
    assert parsed[1]["runs"] == "2" and parsed[1]["intent n"] == "1"
    assert parsed[1]["resp mean"] == "" and parsed[1]["resp n"] == "0"


def test_json_output_round_trips() -> None:
    data = json.loads(json.dumps(pivot_to_json(small_pivot())))
    assert data["row_axes"] == ["model", "instructions"]
    assert data["columns"][0] == {
        "name": "classification",
        "kind": "type",
        "metric": "accuracy",
        "task_type": "classification",
    }
    second = data["rows"][1]
    assert second["key"] == {"model": "small|t5", "instructions": True}
    assert second["runs"] == 2
    assert second["cells"]["resp"] is None
    assert second["cells"]["intent"] == {"mean": 0.25, "std": 0.0, "n": 1, "expected": 2}


def test_type_columns_only_drops_task_columns() -> None:
    compact = type_columns_only(small_pivot())
    assert [c.name for c in compact.columns] == ["classification", "generation"]
    assert list(pivot_to_json(compact)["rows"][0]["cells"]) == ["classification", "generation"]


# ----------------------------------------------------------------------------------------------
# Effect sizes


def study_rows(gains: dict[str, list[float]], *, a: str, b: str) -> list[dict[str, Any]]:
    """Rows where B = A × (1 + gain) for each model size and task type; A varies by seed and task."""
    rows = []
    models = ["small", "base", "large"]
    for task_type, per_model in gains.items():
        for model, gain in zip(models, per_model, strict=True):
            for seed in range(3):
                for task_index in range(2):
                    baseline = 0.2 + 0.05 * seed + 0.1 * task_index + 0.03 * models.index(model)
                    task = f"{task_type[:3]}{task_index}"
                    rows.append(result(make_cell(model, a, seed=seed), task, baseline, task_type=task_type))
                    rows.append(
                        result(
                            make_cell(model, b, seed=seed), task, baseline * (1 + gain), task_type=task_type
                        )
                    )
    return rows


def test_the_effect_averages_per_type_gains_as_the_paper_does_31_percent_from_its_gains() -> None:
    # The rows are built from per-type gains shaped like the paper's: this checks the averaging, not the study.
    rows = study_rows({"classification": [0.571] * 3, "generation": [0.05] * 3}, a="none", b="general")
    report = effect_sizes(rows, axis="mtl", a="none", b="general")

    assert report.n_compared == 6
    assert percent(report.by_type["classification"]) == pytest.approx(57.1, abs=0.05)
    assert percent(report.by_type["generation"]) == pytest.approx(5.0, abs=0.05)
    assert percent(report.overall) == pytest.approx(31.05, abs=0.05)
    assert effect_summary(report)[:2] == [("mean classification", "+57.1 %"), ("mean generation", "+5.0 %")]
    assert effect_summary(report)[2][1].startswith("+31.1 % (95 % CI ") and "6 compared" in effect_summary(report)[2][1]
    assert report.interval is not None and report.interval[0] < report.overall < report.interval[1]


def test_the_effect_averages_per_model_and_type_gains_37_6_percent_from_its_gains() -> None:
    gains = {"classification": [0.418, 0.80, 0.377], "generation": [0.115, 0.293, 0.253]}
    report = effect_sizes(study_rows(gains, a="none", b="in-domain"), axis="mtl", a="none", b="in-domain")

    assert percent(report.overall) == pytest.approx(37.6, abs=0.05)
    relatives = {(c.combo[0][1], c.task_type): c.relative for c in report.comparisons}
    assert relatives[("base", "classification")] == pytest.approx(0.80)
    assert relatives[("large", "generation")] == pytest.approx(0.253)
    assert effect_summary(report)[:2] == [("mean classification", "+53.2 %"), ("mean generation", "+22.0 %")]
    assert effect_summary(report)[2][1].startswith("+37.6 % (95 % CI ")


def test_effect_skips_zero_baselines_and_missing_sides() -> None:
    rows = study_rows({"classification": [0.5, 0.5, 0.5]}, a="none", b="in-domain")
    rows += [result(make_cell("xl", "none", seed=s), "cla0", 0.0) for s in range(2)]
    rows += [result(make_cell("xl", "in-domain", seed=s), "cla0", 0.3) for s in range(2)]
    rows += [result(make_cell("xxl", "none"), "cla0", 0.3)]  # B never ran
    report = effect_sizes(rows, axis="mtl", a="none", b="in-domain")

    assert report.n_compared == 3
    assert report.skipped_zero_baseline == 1
    assert report.skipped_missing == 1
    assert report.overall == pytest.approx(0.5)
    table_rows = effect_table_rows(report)
    assert table_rows[3] == [
        "xl",
        "true",
        "16",
        "classification",
        "0.000 (n=2)",
        "0.300 (n=2)",
        "skipped: A is 0",
    ]
    assert table_rows[4][-3:] == ["0.300 (n=1)", "—", "skipped: no mtl=in-domain results"]
    table = build_effect_table(report)
    assert "1 with A = 0" in str(table.caption) and "1 missing" in str(table.caption), table.caption
    assert [str(c.header) for c in table.columns][:2] == ["model", "task type"]  # the others hold one value
    assert str(table.title).endswith("\ninstructions = true, shots = 16")
    last_column = [str(cell) for cell in table.columns[-1]._cells]
    assert last_column[-3:-1] == ["skipped: no mtl=in-domain results", "+50.0 %"]
    assert last_column[-1].startswith("+50.0 % (95 % CI ") and last_column[-1].endswith(", 3 compared)")
    assert [str(cell) for cell in table.columns[-4]._cells][-2:] == ["mean classification", "mean overall"]
    assert json.loads(json.dumps(effect_to_json(report)))["skipped_zero_baseline"] == 1


def test_effect_across_grids_and_on_bool_axes() -> None:
    rows = [result(make_cell(instructions=False, seed=s), "cla0", 0.4, grid="g1") for s in range(2)]
    rows += [result(make_cell(instructions=True, seed=s), "cla0", 0.5, grid="g2") for s in range(2)]
    report = effect_sizes(rows, axis="instructions", a="false", b="true")
    assert report.overall == pytest.approx(0.25)
    grids = effect_sizes(
        rows + [result(make_cell(instructions=False), "cla0", 0.8, grid="g2")], axis="grid", a="g1", b="g2"
    )
    # instructions=false: 0.4 in g1 -> 0.8 in g2; instructions=true only ran in g2.
    assert [c.relative for c in grids.comparisons] == [pytest.approx(1.0), None]
    assert grids.skipped_missing == 1


@pytest.mark.parametrize("text", ["mtl", "mtl=", "=none:general", "mtl=none", "mtl=none:", "mtl=:general"])
def test_malformed_effect_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="AXIS=A:B"):
        parse_effect(text)


def test_parse_effect_checks_axis_and_values_against_results() -> None:
    rows = study_rows({"classification": [0.5] * 3}, a="none", b="in-domain")
    assert parse_effect("mtl=none:in-domain", rows) == ("mtl", "none", "in-domain")
    assert parse_effect(" mtl = none : in-domain ") == ("mtl", "none", "in-domain")
    axis, a, b = parse_effect("instructions=false:true")
    assert (axis, a, b) == ("instructions", "false", "true")
    with pytest.raises(UsageError, match=r"unknown axis 'mlt'.*valid axes: grid, model, mtl"):
        parse_effect("mlt=none:in-domain", rows)
    with pytest.raises(UsageError, match=r"no value 'general'.*values in these results: in-domain, none"):
        parse_effect("mtl=none:general", rows)
    with pytest.raises(UsageError, match="itself"):
        parse_effect("mtl=none:none")
    with pytest.raises(UsageError, match="no value 'general'"):
        effect_sizes(rows, axis="mtl", a="none", b="general")
    with pytest.raises(UsageError, match=r"'none:in-domain:x' does not split into two values of mtl at any ':'"):
        parse_effect("mtl=none:in-domain:x", rows)
    with pytest.raises(UsageError, match="names more than one axis: one effect at a time"):
        parse_effect("shots=0:4,mtl=none:in-domain", rows)


def test_parse_effect_splits_values_that_contain_colons() -> None:
    rows = [result(make_cell(model=model), "cla0", 0.5) for model in ("tiny:bart", "small:t5", "t5")]
    assert parse_effect("model=tiny:bart:small:t5", rows) == ("model", "tiny:bart", "small:t5")
    assert parse_effect("model=t5:tiny:bart", rows) == ("model", "t5", "tiny:bart")
    with pytest.raises(UsageError, match="ambiguous"):
        parse_effect("model=tiny:bart:small:t5")


def test_format_percent_rounds_half_up() -> None:
    assert format_percent(0.3105) == "+31.1 %"
    assert format_percent(0.31049999999999994) == "+31.1 %"
    assert format_percent(-0.049) == "-4.9 %"
    assert format_percent(0.0) == "+0.0 %"
    assert format_percent(None) == "—"


def test_analysis_and_plots_import_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, stl.jobs.results.analysis, stl.jobs.results.plots, stl.jobs.queue.notify\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
