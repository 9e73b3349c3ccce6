"""Scoring: log-likelihood ranking, ROUGE-L, batched vs. one-by-one consistency, and a model that learned."""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any

import pytest
import torch

from stl.jobs.errors import DataError, StageCanceled
from stl.jobs.ml.decoding import DecodingStep
from stl.jobs.ml.demo_dataset import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS
from stl.jobs.ml.evaluate import EvalRun, TaskMetrics, evaluate, make_rouge_scorer, rouge_l
from stl.jobs.ml.rank import best_option, sequence_log_likelihoods
from stl.jobs.ml.train import TrainRun, train
from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TrainConfig
from tests.cuda_graphs_on_cpu import BART_FAMILY_RECORDS, TapedOnCpu

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

# Tiny models gain nothing from a second thread, and lose a lot when other processes share the CPUs.
torch.set_num_threads(1)




def eval_spec(data: Path, tasks: tuple[str, ...], *, model: str = "tiny:t5", **settings: Any) -> StageSpec:
    defaults: dict[str, Any] = {"max_examples": 6, "batch_size": 4, "max_new_tokens": 8, "samples": 2}
    return StageSpec(
        kind=StageKind.eval, model=model, data=str(data), tasks=tasks, eval=EvalConfig(**{**defaults, **settings})
    )


def run_eval(
    spec: StageSpec,
    model_dir: Path | None = None,
    should_stop: Callable[[], str | None] = lambda: None,
) -> list[TaskMetrics]:
    run = EvalRun(spec=spec, model_dir=model_dir, device="cpu", should_stop=should_stop, log=lambda line: None)
    return evaluate(run, on_step=lambda report: None)


def test_out_of_memory_halves_the_eval_batch_and_scores_the_same(demo_data: Path) -> None:
    from stl.jobs.errors import OutOfMemory

    tasks = ("intent_classification", "summarization")
    spec = eval_spec(demo_data, tasks, batch_size=4)
    lines: list[str] = []
    run = EvalRun(spec=spec, model_dir=None, device="cpu", should_stop=lambda: None, log=lines.append,
                  oom_over_rows=1)  # only single examples fit
    halved = evaluate(run, on_step=lambda report: None)
    assert [m.to_dict() for m in halved] == [m.to_dict() for m in run_eval(spec)]
    backoffs = [line for line in lines if line.startswith("out of GPU memory")]
    assert backoffs[:2] == ["out of GPU memory with a batch of 4; going on with batches of 2 (set eval.batch_size "
                            "to 2 to start there)", "out of GPU memory with a batch of 2; going on with batches of "
                            "1 (set eval.batch_size to 1 to start there)"]
    assert len(backoffs) == 2  # the smaller size holds for the rest of the stage, the second task included
    # A generation task's log says where its time went; a classification task's has no such line.
    timings = [line for line in lines if " answers in " in line]
    assert len(timings) == 1 and re.fullmatch(
        r"summarization: generated 6 answers in \d+\.\d\d s \(\d+/s\), ROUGE-L in \d+\.\d\d s", timings[0]
    ), timings
    run = EvalRun(spec=spec, model_dir=None, device="cpu", should_stop=lambda: None, log=lines.append,
                  oom_over_rows=0)
    with pytest.raises(OutOfMemory, match="ran out of GPU memory on a single example of tiny:t5; lower eval"):
        evaluate(run, on_step=lambda report: None)


