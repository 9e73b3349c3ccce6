"""stl's greedy decoding loop (jobs/ml/decoding.py) against transformers' own `generate` and logits processors."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.generation import logits_process as hf

from stl.jobs.errors import StepNotRecordable
from stl.jobs.ml.decoding import DecodingStep, GreedyDecoder, GreedyRules, apply_rules, greedy_rules, rule_masks
from stl.jobs.ml.prefetch import IdleHostWork
from tests.cuda_graphs_on_cpu import BART_FAMILY_RECORDS, NoHostSync, TapedOnCpu

if TYPE_CHECKING:
    from collections.abc import Iterator

VOCAB = 120


@pytest.fixture(autouse=True)
def _forget_compiled_steps() -> Iterator[None]:
    """Every decoder compiles the same method: its compiled shapes must not count against dynamo's limit in
    the tests that follow (evaluate() releases its decoder; these tests build decoders directly)."""
    yield
    torch._dynamo.reset()


def small_bart(init_std: float) -> Any:
    """A small random BART (pad id 1); a larger `init_std` makes its answers depend more on the source."""
    config = BartConfig(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                        init_std=init_std, max_position_embeddings=64)
    return BartForConditionalGeneration(config).eval()


def random_model(rng: random.Random, *, bart: bool = True) -> tuple[Any, int]:
    """A small random BART or T5 (weights scaled so that answers vary) and its pad id; `bart=False`: T5."""
    torch.manual_seed(rng.randrange(10**6))
    if rng.random() < 0.5 and bart:
        return small_bart(rng.choice([0.02, 0.3, 1.0])), 1
    config = T5Config(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=VOCAB,
                      decoder_start_token_id=0, initializer_factor=rng.choice([0.05, 1.0, 5.0]))
    return T5ForConditionalGeneration(config).eval(), 0


def randomize_rules(generation: Any, rng: random.Random) -> None:
    """Generation-config settings the loop must reproduce, drawn at random (often several at once)."""
    generation.no_repeat_ngram_size = rng.choice([0, 0, 1, 2, 3, 4])
    generation.min_length = rng.choice([0, 0, 3, 8])
    generation.min_new_tokens = rng.choice([None, None, 2, 6])
    generation.forced_bos_token_id = rng.choice([None, None, 5])
    generation.forced_eos_token_id = rng.choice([None, generation.eos_token_id, [generation.eos_token_id, 7]])
    generation.suppress_tokens = rng.choice([None, [9, 10]])
    generation.begin_suppress_tokens = rng.choice([None, [11, 12]])
    if rng.random() < 0.3:
        generation.eos_token_id = [generation.eos_token_id, 13]


def model_with_random_rules(
    rng: random.Random, *, max_new_tokens: int, bart: bool = True
) -> tuple[Any, int, GreedyRules]:
    """`random_model` with random generation rules, and the loop's rules for them."""
    model, pad = random_model(rng, bart=bart)
    randomize_rules(model.generation_config, rng)
    rules = greedy_rules(model, max_new_tokens=max_new_tokens, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    return model, pad, rules


def random_sources(rng: random.Random, pad: int, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (rows, width), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    mask = torch.ones_like(ids)
    for row in range(rows):
        length = rng.randint(1, width)
        ids[row, length:], mask[row, length:] = pad, 0
    return ids, mask


def greedy_reference(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int) -> torch.Tensor:
    """transformers' own greedy `generate`, the tokens the loop must reproduce."""
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=pad)


def same_as(reference: torch.Tensor, ours: torch.Tensor, pad: int) -> bool:
    """`generate` stops when every row has ended; the loop's buffer is padded to full length."""
    width = reference.size(1)
    return torch.equal(ours[:, :width], reference) and bool((ours[:, width:] == pad).all())


def test_the_loop_decodes_the_tokens_of_generate_under_random_generation_rules() -> None:
    rng = random.Random(0)
    decoded_tokens = 0
    for trial in range(120):
        model, pad = random_model(rng)
        randomize_rules(model.generation_config, rng)
        new_tokens = rng.randint(1, 14)
        ids, mask = random_sources(rng, pad, rng.randint(1, 6), rng.randint(2, 12))
        rules = greedy_rules(model, max_new_tokens=new_tokens, pad_id=pad)
        assert isinstance(rules, GreedyRules), rules
        arguments = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad)
        with torch.inference_mode():
            dynamic = model.generate(**arguments)
            static = model.generate(**arguments, cache_implementation="static")
            ours = GreedyDecoder(model, rules).decode(ids, mask)
        assert same_as(dynamic, ours, pad), (trial, model.generation_config, dynamic, ours)
        assert same_as(static, ours, pad), trial
        decoded_tokens += int((ours[:, 1:] != pad).sum())
    assert decoded_tokens > 120 * 10  # the rows did not all end at once: there was something to compare


