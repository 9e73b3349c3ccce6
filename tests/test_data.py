"""Reading InstructDial-format data, sampling (k-shot, mixture, batches) and the demo dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from stl.jobs.errors import DataError
from stl.jobs.ml import data
from stl.jobs.ml.data import Mixture, cycle_shuffled, few_shot_examples, k_shot, length_grouped_batches
from stl.jobs.ml.data_cache import INDEX_CACHE_DIR, load_token_lists, save_token_lists, token_cache_path
from stl.jobs.ml.demo_dataset import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS, write_demo_dataset
from stl.jobs.ml.examples import (
    Example,
    answer_candidates,
    correct_options,
    example_from_row,
    is_correct,
    normalize_answer,
    parse_options,
    source_text,
)
from stl.jobs.ml.sources import read_examples, source_fingerprint, task_catalog
from stl.jobs.specs import TaskType

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
INSTRUCTDIAL = REPO.parent / "shared" / "data" / "instructdial"


def row(task: str, text: str, output: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": task,
        "prompt": f"Instruction: do {task}.\nInput: {text}",
        "input": text,
        "output": output,
        "all_outputs": [output],
        **extra,
    }


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def sized(tmp_path: Path) -> Path:
    """Three tasks with 100, 10 and 1000 rows (interleaved), outputs numbered per task."""
    rows = [row("mid", f"m {i}", f"mid-{i}") for i in range(100)]
    rows += [row("small", f"s {i}", f"small-{i}") for i in range(10)]
    rows += [row("big", f"b {i}", f"big-{i}") for i in range(1000)]
    rows.sort(key=lambda r: (int(r["output"].split("-")[1]) % 7, r["output"]))
    return write_rows(tmp_path / "sized.jsonl", rows)


def test_options_are_parsed_like_instructdial() -> None:
    assert parse_options("[CONTEXT] hi [QUESTION] ok? [OPTIONS] yes||||no") == ("yes", "no")
    assert parse_options("[OPTIONS] 0||||1||||all correct [QUESTION] Which one") == ("0", "1", "all correct")
    assert parse_options("classes:  [OPTIONS]  none of the above||||yes") == ("none of the above", "yes")
    assert parse_options("[CONTEXT] no options here") is None
    assert parse_options("[OPTIONS] ||||") is None


def test_indexed_options_are_answered_by_index() -> None:
    options = ("0: offerbook", "1: recommend", "2: inform")
    indexed = Example("act", "p", "i", "2", ("2",), options)
    assert answer_candidates(indexed) == ("0", "1", "2")
    by_name = Example("act", "p", "i", "inform", ("inform",), ("inform", "greet"))
    assert answer_candidates(by_name) == ("inform", "greet")
    assert answer_candidates(Example("gen", "p", "i", "x", ("x",), None)) == ()
    assert normalize_answer("  Yes \n please ") == "yes please"


def test_instructions_switch_picks_prompt_or_input() -> None:
    example = Example("t", "Instruction: say hi\nInput: hello", "hello", "hi", ("hi",), None)
    assert source_text(example, instructions=True) == "Instruction: say hi\nInput: hello"
    assert source_text(example, instructions=False) == "hello"


def test_demo_dataset_is_deterministic_and_parses(tmp_path: Path, demo: Path) -> None:
    again = write_demo_dataset(tmp_path / "again")
    assert again.read_bytes() == demo.read_bytes()
    committed = Path(__file__).resolve().parents[1] / "grids" / "demo-data"  # the copy grids/example.yaml reads
    for name in (again.name, "README.md"):
        assert (committed / name).read_bytes() == (again.parent / name).read_bytes(), (
            f"grids/demo-data/{name} is stale: run `stl data demo grids/demo-data`")
    readme = (demo.parent / "README.md").read_text()
    assert "synthetic" in readme.lower() and "not instructdial" in readme.lower()
    examples = list(read_examples(str(demo)))
    assert 200 <= len(examples) <= 600
    assert {e.task for e in examples} == set(DEMO_TRAIN_TASKS) | set(DEMO_EVAL_TASKS)
    assert not set(DEMO_TRAIN_TASKS) & set(DEMO_EVAL_TASKS)
    rows = [json.loads(line) for line in demo.read_text().splitlines()]
    assert all(r["dataset"] == "stl-demo" for r in rows)
    assert set(rows[0]) == {
        "prompt", "input", "output", "all_outputs", "task", "dataset", "candidates", "classes_in_options"
    }  # fmt: skip
    catalog = task_catalog(str(demo))
    held_out_types = {catalog[task] for task in DEMO_EVAL_TASKS}
    assert held_out_types == {TaskType.classification, TaskType.generation}
    for example in examples:
        if catalog[example.task] == TaskType.classification:
            assert example.options and example.output in example.options
        else:
            assert example.options is None
    # The rows an eval scores first hold every label equally often: an answer that ignores the input scores chance.
    for task in (task for task, kind in catalog.items() if kind == TaskType.classification):
        labels = [e.output for e in examples if e.task == task]
        options = next(e.options for e in examples if e.task == task)
        assert options is not None
        for first in (len(options) * 2, len(options) * 6, len(labels)):
            assert {labels[:first].count(option) for option in options} == {first // len(options)}, task


def test_read_examples_filters_tasks_in_order(demo: Path) -> None:
    wanted = ["summarization", "intent_classification"]
    examples = list(read_examples(str(demo), wanted))
    assert {e.task for e in examples} == set(wanted)
    all_examples = [e for e in read_examples(str(demo)) if e.task in wanted]
    assert examples == all_examples


def test_bad_sources_raise_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(read_examples(str(tmp_path / "missing.jsonl")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(row("a", "x", "y")) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        list(read_examples(str(broken)))
    no_output = write_rows(tmp_path / "no_output.jsonl", [{"task": "a", "prompt": "p", "input": "i"}])
    with pytest.raises(DataError, match="output"):
        list(read_examples(str(no_output)))
    with pytest.raises(DataError, match="no examples"):
        list(islice(Mixture(str(no_output), ["zzz"], cap=10, seed=0).stream(), 1))


def test_unreachable_hf_dataset_is_a_data_error() -> None:
    with pytest.raises(DataError, match="could not be loaded"):
        next(read_examples("hf:stl-test/surely-not-a-dataset"))


def test_hf_sources_read_and_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [row("a", f"a{i}", f"a{i}") for i in range(6)] + [row("b", f"b{i}", f"b{i}") for i in range(3)]
    seen: list[tuple[str, str | None, bool]] = []

    def fake_load(name: str, config: str | None = None, *, split: str, streaming: bool) -> Any:
        seen.append((name, config, streaming))
        table = datasets.Dataset.from_list(rows)
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert [e.output for e in read_examples("hf:org/dial:text2text", ["b"])] == ["b0", "b1", "b2"]
    assert seen[-1] == ("org/dial", "text2text", True)
    drawn = list(islice(Mixture("hf:org/dial", ["a", "b"], cap=100, seed=1).stream(), 90))
    assert Counter(e.task for e in drawn)["a"] > Counter(e.task for e in drawn)["b"]
    assert {e.output for e in drawn} == {r["output"] for r in rows}
    assert task_catalog("hf:org/dial") == {}


def test_task_catalog_types_and_cache_invalidation(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", [row("cls", "q [OPTIONS] yes||||no", "yes"), row("gen", "q", "a")])
    assert task_catalog(str(path)) == {"cls": TaskType.classification, "gen": TaskType.generation}
    with path.open("a") as handle:
        handle.write(json.dumps(row("more", "q", "a")) + "\n")
    assert "more" in task_catalog(str(path))


def test_catalog_and_models_import_without_torch() -> None:
    code = ("import sys, stl.jobs.ml.data, stl.jobs.ml.models, stl.jobs.ml.stages; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_k_shot_is_deterministic(demo: Path) -> None:
    examples = list(read_examples(str(demo), ["summarization"]))
    first = k_shot(examples, 8, seed=3)
    assert first == k_shot(examples, 8, seed=3)
    assert first != k_shot(examples, 8, seed=4)
    assert len(first) == 8 and len(set(first)) == 8
    assert [examples.index(e) for e in first] == sorted(examples.index(e) for e in first)
    assert k_shot(examples, 10_000, seed=0) == examples
    assert few_shot_examples(str(demo), ["summarization"], 8, seed=3) == first
    with pytest.raises(ValueError):
        k_shot(examples, 0, seed=0)


def test_k_shot_does_not_depend_on_hash_randomization(demo: Path) -> None:
    code = (
        "import sys; from stl.jobs.ml.data import k_shot; from stl.jobs.ml.sources import read_examples;"
        "ex = list(read_examples(sys.argv[1], ['summarization']));"
        "print([e.output for e in k_shot(ex, 4, seed=7)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code, str(demo)],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_mixture_is_examples_proportional_with_a_cap(sized: Path) -> None:
    drawn = list(islice(Mixture(str(sized), ["mid", "small", "big"], cap=100, seed=0).stream(), 4200))
    counts = Counter(e.task for e in drawn)
    # Rates 100 : 10 : min(1000, 100) -> 1/2.1, 0.1/2.1, 1/2.1.
    assert abs(counts["mid"] / 4200 - 100 / 210) < 0.04
    assert abs(counts["small"] / 4200 - 10 / 210) < 0.02
    assert abs(counts["big"] / 4200 - 100 / 210) < 0.04
    # The cap keeps 100 of big's rows (a reservoir sample), each seen equally often per epoch.
    big_outputs = Counter(e.output for e in drawn if e.task == "big")
    assert len(big_outputs) == 100
    assert max(big_outputs.values()) - min(big_outputs.values()) <= 1
    # Small tasks cycle through all their rows.
    assert len({e.output for e in drawn if e.task == "small"}) == 10


def test_mixture_sizes_are_capped_counts(sized: Path) -> None:
    sizes = data.Mixture(str(sized), ["big", "small", "mid", "big"], cap=100, seed=0).sizes
    assert sizes == {"big": 100, "small": 10, "mid": 100}


def test_task_is_found_in_odd_rows(tmp_path: Path) -> None:
    rows = [
        {"metadata": {"task": "inner"}, **row("outer", "q [OPTIONS] a||||b", "a")},
        row('quote"d', "x", "y"),
        {"task": "gen", "prompt": "[OPTIONS] only in the prompt", "input": "x", "output": "y"},
    ]
    path = write_rows(tmp_path / "odd.jsonl", rows)
    assert task_catalog(str(path)) == {
        "outer": TaskType.classification,
        'quote"d': TaskType.generation,
        "gen": TaskType.generation,
    }
    assert [e.task for e in islice(Mixture(str(path), ['quote"d'], cap=5, seed=0).stream(), 2)] == ['quote"d'] * 2


def test_mixture_is_deterministic_and_resumable(sized: Path) -> None:
    tasks = ["mid", "small", "big"]
    full = [e.output for e in islice(Mixture(str(sized), tasks, cap=50, seed=5).stream(), 300)]
    assert full == [e.output for e in islice(Mixture(str(sized), tasks, cap=50, seed=5).stream(), 300)]
    assert full != [e.output for e in islice(Mixture(str(sized), tasks, cap=50, seed=6).stream(), 300)]
    resumed = [e.output for e in islice(Mixture(str(sized), tasks, cap=50, seed=5).stream(123), 177)]
    assert resumed == full[123:]


def test_cycle_shuffled_reshuffles_each_epoch_and_resumes() -> None:
    examples = [Example("t", str(i), str(i), str(i), (str(i),), None) for i in range(5)]
    drawn = [e.output for e in islice(cycle_shuffled(examples, seed=1), 15)]
    assert sorted(drawn[:5]) == sorted(drawn[5:10]) == [str(i) for i in range(5)]
    assert drawn[:5] != drawn[5:10] or drawn[5:10] != drawn[10:15]
    assert [e.output for e in islice(cycle_shuffled(examples, seed=1, start=7), 8)] == drawn[7:]


def test_length_grouped_batches_resume_exactly(sized: Path) -> None:
    def stream_from(start: int) -> Any:
        return Mixture(str(sized), ["mid", "big"], cap=1000, seed=2).stream(start)

    def batches(start_batch: int, count: int) -> list[list[str]]:
        produced = length_grouped_batches(
            stream_from, batch_size=4, seed=2, length=lambda e: len(e.input), start_batch=start_batch, window_batches=5
        )
        return [[e.output for e in batch] for batch in islice(produced, count)]

    full = batches(0, 23)
    assert all(len(batch) == 4 for batch in full)
    assert batches(7, 16) == full[7:]
    assert batches(10, 13) == full[10:]
    # Within a window, batches are sorted by length (then shuffled): each batch spans a narrow range.
    lengths = [sorted(len(o) for o in batch) for batch in full[:5]]
    assert sum(b[-1] - b[0] for b in lengths) <= 5


@pytest.mark.instructdial
def test_instructdial_sample_parses() -> None:
    path = INSTRUCTDIAL / "sample_text2text.jsonl"
    if not path.is_file():
        pytest.skip(f"InstructDial sample not found at {path} (it lives in ../shared/data, outside the repo)")
    examples = list(read_examples(str(path)))
    assert len(examples) == 1000
    catalog = task_catalog(str(path))
    assert len(catalog) == 46
    assert catalog["act_classification"] == TaskType.classification
    assert catalog["response_generation"] == TaskType.generation
    unanswerable: set[str] = set()
    for example in examples:
        assert example.prompt.startswith("Instruction:")
        assert example.all_outputs
        if catalog[example.task] == TaskType.classification:
            assert example.options is not None
            assert len(answer_candidates(example)) == len(example.options)
            unanswerable.update([example.task] if not correct_options(example) else [])
        else:
            assert example.options is None
    assert not unanswerable, f"no option is the gold answer in some rows of {sorted(unanswerable)}"
    shots = few_shot_examples(str(path), ["intent_classification"], 4, seed=0)
    assert [e.task for e in shots] == ["intent_classification"] * 4
    assert data.k_shot(list(read_examples(str(path), ["intent_classification"])), 4, seed=0) == shots


def test_row_index_cache_gives_the_same_samples_and_is_rebuilt_when_the_file_changes(
    sized: Path, tmp_path: Path
) -> None:
    cache, lines = tmp_path / "cache", []
    plain = list(islice(Mixture(str(sized), ["mid", "small"], cap=50, seed=3).stream(), 200))
    cached_first = data.Mixture(str(sized), ["mid", "small"], cap=50, seed=3, cache_dir=cache, log=lines.append)
    cached_again = data.Mixture(str(sized), ["small", "big"], cap=50, seed=3, cache_dir=cache, log=lines.append)
    assert ["miss" in lines[0], "hit" in lines[1]] == [True, True]  # one pass indexes every task
    assert list(islice(cached_first.stream(), 200)) == plain
    assert cached_again.sizes == {"small": 10, "big": 50}
    shots = few_shot_examples(str(sized), ["big", "small"], 4, seed=2, cache_dir=cache, log=lines.append)
    assert shots == few_shot_examples(str(sized), ["big", "small"], 4, seed=2) and "hit" in lines[-1]
    files = list((cache / INDEX_CACHE_DIR).iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    # A rewritten file is a new key (size and mtime), so the index is built again.
    with sized.open("a") as handle:
        handle.write(json.dumps(row("small", "s extra", "small-extra")) + "\n")
    grown = data.Mixture(str(sized), ["small"], cap=50, seed=3, cache_dir=cache, log=lines.append)
    assert "miss" in lines[-1] and grown.sizes == {"small": 11}
    with pytest.raises(DataError, match="nope"):
        data.Mixture(str(sized), ["nope"], cap=5, seed=0, cache_dir=cache)


def test_token_lists_round_trip_without_pickle(tmp_path: Path) -> None:
    path = token_cache_path(tmp_path, {"kind": "test", "n": 1})
    assert path != token_cache_path(tmp_path, {"kind": "test", "n": 2})
    groups = {"sources": [[5, 6, 7], [], [2**31 - 1]], "none": [], "counts": [[3, 0, 1]]}
    save_token_lists(path, groups, description="test")
    assert load_token_lists(path) == groups
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle (protocol 2+ starts with 0x80)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    path.write_bytes(b"damaged")
    assert load_token_lists(path) is None
    assert load_token_lists(tmp_path / "missing.safetensors") is None
    assert source_fingerprint("hf:some/dataset") is None


def test_few_shot_examples_never_include_the_eval_examples(demo: Path) -> None:
    examples = list(read_examples(str(demo), ["summarization"]))
    scored = examples[:40]  # what an eval stage with max_examples 40 scores
    for seed in range(20):
        drawn = few_shot_examples(str(demo), ["summarization"], 8, seed=seed, holdout=40)
        assert len(drawn) == 8 and not set(drawn) & set(scored)
        assert drawn == k_shot(examples[40:], 8, seed=seed)
    assert set(few_shot_examples(str(demo), ["summarization"], 8, seed=0, holdout=40)) == set(examples[40:])
    with pytest.raises(DataError, match="leaves 7 to draw shots: 8 from; lower eval.max_examples to 40 or less, "
                                        "or lower shots"):
        few_shot_examples(str(demo), ["summarization"], 8, seed=0, holdout=41)


def test_demo_into_a_file_or_an_unwritable_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stl.cli.main import app

    a_file = tmp_path / "demo_text2text.jsonl"
    a_file.write_text("already here\n")
    for target, says in ((a_file, f"{a_file} is a file, not a folder"),
                         (a_file / "sub", f"{a_file} is a file, not a folder"),
                         (Path("/proc/stl-demo"), "No such file or directory")):
        result = CliRunner().invoke(app, ["data", "demo", str(target)])
        assert result.exit_code == 2, result.output
        assert result.stdout == "" and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert a_file.read_text() == "already here\n"


def test_a_data_file_missing_where_the_worker_runs_says_so_and_names_the_docker_mount(tmp_path: Path) -> None:
    import socket

    with pytest.raises(DataError) as caught:
        list(read_examples(str(tmp_path / "gone.jsonl")))
    message = str(caught.value)
    assert f"{tmp_path / 'gone.jsonl'} does not exist on the worker's machine ({socket.gethostname()})" in message
    assert "STL_DATA_ROOT" in message and "\n" not in message


def test_a_row_cut_short_after_its_task_is_found_before_anything_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    row = {"task": "t", "input": "a long input", "output": "x", "all_outputs": ["x"]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:-12] + "\n")  # "task" survives the cut
    with pytest.raises(DataError, match=r"cut\.jsonl:2: not a whole JSON object .*cut short"):
        task_catalog(str(path))


def test_the_demo_dataset_is_never_written_over_someone_elses_files(tmp_path: Path) -> None:
    from stl.jobs.errors import UsageError

    (tmp_path / "README.md").write_text("# my project\n")
    with pytest.raises(UsageError, match=r"README.md exists and is not stl's demo data"):
        write_demo_dataset(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    again = tmp_path / "demo"
    write_demo_dataset(again)
    write_demo_dataset(again)  # over its own earlier copy: fine


# --- options in every style InstructDial writes ------------------------------------------------------------


def _example(options_string: str, output: str, all_outputs: list[str] | None = None) -> Example:
    from tests import instructdial_format as fmt

    return example_from_row(fmt.row("t", "hello there", options_string, output, all_outputs))


def test_letter_indexed_options_are_answered_by_letter_and_scored_against_it() -> None:
    from tests.instructdial_format import get_alphabetwithoptions_string

    example = _example(get_alphabetwithoptions_string(["supports", "refutes", "not enough information"]), "B")
    assert example.options == ("A: supports", "B: refutes", "C: not enough information")
    assert answer_candidates(example) == ("A", "B", "C")
    assert correct_options(example) == {1}
    assert is_correct(example, "B") and is_correct(example, " b ") and is_correct(example, "refutes")
    assert not is_correct(example, "A") and not is_correct(example, "supports")


@pytest.mark.parametrize("listed", [
    ["(a) tea", "(b) coffee", "(c) water"],
    ["A. tea", "B. coffee", "C. water"],
    ["a) tea", "b) coffee", "c) water"],
    ["0: tea", "1: coffee", "2: water"],
])
def test_every_label_style_takes_the_bare_label_or_the_option_text_as_gold(listed: list[str]) -> None:
    from tests.instructdial_format import get_options_string

    label = listed[1].split()[0].strip("():.").strip()
    by_label = _example(get_options_string(listed), label)
    assert correct_options(by_label) == {1}
    assert normalize_answer(answer_candidates(by_label)[1]) == label.lower()
    by_text = _example(get_options_string(listed), "coffee")
    assert correct_options(by_text) == {1}
    assert answer_candidates(by_text) == ("tea", "coffee", "water")
    assert is_correct(by_text, "coffee") and is_correct(by_label, f"({label})")


def test_a_multi_label_row_credits_any_of_its_accepted_outputs() -> None:
    from tests.instructdial_format import get_options_string

    example = _example(get_options_string(["joy", "love", "anger", "fear"]), "joy", ["joy", "love"])
    assert correct_options(example) == {0, 1}
    assert is_correct(example, "love") and is_correct(example, "Joy") and not is_correct(example, "anger")


def test_plain_options_that_only_look_labelled_stay_plain() -> None:
    from tests.instructdial_format import get_integerwithoptions_string, get_options_string

    # Repeated "labels" are not labels: the options are answered as listed.
    plain = _example(get_options_string(["a. m. meeting", "a. m. call"]), "a. m. call")
    assert answer_candidates(plain) == ("a. m. meeting", "a. m. call") and correct_options(plain) == {1}
    # find_incoherent_utterance lists bare numbers and answers with one.
    bare = _example(get_options_string(["0", "1", "2", "all correct"]), "2")
    assert answer_candidates(bare) == ("0", "1", "2", "all correct") and correct_options(bare) == {2}
    # A poluteoptions twin appends "none of the above" as a numbered option.
    polluted = _example(get_integerwithoptions_string(["offerbook", "inform", "none of the above"]), "2")
    assert answer_candidates(polluted) == ("0", "1", "2") and correct_options(polluted) == {2}