def test_answers_are_scored_while_the_gpu_decodes_later_batches_with_the_same_metrics(
    demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stl.jobs.ml.evaluate as evaluate_module
    from stl.jobs.ml.decoding import GreedyDecoder

    spec = eval_spec(demo_data, ("summarization",), max_examples=12, batch_size=4, samples=12)
    reference = run_eval(spec)
    decoding = [False]
    scored_while_decoding: list[bool] = []
    decode, score = GreedyDecoder.decode, evaluate_module.rouge_l

    def watched_decode(self: GreedyDecoder, *args: Any, **kwargs: Any) -> Any:
        decoding[0] = True
        try:
            return decode(self, *args, **kwargs)
        finally:
            decoding[0] = False

    def watched_score(*args: Any, **kwargs: Any) -> float:
        scored_while_decoding.append(decoding[0])
        return score(*args, **kwargs)

    monkeypatch.setattr(GreedyDecoder, "decode", watched_decode)
    monkeypatch.setattr(evaluate_module, "rouge_l", watched_score)
    assert [m.to_dict() for m in run_eval(spec)] == [m.to_dict() for m in reference]
    assert scored_while_decoding == [False] * 12  # a CPU is never busy: scoring waits for the last answer
    scored_while_decoding.clear()
    monkeypatch.setattr(GreedyDecoder, "_device_busy", lambda self, device: lambda: True)  # as a GPU would be
    lines: list[str] = []
    run = EvalRun(spec=spec, model_dir=None, device="cpu", should_stop=lambda: None, log=lines.append)
    assert [m.to_dict() for m in evaluate(run, on_step=lambda report: None)] == [m.to_dict() for m in reference]
    # Three batches of 4: the first two batches' answers are scored while the next batch decodes.
    assert scored_while_decoding == [True] * 8 + [False] * 4
    [timing] = [line for line in lines if " answers in " in line]
    assert re.search(r"ROUGE-L in \d+\.\d\d s after them and \d+\.\d\d s while the GPU decoded$", timing)


@pytest.mark.parametrize("disguised", [True, False])
def test_only_out_of_memory_in_any_form_halves_the_eval_batch(
    demo_data: Path, monkeypatch: pytest.MonkeyPatch, disguised: bool
) -> None:
    from stl.jobs.ml.rank import RankClassifier
    from tests.helpers import out_of_memory_in_disguise

    original = RankClassifier.option_scores

    def failing_on_big_batches(self: Any, sources: Any, candidates: Any) -> Any:
        if len(sources) > 1:
            raise out_of_memory_in_disguise("capture") if disguised else RuntimeError("illegal memory access")
        return original(self, sources, candidates)

    spec = eval_spec(demo_data, ("intent_classification",), batch_size=4)
    expected = run_eval(spec)
    monkeypatch.setattr(RankClassifier, "option_scores", failing_on_big_batches)
    if disguised:
        assert [m.to_dict() for m in run_eval(spec)] == [m.to_dict() for m in expected]
    else:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            run_eval(spec)


def test_sequence_log_likelihood_sums_only_labelled_positions() -> None:
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]],
            [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 0.0]],
        ]
    )
    labels = torch.tensor([[0, 1, -100], [2, -100, 1]])
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = torch.stack([log_probs[0, 0, 0] + log_probs[0, 1, 1], log_probs[1, 0, 2] + log_probs[1, 2, 1]])
    assert torch.allclose(sequence_log_likelihoods(logits, labels), expected)


def test_rank_classification_picks_the_likeliest_option() -> None:
    # Three one-token options (ids 0, 1, 2); the model puts most mass on id 1 ("no").
    logits = torch.tensor([[[0.1, 4.0, -1.0]]]).expand(3, 1, 3)
    options = torch.tensor([[0], [1], [2]])
    scores = sequence_log_likelihoods(logits, options).tolist()
    assert best_option(scores) == 1
    assert best_option([0.5, 0.5, 0.1]) == 0  # ties: first option
    assert best_option([-3.0, -1.0, -2.0]) == 1
    with pytest.raises(ValueError):
        best_option([])


@pytest.mark.parametrize(
    ("prediction", "references"),
    [
        ("the cat sat on the mat", ["the cat is on the mat"]),
        ("Booked your flights to Rome!", ["sure , i booked your flight to rome .", "flight booked"]),
        ("", ["anything"]),
        ("completely different", ["nothing shared here"]),
    ],
)
def test_rouge_l_equals_rouge_score(prediction: str, references: list[str]) -> None:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = make_rouge_scorer()
    reference = RougeScorer(["rougeL"], use_stemmer=True)
    expected = max(reference.score(target, prediction)["rougeL"].fmeasure for target in references)
    assert rouge_l(prediction, references) == expected
    assert 0.0 <= rouge_l(prediction, references, scorer) <= 1.0
    assert rouge_l("flight booked", ["sure , i booked your flight", "flight booked"]) == 1.0


def briefly_trained(demo_data: Path, workdir: Path, model: str) -> Path:
    """A model trained just enough to emit text (an untrained byte model emits invalid UTF-8, i.e. "")."""
    spec = StageSpec(
        kind=StageKind.mtl,
        model=model,
        data=str(demo_data),
        tasks=(*DEMO_TRAIN_TASKS, *DEMO_EVAL_TASKS),
        train=TrainConfig(max_steps=30, batch_size=8, learning_rate=1e-2, max_source_length=96, checkpoint_every=100),
    )
    run = TrainRun(spec=spec, workdir=workdir, init_from=None, device="cpu", should_stop=lambda: None, log=print)
    train(run, on_step=lambda report: None)
    return workdir / "model"