@pytest.mark.parametrize("seed", range(40))
def test_each_rule_changes_the_scores_exactly_as_the_transformers_processor_does(seed: int) -> None:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    max_new_tokens, eos = rng.randint(2, 10), rng.choice([(2,), (2, 13)])
    rules = GreedyRules(
        max_new_tokens=max_new_tokens, decoder_start_id=0, pad_id=1, eos_ids=eos,
        min_length=rng.choice([0, 3, 6]), min_new_tokens=rng.choice([0, 2, 5]),
        no_repeat_ngram_size=rng.choice([0, 1, 2, 3]), forced_bos_id=rng.choice([None, 5]),
        forced_eos_ids=rng.choice([(), (2,), (2, 7)]), suppress_ids=rng.choice([(), (9, 10)]),
        begin_suppress_ids=rng.choice([(), (11, 12)]),
    )
    processors: list[Any] = []
    if rules.no_repeat_ngram_size:
        processors.append(hf.NoRepeatNGramLogitsProcessor(rules.no_repeat_ngram_size))
    if rules.min_length:
        processors.append(hf.MinLengthLogitsProcessor(rules.min_length, torch.tensor(eos)))
    if rules.min_new_tokens:
        processors.append(hf.MinNewTokensLengthLogitsProcessor(1, rules.min_new_tokens, torch.tensor(eos)))
    if rules.forced_bos_id is not None:
        processors.append(hf.ForcedBOSTokenLogitsProcessor(rules.forced_bos_id))
    if rules.forced_eos_ids:
        processors.append(hf.ForcedEOSTokenLogitsProcessor(rules.length, list(rules.forced_eos_ids)))
    if rules.suppress_ids:
        processors.append(hf.SuppressTokensLogitsProcessor(list(rules.suppress_ids)))
    if rules.begin_suppress_ids:
        begin = 1 if rules.forced_bos_id is None else 2
        processors.append(hf.SuppressTokensAtBeginLogitsProcessor(list(rules.begin_suppress_ids), begin))
    masks = rule_masks(rules, VOCAB, torch.device("cpu"))
    rows = 5
    # Few distinct tokens, so n-grams repeat and the no-repeat rule has something to ban.
    tokens = torch.randint(3, 8, (rows, rules.length), generator=generator)
    tokens[:, 0] = 0
    for length in range(1, rules.length):
        scores = torch.randn(rows, VOCAB, generator=generator)
        expected = scores.clone()
        for processor in processors:
            expected = processor(tokens[:, :length], expected)
        # Beyond `length` the buffer holds junk; the rules must not read it.
        junk = tokens.clone()
        junk[:, length:] = torch.randint(3, 8, (rows, rules.length - length), generator=generator)
        ours = apply_rules(rules, masks, junk, torch.tensor(length), scores.clone())
        assert torch.equal(ours, expected), (rules, length)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_reused_batch_shape_decodes_new_sources_as_a_fresh_decoder_does(compiled: bool) -> None:
    """Buffers are reset between batches of one shape, and the KV cache, cross-attention included: reset in
    place where the step is compiled (a static cache), made anew where it is eager."""
    rng = random.Random(3)
    torch.manual_seed(3)
    model, pad = small_bart(0.5), 1
    model.generation_config.no_repeat_ngram_size = 2
    rules = greedy_rules(model, max_new_tokens=10, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    options = {"step": DecodingStep.COMPILED, "compile_options": {"backend": "aot_eager"}} if compiled else {}
    reused = GreedyDecoder(model, rules, **options)  # type: ignore[arg-type]
    with torch.inference_mode():
        outputs = []
        for _ in range(3):
            ids, mask = random_sources(rng, pad, 4, 9)
            again = reused.decode(ids, mask)
            fresh = GreedyDecoder(model, rules).decode(ids, mask)
            assert torch.equal(again, fresh)
            outputs.append(again)
    assert len(reused._batches) == 1  # one shape, reused
    assert not torch.equal(outputs[0], outputs[1])


def test_the_compiled_step_traces_whole_and_decodes_the_same_tokens() -> None:
    """`fullgraph=True`: a graph break (a host sync, say) would fail here. aot_eager checks the trace on a
    CPU in seconds; on a GPU stl compiles with inductor's reduce-overhead mode (CUDA graphs)."""
    rng = random.Random(5)
    for _ in range(2):
        model, pad = random_model(rng)
        randomize_rules(model.generation_config, rng)
        model.generation_config.no_repeat_ngram_size = 3
        rules = greedy_rules(model, max_new_tokens=12, pad_id=pad)
        assert isinstance(rules, GreedyRules)
        compiled = GreedyDecoder(model, rules, step=DecodingStep.COMPILED, compile_options={"backend": "aot_eager"},
                                 keep_shapes=2)
        eager = GreedyDecoder(model, rules)
        with torch.inference_mode():
            for width in (8, 16, 8):
                ids, mask = random_sources(rng, pad, 4, width)
                assert torch.equal(compiled.decode(ids, mask), eager.decode(ids, mask))
        assert len(compiled._batches) == 2


def test_cuda_graphs_are_refused_off_cuda_and_together_with_compile() -> None:
    """The recorded-graph step is CUDA only (bench/gpu_check.py checks its tokens on a GPU); off CUDA it
    says so rather than decoding some other way."""
    model, pad = small_bart(0.5), 1
    rules = greedy_rules(model, max_new_tokens=4, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    with pytest.raises(ValueError, match="not a valid DecodingStep"):
        GreedyDecoder(model, rules, step="compiled and recorded")  # type: ignore[arg-type]
    ids, mask = random_sources(random.Random(0), pad, 2, 5)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GreedyDecoder(model, rules, step=DecodingStep.RECORDED).decode(ids, mask)


class _RecordedStepOnCpu(GreedyDecoder):
    """What `DecodingStep.RECORDED` records, run on a CPU: the step over the static KV cache, as transformers runs it
    while a recording is under way, and checked for host syncs instead of recorded."""

    def _replay(self, batch: Any) -> None:
        with mock.patch("torch.cuda.is_current_stream_capturing", return_value=True), NoHostSync():
            self._step(batch)


def test_the_step_cuda_graphs_record_waits_for_nothing_and_decodes_generates_tokens() -> None:
    """On a GPU a host sync in the step fails the recording (BART sized a decoder mask from the cache's
    length on the host until the loop passed one); here every step after the first runs as it would be
    recorded, with syncs refused, and gives `generate`'s tokens."""
    rng = random.Random(17)
    for _ in range(4):
        model, pad, rules = model_with_random_rules(rng, max_new_tokens=9, bart=BART_FAMILY_RECORDS)
        recorded = _RecordedStepOnCpu(model, rules, step=DecodingStep.RECORDED)
        with torch.inference_mode():
            for _ in range(2):  # the second batch reuses the first's buffers, reset in place
                ids, mask = random_sources(rng, pad, 3, 7)
                assert same_as(greedy_reference(model, ids, mask, 9, pad), recorded.decode(ids, mask), pad)
        assert len(recorded._batches) == 1


def test_recorded_steps_replayed_with_what_they_read_at_recording_decode_generates_tokens() -> None:
    """The recording path of `DecodingStep.RECORDED` as a GPU runs it (warm-up step, recording that runs nothing, replay
    of the recorded operations with the values they read then), batch after batch: a new shape records, a
    reused one replays its graph, an evicted one records again; every batch gives `generate`'s tokens."""
    rng = random.Random(23)
    for _ in range(4):
        model, pad, rules = model_with_random_rules(rng, max_new_tokens=8, bart=BART_FAMILY_RECORDS)
        taped = TapedOnCpu(model, rules, step=DecodingStep.RECORDED, keep_shapes=2)
        with torch.inference_mode():
            for rows, width in ((3, 6), (3, 6), (2, 9), (3, 6), (4, 5), (2, 9)):
                ids, mask = random_sources(rng, pad, rows, width)
                assert same_as(greedy_reference(model, ids, mask, 8, pad), taped.decode(ids, mask), pad)
        assert taped.recordings == 4  # (3, 6), (2, 9), (4, 5), and (2, 9) again: (4, 5) evicted it


def test_a_step_that_waits_for_the_device_is_refused_before_it_voids_the_recording() -> None:
    """BART sized its decoder mask on the host until the loop passed one: a sync. Run into while recording,
    a sync voids the recording on a GPU and leaves torch's CUDA random state marked as recording; the loop
    refuses it before it runs, with the reason, and ends the recording."""
    model, pad = small_bart(0.5), 1
    rules = greedy_rules(model, max_new_tokens=6, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    taped = TapedOnCpu(model, rules, step=DecodingStep.RECORDED)
    taped._pass_decoder_mask = False
    ids, mask = random_sources(random.Random(3), pad, 2, 5)
    # Not the stand-in's AssertionError: the loop's own check came first.
    with pytest.raises(StepNotRecordable, match=r"^BartForConditionalGeneration's decoding step waits for the "
                       r"GPU \(aten::item\), so it cannot be recorded as a CUDA graph$"):
        taped.decode(ids, mask)
    [graph] = taped.graphs
    assert graph.ended and graph.tape  # ended, after recording the operations before the sync
    assert torch._C._len_torch_dispatch_stack() == 0  # neither the recording nor the refusal is left on


def tiny_seq2seq_config(architecture: str) -> Any:
    """A tiny random config of a transformers encoder-decoder a lab might fine-tune (pad 1 or 0)."""
    import transformers

    bart_like = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
                 "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                 "decoder_ffn_dim": 64, "max_position_embeddings": 64, "pad_token_id": 1, "eos_token_id": 2,
                 "decoder_start_token_id": 2, "bos_token_id": 0, "forced_eos_token_id": None}
    t5_like = {"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 64,
               "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    extra: dict[str, Any] = {
        "Marian": {"decoder_vocab_size": VOCAB},
        "LED": {"max_encoder_position_embeddings": 64, "max_decoder_position_embeddings": 64,
                "attention_window": [4]},
        "BigBirdPegasus": {"attention_type": "original_full"},
    }.get(architecture, {})
    common = t5_like if "T5" in architecture else bart_like
    return getattr(transformers, f"{architecture}Config")(**common, **extra)


BART_FAMILY = ("Bart", "MBart", "Pegasus", "Marian", "BlenderbotSmall", "PLBart")


@pytest.mark.parametrize("architecture", [*BART_FAMILY, "BigBirdPegasus", "T5", "MT5", "UMT5", "LongT5", "LED"])
def test_encoder_decoders_record_and_replay_generates_tokens_or_are_refused_with_the_reason(
    architecture: str
) -> None:
    """Every encoder-decoder's decoding step either records as a CUDA graph and, replayed, gives `generate`'s
    tokens, or is refused with the reason before it can void the recording (its eval stage then decodes
    eagerly). Which ones record depends on the transformers release (it skips some host syncs while a
    recording is under way): the study's BART and T5 must; LED, which sizes its inputs on the host, can't."""
    from transformers import AutoModelForSeq2SeqLM

    config = tiny_seq2seq_config(architecture)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(5)  # answers that depend on the source
    model.generation_config.min_new_tokens = 8  # every step runs
    pad = config.pad_token_id
    rules = greedy_rules(model, max_new_tokens=8, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    taped = TapedOnCpu(model, rules, step=DecodingStep.RECORDED)
    rng = random.Random(5)
    refused = None
    with torch.inference_mode():
        for width in (6, 6, 9):
            ids, mask = random_sources(rng, pad, 3, width)
            reference = greedy_reference(model, ids, mask, 8, pad)
            try:
                decoded = taped.decode(ids, mask)
            except StepNotRecordable as e:
                refused = str(e)
                break
            assert same_as(reference, decoded, pad)
    if refused is None:
        assert taped.recordings == 2
    else:
        assert refused.startswith(f"{type(model).__name__}'s decoding step waits for the GPU (aten::"), refused
    if architecture == "T5" or (architecture == "Bart" and BART_FAMILY_RECORDS):
        assert refused is None
    if architecture == "LED":
        assert refused is not None


def test_idle_host_work_runs_oldest_first_while_the_device_is_busy_and_raises_its_error_after() -> None:
    done: list[int] = []
    work = IdleHostWork()
    for n in range(5):
        work.add(lambda n=n: done.append(n))
    answers = iter([True, True, False])
    work.run_while(lambda: next(answers))
    assert done == [0, 1]  # the device said it was done before the third
    work.run_while(lambda: False)
    assert done == [0, 1]

    def fails() -> None:
        raise ValueError("scoring broke")

    work.add(fails)
    work.run_while(lambda: True)  # the loop never sees a job's error: it would take it for its own
    assert done == [0, 1, 2, 3, 4]
    work.run_while(lambda: True)
    with pytest.raises(ValueError, match="scoring broke"):
        work.run_all()


class BusyDevice(GreedyDecoder):
    """The loop on a CPU, told that the device is busy `busy_answers` times per wait, as a GPU would be."""

    busy_answers = 2

    def _device_busy(self, device: torch.device) -> Any:
        def busy() -> bool:
            self.asked += 1
            return self.asked % (self.busy_answers + 1) != 0

        self.asked = 0
        return busy


def test_the_loop_does_idle_host_work_while_it_waits_and_decodes_the_same_tokens() -> None:
    rng = random.Random(5)
    torch.manual_seed(5)
    model, pad = small_bart(0.5), 1
    model.generation_config.eos_token_id = None  # no early end: every wait point is reached
    rules = greedy_rules(model, max_new_tokens=6, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    ids, mask = random_sources(rng, pad, 3, 7)
    ran_at: list[int] = []
    decoder = BusyDevice(model, rules)
    work = IdleHostWork()
    for _ in range(40):
        work.add(lambda: ran_at.append(decoder.asked))
    with torch.inference_mode():
        tokens = decoder.decode(ids, mask, idle_work=work)
        reference = GreedyDecoder(model, rules).decode(ids, mask)
    assert torch.equal(tokens, reference)
    # On a CPU the loop waits before each of tokens 2..6 and before the copy: 6 waits of 2 jobs each.
    assert len(ran_at) == work.done_while_decoding == 12 and work.seconds_while_decoding > 0
    work.run_all()
    assert len(ran_at) == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_recorded_cuda_graphs_decode_the_eager_loops_tokens_batch_after_batch() -> None:
    rng = random.Random(11)
    torch.manual_seed(11)
    model, pad = small_bart(0.5), 1
    model.to("cuda")
    model.generation_config.no_repeat_ngram_size = 2
    rules = greedy_rules(model, max_new_tokens=10, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    graphs, eager = GreedyDecoder(model, rules, step=DecodingStep.RECORDED, keep_shapes=2), GreedyDecoder(model, rules)
    with torch.inference_mode():
        for width in (8, 16, 8, 8):
            ids, mask = random_sources(rng, pad, 4, width)
            ids, mask = ids.cuda(), mask.cuda()
            assert torch.equal(graphs.decode(ids, mask), eager.decode(ids, mask))


def test_rules_the_loop_does_not_reproduce_are_left_to_generate_with_the_reason() -> None:
    model, pad = random_model(random.Random(1))
    model.generation_config.repetition_penalty = 1.3
    reason = greedy_rules(model, max_new_tokens=4, pad_id=pad)
    assert isinstance(reason, str) and "repetition_penalty" in reason
    model.generation_config.repetition_penalty = 1.0
    model.generation_config.bad_words_ids = [[7]]
    reason = greedy_rules(model, max_new_tokens=4, pad_id=pad)
    assert isinstance(reason, str) and "bad_words_ids" in reason
    causal = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB))
    assert greedy_rules(causal, max_new_tokens=4, pad_id=0) == "the model is not an encoder-decoder"


def test_min_new_tokens_replaces_min_length_as_in_generate() -> None:
    model, pad = random_model(random.Random(2))
    model.generation_config.min_length = 8
    model.generation_config.min_new_tokens = 2
    rules = greedy_rules(model, max_new_tokens=4, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    assert (rules.min_length, rules.min_new_tokens) == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["bart", "t5"])
def test_the_step_compiles_with_the_options_eval_compile_uses(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    """What `eval.compile` asks of torch.compile (inductor, mode reduce-overhead, whole graph, static shapes),
    on a CPU, where inductor builds C++ kernels and skips the CUDA graphs: the step lowers and decodes the
    tokens of the eager loop, and a second batch of the same shape compiles nothing new."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    rng = random.Random(8)
    model, pad = random_model(rng)
    while type(model).__name__.lower().startswith(architecture) is False:
        model, pad = random_model(rng)
    model.generation_config.no_repeat_ngram_size, model.generation_config.forced_bos_token_id = 3, 0
    rules = greedy_rules(model, max_new_tokens=10, pad_id=pad)
    assert isinstance(rules, GreedyRules) and rules.no_repeat_ngram_size == 3
    compiled = GreedyDecoder(model, rules, step=DecodingStep.COMPILED, compile_options={"mode": "reduce-overhead"})
    eager = GreedyDecoder(model, rules)
    counters.clear()
    with torch.inference_mode():
        for batch in range(2):
            ids, mask = random_sources(rng, pad, 4, 12)
            assert torch.equal(compiled.decode(ids, mask), eager.decode(ids, mask)), batch
            if batch == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, "the step compiled into more than one graph"
    assert counters["stats"]["unique_graphs"] == graphs, "a batch of the same shape compiled again"
    assert dict(counters["graph_break"]) == {}


def test_token_ids_outside_the_vocabulary_count_as_in_generate() -> None:
    """transformers matches suppressed and EOS ids with `isin` over the vocabulary: -1 or an id past the end
    matches nothing (plain indexing would take -1 as the last token)."""
    rng = random.Random(11)
    torch.manual_seed(11)
    model, pad = small_bart(0.5), 1
    with torch.no_grad():  # make the last token the favourite, so suppressing it by mistake shows
        model.final_logits_bias[0, -1] = 50.0
    model.generation_config.suppress_tokens = [-1, VOCAB + 5]
    model.generation_config.min_length = 4
    model.generation_config.eos_token_id = [2, -1]
    rules = greedy_rules(model, max_new_tokens=6, pad_id=pad)
    assert isinstance(rules, GreedyRules)
    ids, mask = random_sources(rng, pad, 3, 8)
    with torch.inference_mode():
        reference = greedy_reference(model, ids, mask, 6, pad)
        ours = GreedyDecoder(model, rules).decode(ids, mask)
    assert (reference[:, 1:-1] == VOCAB - 1).any()  # the favourite is decoded, not suppressed
    assert same_as(reference, ours, pad)


def test_a_config_that_states_neutral_values_explicitly_keeps_the_loop() -> None:
    model, pad = random_model(random.Random(4))
    generation = model.generation_config
    generation.repetition_penalty, generation.num_return_sequences, generation.output_scores = 1.0, 1, False
    assert isinstance(greedy_rules(model, max_new_tokens=4, pad_id=pad), GreedyRules)