@pytest.mark.parametrize("model", ["tiny:t5", "tiny:gpt2"])
def test_batched_scoring_matches_one_example_at_a_time(tmp_path: Path, demo_data: Path, model: str) -> None:
    tasks = ("intent_classification", "summarization")
    model_dir = briefly_trained(demo_data, tmp_path, model)
    batched = run_eval(eval_spec(demo_data, tasks, model=model, batch_size=4), model_dir=model_dir)
    single = run_eval(eval_spec(demo_data, tasks, model=model, batch_size=1), model_dir=model_dir)
    assert [m.to_dict() for m in batched] == [m.to_dict() for m in single]
    classification, generation = batched
    assert (classification.task_type, classification.metric, classification.n) == ("classification", "accuracy", 6)
    assert (generation.task_type, generation.metric, generation.n) == ("generation", "rougeL", 6)
    assert 0.0 <= classification.value <= 1.0 and 0.0 <= generation.value <= 1.0
    assert len(generation.samples) == 2
    if model == "tiny:t5":  # 30 steps teach t5 some words; gpt2 still answers with spaces
        assert all(sample["prediction"] for sample in generation.samples)
    assert set(generation.samples[0]) == {"source", "prediction", "references"}
    assert json.loads(json.dumps(classification.to_dict())) == classification.to_dict()
    assert TaskMetrics.from_dict(classification.to_dict()) == classification


def test_a_bf16_gpu_evaluates_with_bf16_weights(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the device computes bf16 natively the eval model's weights go to bf16 (no per-step autocast
    casts); the scores stay within bf16's rounding of the fp32 ones. The CPU stands in for such a GPU."""
    import stl.jobs.ml.evaluate as evaluate_module
    from stl.jobs.ml.rank import RankClassifier

    tasks = ("intent_classification", "summarization")
    model_dir = briefly_trained(demo_data, tmp_path, "tiny:t5")
    fp32 = run_eval(eval_spec(demo_data, tasks), model_dir=model_dir)
    monkeypatch.setattr(evaluate_module, "bf16_autocast_supported", lambda device: True)
    dtypes: list[torch.dtype] = []
    real_scores = RankClassifier.option_scores

    def scores_and_dtype(self: Any, *args: Any) -> list[list[float]]:
        dtypes.append(next(self.model.parameters()).dtype)
        return real_scores(self, *args)

    monkeypatch.setattr(RankClassifier, "option_scores", scores_and_dtype)
    lines: list[str] = []
    run = EvalRun(spec=eval_spec(demo_data, tasks), model_dir=model_dir, device="cpu",
                  should_stop=lambda: None, log=lines.append)
    bf16 = evaluate(run, on_step=lambda report: None)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert "(bf16 weights)" in lines[0]
    assert [(m.task, m.metric, m.n) for m in bf16] == [(m.task, m.metric, m.n) for m in fp32]
    for low, full in zip(bf16, fp32, strict=True):
        # bf16 rounding may flip a near-tie: at most one of the 6 examples scores differently.
        assert abs(low.value - full.value) <= 1 / 6 + 1e-9


def write_varied_sources(path: Path, task: str, n: int) -> None:
    """A generation task whose sources vary in length (3 to 170 characters) and content."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(n):
            text = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.choice([3, 10, 25, 50, 90, 150, 170])))
            handle.write(json.dumps({"task": task, "prompt": text, "input": text, "output": "x y"}) + "\n")


def make_input_sensitive(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """A loaded tiny model whose answers depend on the source and are compared token for token."""
    # Larger random weights than the initialiser's, so that the answer depends on the source.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    # The rules of a real BART checkpoint's generation config, so the loop must apply them.
    model.generation_config.no_repeat_ngram_size = 3
    special = set(tokenizer.all_special_ids)
    # Token ids as the prediction text: a byte tokenizer would merge or drop invalid bytes.
    tokenizer.batch_decode = lambda rows, skip_special_tokens=True: [
        " ".join(str(t) for t in row.tolist() if t not in special) for row in rows
    ]
    return model, tokenizer


@pytest.mark.parametrize("model", ["tiny:t5", "tiny:gpt2"])
def test_static_decoding_pads_to_buckets_and_full_batches_and_predicts_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """`eval.compile` on a GPU decodes with a static KV cache at fixed shapes, its step compiled: stl's own
    loop for an encoder-decoder (tiny:t5), transformers' `generate` for a causal LM (tiny:gpt2). The CPU
    stands in for the GPU here: the same shapes and cache, the loop's step compiled by a backend that
    checks it traces whole (`fullgraph`) without inductor's minutes of CPU compiling. The predictions must
    be token for token those of `generate` with its default dynamic cache, on sources of several length
    buckets and a last batch that needs filler rows."""
    import stl.jobs.ml.decoding as decoding_module
    import stl.jobs.ml.evaluate as evaluate_module
    import stl.jobs.ml.generation as generation_module

    data = tmp_path / "varied.jsonl"
    write_varied_sources(data, "gen", 11)
    real_load = evaluate_module.load_model_and_tokenizer
    calls: list[tuple[str, str | None, tuple[int, ...]]] = []

    def load_input_sensitive_model(*args: Any, **kwargs: Any) -> Any:
        loaded, tokenizer = make_input_sensitive(*real_load(*args, **kwargs))
        real_generate = loaded.generate

        def generate(**kwargs: Any) -> Any:
            calls.append(("generate", kwargs.get("cache_implementation"), tuple(kwargs["input_ids"].shape)))
            return real_generate(**kwargs)

        loaded.generate = generate
        return loaded, tokenizer

    class TracedDecoder(decoding_module.GreedyDecoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("step") is DecodingStep.COMPILED:
                kwargs["compile_options"] = {"backend": "aot_eager"}
            super().__init__(*args, **kwargs)

        def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            calls.append(("loop", "compiled" if self.step is DecodingStep.COMPILED else None, tuple(input_ids.shape)))
            return super().decode(input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_model_and_tokenizer", load_input_sensitive_model)
    monkeypatch.setattr(generation_module, "GreedyDecoder", TracedDecoder)
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # use_compile_caches sets them
        monkeypatch.delenv(variable, raising=False)
    settings = {"max_examples": 11, "batch_size": 4, "max_source_length": 200, "samples": 11}

    def predictions(compile: bool, lines: list[str]) -> list[str]:
        run = EvalRun(spec=eval_spec(data, ("gen",), model=model, compile=compile, **settings), model_dir=None,
                      device="cpu", should_stop=lambda: None, log=lines.append, cache_dir=tmp_path / "cache")
        [metrics] = evaluate(run, on_step=lambda report: None)
        return [sample["prediction"] for sample in metrics.samples]

    with monkeypatch.context() as only_generate:  # the reference: transformers' generate, dynamic cache
        only_generate.setattr(generation_module, "greedy_rules", lambda *args, **kwargs: "the reference run")
        reference = predictions(False, [])
    assert {(way, cache) for way, cache, _ in calls} == {("generate", None)}
    assert len(set(reference)) >= 5, reference  # the answers differ, so comparing them means something
    calls.clear()
    eager = predictions(False, [])
    assert eager == reference
    assert {(way, cache) for way, cache, _ in calls} == {("loop" if model == "tiny:t5" else "generate", None)}
    calls.clear()
    lines: list[str] = []
    monkeypatch.setattr(generation_module, "compile_pays_on", lambda device: True)
    static = predictions(True, lines)
    assert static == reference
    assert any("static KV cache" in line and "32/64/128/200 tokens" in line for line in lines), lines
    expected = ("loop", "compiled") if model == "tiny:t5" else ("generate", "static")
    assert {(way, cache) for way, cache, _ in calls} == {expected}
    assert {rows for _, _, (rows, _) in calls} == {4}  # 11 examples: the last batch got a filler row
    widths = {width for _, _, (_, width) in calls}
    assert len(widths) >= 2 and widths <= {32, 64, 128, 200}, widths


def use_input_sensitive_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval stages load their models through `make_input_sensitive`."""
    import stl.jobs.ml.evaluate as evaluate_module

    real_load = evaluate_module.load_model_and_tokenizer
    monkeypatch.setattr(evaluate_module, "load_model_and_tokenizer",
                        lambda *args, **kwargs: make_input_sensitive(*real_load(*args, **kwargs)))


def record_decoding_graphs_on_cpu(monkeypatch: pytest.MonkeyPatch, *, without_decoder_mask: bool = False
                                  ) -> list[TapedOnCpu]:
    """Eval stages on the CPU record their decoding step as on a GPU, through tests/cuda_graphs_on_cpu.py;
    returns every decoder they make (one not RECORDED is the eager loop, noting its shapes).
    `without_decoder_mask`: BART's step then syncs, as it did before the loop passed it a decoder mask."""
    import stl.jobs.ml.generation as generation_module

    made: list[TapedOnCpu] = []

    def decoder(*args: Any, **kwargs: Any) -> TapedOnCpu:
        made.append(TapedOnCpu(*args, **kwargs))
        if without_decoder_mask:
            made[-1]._pass_decoder_mask = False
        return made[-1]

    monkeypatch.setattr(generation_module, "records_decoding_graphs", lambda device: True)
    monkeypatch.setattr(generation_module, "GreedyDecoder", decoder)
    return made


@pytest.mark.parametrize("model", [
    pytest.param("tiny:bart", marks=pytest.mark.skipif(
        not BART_FAMILY_RECORDS, reason="transformers 4: BART's decoding step syncs, so its stage decodes eagerly")),
    "tiny:t5",
])
def test_recorded_decoding_graphs_pad_batches_to_buckets_record_once_per_shape_and_predict_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """On a GPU an eval stage records its decoding step as a CUDA graph per batch shape. Batches are padded
    to length buckets and full rows, so that sorted batches of one bucket replay one recording instead of
    each recording its own. The CPU plays the GPU with tests/cuda_graphs_on_cpu.py (a recording runs nothing;
    a replay repeats the recorded operations); the predictions must be those of `generate`."""
    import stl.jobs.ml.generation as generation_module

    data = tmp_path / "varied.jsonl"
    write_varied_sources(data, "gen", 22)
    use_input_sensitive_models(monkeypatch)
    settings = {"max_examples": 22, "samples": 22, "batch_size": 4, "max_source_length": 200, "model": model}
    with monkeypatch.context() as only_generate:
        only_generate.setattr(generation_module, "greedy_rules", lambda *args, **kwargs: "the reference run")
        reference = generation_predictions(data, tmp_path, [], **settings)
    assert len(set(reference)) >= 8, reference
    made = record_decoding_graphs_on_cpu(monkeypatch)
    lines: list[str] = []
    assert generation_predictions(data, tmp_path, lines, **settings) == reference
    [taped] = made  # no fallback to the eager loop
    assert taped.step is DecodingStep.RECORDED
    assert any("recorded as a CUDA graph once per batch shape: sources padded to 32/64/128/200 tokens, "
               "batches to 4 rows" in line for line in lines), lines
    assert sum(line.startswith("CUDA graphs in use") for line in lines) == 1, lines
    assert len(taped.shapes) == 6 and {rows for rows, _ in taped.shapes} == {4}  # 22 examples: 2 filler rows
    widths = [width for _, width in taped.shapes]
    assert widths == sorted(widths) and set(widths) <= {32, 64, 128, 200}, widths
    assert taped.recordings == len(set(widths)) < len(widths), (taped.recordings, widths)


def test_a_decoding_step_that_cannot_be_recorded_is_decoded_eagerly_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose decoding step waits for the GPU (here BART without the decoder mask stl passes it) is
    refused while its graph records; the stage decodes eagerly, unpadded, and its log says why."""
    data = tmp_path / "varied.jsonl"
    write_varied_sources(data, "gen", 10)
    use_input_sensitive_models(monkeypatch)
    settings = {"max_examples": 10, "samples": 10, "batch_size": 4, "max_source_length": 200, "model": "tiny:bart"}
    reference = generation_predictions(data, tmp_path, [], **settings)
    made = record_decoding_graphs_on_cpu(monkeypatch, without_decoder_mask=True)
    lines: list[str] = []
    assert generation_predictions(data, tmp_path, lines, **settings) == reference
    taped, eager = made
    assert taped.step is DecodingStep.RECORDED and len(taped.shapes) == 1 and eager.step is DecodingStep.EAGER
    # The failed batch again, as it was padded; then the batches as long as their longest source.
    assert eager.shapes[0] == taped.shapes[0] and [rows for rows, _ in eager.shapes] == [4, 4, 2], eager.shapes
    [failed] = [line for line in lines if line.startswith("recording the decoding step as a CUDA graph failed")]
    assert "BartForConditionalGeneration" in failed and "(aten::" in failed, failed
    assert failed.endswith("decoding eagerly for the rest of the stage"), failed
    assert not any(line.startswith("CUDA graphs in use") for line in lines), lines


def test_static_decoding_is_skipped_for_an_architecture_transformers_does_not_mark_compilable(
    demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    import stl.jobs.ml.generation as generation_module

    monkeypatch.setattr(generation_module, "compile_pays_on", lambda device: True)
    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "_can_compile_fullgraph", False)
    lines: list[str] = []
    run = EvalRun(spec=eval_spec(demo_data, ("summarization",), compile=True), model_dir=None, device="cpu",
                  should_stop=lambda: None, log=lines.append)
    [metrics] = evaluate(run, on_step=lambda report: None)
    assert metrics.n == 6
    assert any("does not mark T5ForConditionalGeneration as compilable" in line for line in lines), lines
    assert not any("static KV cache" in line for line in lines)


def test_eval_compile_changes_a_stage_id_only_when_on() -> None:
    spec = StageSpec(kind=StageKind.eval, model="tiny:t5", data="/x.jsonl", tasks=("a",), eval=EvalConfig())
    assert spec.stage_id == "652dd9c13d6edeccf550"  # its id before eval.compile existed (commit ac1e5e5)
    compiled = spec.model_copy(update={"eval": EvalConfig(compile=True)})
    assert compiled.stage_id != spec.stage_id


def test_eval_errors_and_cancel(demo_data: Path) -> None:
    with pytest.raises(DataError, match="no_such_task"):
        run_eval(eval_spec(demo_data, ("no_such_task",)))
    with pytest.raises(StageCanceled):
        run_eval(eval_spec(demo_data, DEMO_EVAL_TASKS), should_stop=lambda: "cancel")


def write_yes_no(path: Path, task: str, answer: str, n: int, offset: int = 0) -> None:
    words = ["tea", "rain", "bus", "song", "cake", "park", "book", "lamp", "door", "bird"]
    rows = []
    for i in range(offset, offset + n):
        text = f"[CONTEXT] {words[i % 10]} {words[(i * 3) % 10]} [QUESTION] ok? [OPTIONS] yes||||no"
        rows.append({"task": task, "prompt": f"Instruction: answer.\nInput: {text}", "input": text, "output": answer})
    with path.open("a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def test_a_model_trained_to_say_yes_is_scored_right(tmp_path: Path) -> None:
    data = tmp_path / "yes.jsonl"
    write_yes_no(data, "always_yes", "yes", 24)
    write_yes_no(data, "held_out_yes", "yes", 8, offset=50)
    write_yes_no(data, "held_out_no", "no", 8, offset=50)
    spec = StageSpec(
        kind=StageKind.mtl,
        model="tiny:t5",
        data=str(data),
        tasks=("always_yes",),
        train=TrainConfig(max_steps=40, batch_size=8, learning_rate=1e-2, warmup_ratio=0.1, checkpoint_every=100),
    )
    run = TrainRun(spec=spec, workdir=tmp_path / "w", init_from=None, device="cpu", should_stop=lambda: None, log=print)
    train(run, on_step=lambda report: None)
    tasks = ("held_out_yes", "held_out_no")
    untrained_yes, _ = run_eval(eval_spec(data, tasks, max_examples=8))
    yes, no = run_eval(eval_spec(data, tasks, max_examples=8), model_dir=tmp_path / "w" / "model")
    assert (yes.value, no.value) == (1.0, 0.0), (untrained_yes.value, yes.samples, no.samples)
    assert yes.samples[0]["prediction"] == "yes" and no.samples[0]["references"] == ["no"]


def test_demo_tasks_split_into_train_and_held_out() -> None:
    assert set(DEMO_EVAL_TASKS).isdisjoint(DEMO_TRAIN_TASKS)


class _CompileOnCpu:
    """`eval.compile` on the CPU for stl's decoding loop: compile_pays_on says yes, and the step compiles with
    `backend` (aot_eager: seconds, and `fullgraph` still holds) instead of inductor. Records each decode's
    (rows, width) and can make chosen decodes raise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, backend: Any = "aot_eager") -> None:
        import stl.jobs.ml.decoding as decoding_module
        import stl.jobs.ml.generation as generation_module

        self.shapes: list[tuple[int, int]] = []
        self.fail: Callable[[tuple[int, int]], Exception | None] = lambda shape: None
        recorder = self

        class Decoder(decoding_module.GreedyDecoder):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                if kwargs.get("step") is DecodingStep.COMPILED:
                    kwargs["compile_options"] = {"backend": backend}
                super().__init__(*args, **kwargs)

            def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                shape = (int(input_ids.size(0)), int(input_ids.size(1)))
                error = recorder.fail(shape) if self.step is DecodingStep.COMPILED else None
                if error is not None:
                    raise error
                recorder.shapes.append(shape)
                return super().decode(input_ids, attention_mask, **kwargs)

        monkeypatch.setattr(generation_module, "GreedyDecoder", Decoder)
        monkeypatch.setattr(generation_module, "compile_pays_on", lambda device: True)
        for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # use_compile_caches sets them
            monkeypatch.delenv(variable, raising=False)


def generation_predictions(data: Path, tmp_path: Path, lines: list[str], **settings: Any) -> list[str]:
    run = EvalRun(spec=eval_spec(data, ("gen",), **{"max_examples": 12, "samples": 12, **settings}), model_dir=None,
                  device="cpu", should_stop=lambda: None, log=lines.append, cache_dir=tmp_path / "cache")
    [metrics] = evaluate(run, on_step=lambda report: None)
    return [sample["prediction"] for sample in metrics.samples]


def test_running_out_of_memory_in_compiled_decoding_frees_the_graphs_and_goes_on_in_smaller_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every smaller batch is a new shape to compile, and with `fullgraph` dynamo's recompile limit would make
    a shape past it an error, not an eager fallback. Out of memory, the decoder drops its compiled steps, so
    the halvings start afresh. Here the limit is 1 shape: without that it fails at the second halving."""
    import torch._dynamo

    import stl.jobs.ml.generation as generation_module

    data = tmp_path / "short.jsonl"
    write_varied_sources(data, "gen", 24)
    settings = {"max_examples": 24, "samples": 24, "batch_size": 8, "max_source_length": 32}
    reference = generation_predictions(data, tmp_path, [], **settings)
    compiling = _CompileOnCpu(monkeypatch)
    real_prepare = generation_module.prepare_compile

    def prepare_one_shape(*args: Any, **kwargs: Any) -> str:
        where = real_prepare(*args, **kwargs)
        torch._dynamo.config.recompile_limit = 1
        return where

    monkeypatch.setattr(generation_module, "prepare_compile", prepare_one_shape)
    torch._dynamo.reset()
    # The first batch of 8 decodes; then batches of more than 2 rows run out of memory.
    compiling.fail = lambda shape: (
        torch.OutOfMemoryError("CUDA out of memory (injected)") if compiling.shapes and shape[0] > 2 else None
    )
    lines: list[str] = []
    limit = torch._dynamo.config.recompile_limit
    try:
        predictions = generation_predictions(data, tmp_path, lines, compile=True, **settings)
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert predictions == reference
    assert [rows for rows, _ in compiling.shapes] == [8] + [2] * 8
    assert {width for _, width in compiling.shapes} == {32}  # one bucket
    assert any("batch of 8; going on with batches of 4" in line for line in lines), lines
    assert any("batch of 4; going on with batches of 2" in line for line in lines), lines
    assert not any("compiled decoding step failed" in line for line in lines), lines  # it stayed compiled


def test_a_failing_compiled_decoding_step_falls_back_to_eager_decoding_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "short.jsonl"
    write_varied_sources(data, "gen", 12)
    reference = generation_predictions(data, tmp_path, [], max_source_length=32)

    def broken_backend(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no kernel for this op (a stand-in for a compiler failure)")

    _CompileOnCpu(monkeypatch, backend=broken_backend)
    lines: list[str] = []
    assert generation_predictions(data, tmp_path, lines, max_source_length=32, compile=True) == reference
    [failed] = [line for line in lines if line.startswith("the compiled decoding step failed")]
    assert "no kernel for this op" in failed and "decoding eagerly for the rest of the stage" in failed


def test_the_stage_log_says_whether_the_compiled_decoding_step_replays_cuda_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor counts a CUDA-graph fallback when it compiles a shape; the CPU has none, so the count is
    played here: none for the first bucket, one for the next."""
    import stl.jobs.ml.generation as generation_module

    data = tmp_path / "varied.jsonl"
    write_varied_sources(data, "gen", 12)
    compiling = _CompileOnCpu(monkeypatch)
    monkeypatch.setattr(generation_module, "cuda_graph_skips",
                        lambda: max(0, len({w for _, w in compiling.shapes}) - 1))
    lines: list[str] = []
    generation_predictions(data, tmp_path, lines, max_source_length=200, compile=True)
    assert len({width for _, width in compiling.shapes}) >= 2
    assert sum(line.startswith("CUDA graphs in use: each decoded token") for line in lines) == 1, lines
    assert any(line.startswith("the decoding step for") and "without CUDA graphs" in line for line in lines), lines


def test_a_generation_config_the_loop_does_not_reproduce_is_decoded_by_generate_and_the_log_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stl.jobs.ml.evaluate as evaluate_module

    real_load = evaluate_module.load_model_and_tokenizer
    generate_calls: list[int] = []

    def with_repetition_penalty(*args: Any, **kwargs: Any) -> Any:
        loaded, tokenizer = real_load(*args, **kwargs)
        loaded.generation_config.repetition_penalty = 1.3
        real_generate = loaded.generate
        loaded.generate = lambda **kw: generate_calls.append(1) or real_generate(**kw)
        return loaded, tokenizer

    monkeypatch.setattr(evaluate_module, "load_model_and_tokenizer", with_repetition_penalty)
    data = tmp_path / "short.jsonl"
    write_varied_sources(data, "gen", 6)
    lines: list[str] = []
    generation_predictions(data, tmp_path, lines, max_examples=6)
    assert generate_calls
    assert any("runs transformers' generate, not stl's decoding loop" in line and "repetition_penalty" in line
               for line in lines), lines


def test_a_failing_decoding_loop_hands_the_stage_to_generate_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eager loop is the default path of every BART and T5 eval: should it fail on some device, the stage
    goes on with transformers' generate (the same tokens) and says why, instead of failing."""
    import stl.jobs.ml.decoding as decoding_module

    data = tmp_path / "short.jsonl"
    write_varied_sources(data, "gen", 12)
    reference = generation_predictions(data, tmp_path, [], max_source_length=32)

    def broken(self: Any, *args: Any) -> None:
        raise RuntimeError("an op this device lacks (a stand-in)")

    monkeypatch.setattr(decoding_module.GreedyDecoder, "_choose", broken)
    lines: list[str] = []
    assert generation_predictions(data, tmp_path, lines, max_source_length=32) == reference
    [failed] = [line for line in lines if line.startswith("stl's decoding loop failed")]
    assert "an op this device lacks" in failed and "transformers' generate for the rest of the stage" in failed
    assert sum("decoding loop failed" in line for line in lines) == 1  # given up once, not per batch


def test_letter_indexed_options_in_instructdials_format_are_scored_by_letter(tmp_path: Path) -> None:
    """A model trained to answer "B" scores 1.0 where the gold letter is B and 0.0 where it is A, on rows
    written by InstructDial's get_alphabetwithoptions_string (before, every such row scored 0)."""
    from tests.instructdial_format import answer_selection_row

    words = ["tea", "rain", "bus", "song", "cake", "park", "book", "lamp", "door", "bird"]
    data = tmp_path / "lettered.jsonl"

    def rows(task: str, gold: int, n: int, offset: int) -> list[dict[str, Any]]:
        return [answer_selection_row(task, f"{words[i % 10]} {words[(i * 3) % 10]}",
                                     [words[(i + 1) % 10], words[(i + 2) % 10], words[(i + 5) % 10]], gold)
                for i in range(offset, offset + n)]

    lines = rows("answer_selection_b", 1, 24, 0) + rows("held_out_b", 1, 8, 50) + rows("held_out_a", 0, 8, 50)
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = StageSpec(
        kind=StageKind.mtl, model="tiny:t5", data=str(data), tasks=("answer_selection_b",),
        train=TrainConfig(max_steps=40, batch_size=8, learning_rate=1e-2, warmup_ratio=0.1, checkpoint_every=100),
    )
    train(TrainRun(spec=spec, workdir=tmp_path / "w", init_from=None, device="cpu", should_stop=lambda: None,
                   log=lambda line: None), on_step=lambda report: None)
    says_b, says_a = run_eval(eval_spec(data, ("held_out_b", "held_out_a"), max_examples=8),
                              model_dir=tmp_path / "w" / "model")
    assert (says_b.value, says_a.value) == (1.0, 0.0), (says_b.samples, says_a.samples)
    assert says_b.samples[0]["prediction"] == "B" and says_a.samples[0]["references"] == ["A"]
    assert says_b.metrics["accuracy_gen"] == 1.0 and says_a.metrics["accuracy_gen"] == 0.0  # it generates "B"


def test_classification_records_three_accuracies_and_eval_metric_picks_the_primary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Summed log-likelihood favours the short option; per token favours the long one here; the model's
    generated answer names neither. eval.metric says which one the result reports first."""
    from stl.jobs.ml.rank import RankClassifier
    from tests.instructdial_format import row

    data = tmp_path / "short_long.jsonl"
    options = "[OPTIONS] no||||yes, and gladly so"
    data.write_text("".join(json.dumps(row("t", f"hi {i}", options, "yes, and gladly so")) + "\n" for i in range(4)))

    def fixed_scores(self: Any, sources: list[list[int]], candidates: Any) -> list[list[float]]:
        # The short option's whole answer is likelier; the long one's tokens are each likelier.
        return [[-1.0 * len(opts[0]), -0.5 * len(opts[1]) - 0.1] for opts in candidates]

    monkeypatch.setattr(RankClassifier, "option_scores", fixed_scores)
    [by_sum] = run_eval(eval_spec(data, ("t",), max_examples=4))
    assert by_sum.metric == "accuracy" and set(by_sum.metrics) == {"accuracy", "accuracy_norm", "accuracy_gen"}
    assert (by_sum.metrics["accuracy"], by_sum.metrics["accuracy_norm"]) == (0.0, 1.0)
    assert by_sum.value == 0.0 and by_sum.samples[0]["prediction"] == "no"
    [by_token] = run_eval(eval_spec(data, ("t",), max_examples=4, metric="accuracy_norm"))
    assert (by_token.metric, by_token.value) == ("accuracy_norm", 1.0)
    assert by_token.samples[0]["prediction"] == "yes, and gladly so"
    [generated] = run_eval(eval_spec(data, ("t",), max_examples=4, metric="accuracy_gen"))
    assert generated.metric == "accuracy_gen" and generated.value == generated.metrics["accuracy_gen"]
    assert generated.metrics == by_sum.metrics  # one evaluation, whichever metric leads


def test_eval_metric_changes_a_stage_id_only_when_not_the_default(tmp_path: Path) -> None:
    ids = {metric: eval_spec(tmp_path / "d.jsonl", ("t",), metric=metric).stage_id
           for metric in ("accuracy", "accuracy_norm", "accuracy_gen")}
    assert len(set(ids.values())) == 3
    assert ids["accuracy"] == eval_spec(tmp_path / "d.jsonl", ("t",)).stage_id
