"""Zero-/few-shot scoring of held-out tasks: classification accuracy (three ways) and ROUGE-L for generation.

Classification records three accuracies; eval.metric picks the primary one. `accuracy`: every option is
scored by its total log-likelihood as the answer to the source and the likeliest is the prediction (rank
classification, as in T0; the sum favours short options). `accuracy_norm`: the same per answer token.
`accuracy_gen`: the greedy answer, credited when it names an accepted answer (InstructDial's own scoring).
Rank classification is jobs/ml/rank.py.
Generation: batched greedy decoding with a KV cache (jobs/ml/generation.py), for encoder-decoders in stl's own
loop (jobs/ml/decoding.py: the same tokens as `generate`, without its per-token host work), else with `generate`;
the score is rouge-score's ROUGE-L F-measure (stemming on, jobs/ml/rouge.py) against the best of the example's
accepted outputs, averaged over examples, on a 0..1 scale (multiply by 100 for the paper's tables).
Both run in batches of similar length that halve when the GPU runs out of memory (jobs/ml/eval_batches.py).
Each task's sources and answer candidates are encoded once; with a cache_dir (STL_HOME/cache) the ids are
kept there, keyed by the data file, task, limits and tokenizer, so evaluating again skips tokenization.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from stl.jobs import axes
from stl.jobs.errors import DataError
from stl.jobs.metrics import ACCURACY, ACCURACY_GEN, ACCURACY_NORM, EXACT_MATCH, ROUGE_L
from stl.jobs.ml.data_cache import load_token_lists, save_token_lists, token_cache_path
from stl.jobs.ml.eval_batches import EvalBatches
from stl.jobs.ml.examples import answer_candidates, correct_options, is_correct, source_text
from stl.jobs.ml.generation import Generator
from stl.jobs.ml.model_inputs import evaluation_length_limits
from stl.jobs.ml.models import (
    bf16_autocast_supported,
    encode_sources,
    encode_targets,
    is_seq2seq,
    load_model_and_tokenizer,
    tokenizer_fingerprint,
)
from stl.jobs.ml.prefetch import IdleHostWork
from stl.jobs.ml.rank import RankClassifier
from stl.jobs.ml.rouge import RougeL
from stl.jobs.ml.sources import read_examples, source_fingerprint
from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TaskType

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stl.jobs.ml.examples import Example
    from stl.jobs.ml.progress import StepReport


@dataclass(frozen=True)
class TaskMetrics:
    task: str
    task_type: str  # "classification" or "generation"
    metric: str  # the primary one: eval.metric for classification, "exact_match" (generated labels), "rougeL"
    value: float
    n: int
    samples: list[dict[str, Any]]  # up to eval.samples of {source, prediction, references}
    metrics: dict[str, float] = field(default_factory=dict)  # every metric recorded, the primary one included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskMetrics:
        # Stages evaluated before `metrics` existed recorded only the primary metric.
        found = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        found.setdefault("metrics", {values["metric"]: values["value"]})
        return cls(**found)


@dataclass
class EvalRun:
    spec: StageSpec  # kind eval, with spec.eval set
    model_dir: Path | None  # a parent stage's model directory; None: evaluate spec.model as it is
    device: str
    should_stop: Callable[[], str | None]  # None, "cancel" or "preempt"; called between batches
    log: Callable[[str], None]
    cache_dir: Path | None = None  # STL_HOME/cache, for cached token ids; None: nothing cached on disk
    # Test-only fault injection: a batch of more rows than this raises torch.OutOfMemoryError("injected").
    oom_over_rows: int | None = None


@dataclass(frozen=True)
class EvalModel:
    """The model an eval stage scores, as loaded, and what batching its inputs needs of it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    bf16_weights: bool
    seq2seq: bool
    pad_id: int
    decoder_start_id: int
    source_limit: int  # tokens
    target_limit: int  # new tokens


def _load_model(cfg: EvalRun, settings: EvalConfig) -> EvalModel:
    import torch

    spec = cfg.spec
    device = torch.device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(spec.model, device=cfg.device, seed=spec.seed, init_from=cfg.model_dir)
    model.eval()
    # Evaluation never steps an optimizer, so on a GPU with native bf16 the weights themselves go to
    # bf16 (as Trainer's bf16_full_eval does) and no autocast is needed: it would cast every weight
    # again at each decoding step, and greedy decoding runs one small step per token. Log-likelihoods
    # are summed in fp32. Elsewhere evaluation runs in fp32.
    bf16_weights = bf16_autocast_supported(device)
    if bf16_weights:
        cast("Any", model).to(dtype=torch.bfloat16)
    pad_id = int(tokenizer.pad_token_id)
    start_id = getattr(model.config, "decoder_start_token_id", None)
    source_limit, target_limit = evaluation_length_limits(model, settings.max_source_length, settings.max_new_tokens)
    return EvalModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        bf16_weights=bf16_weights,
        seq2seq=is_seq2seq(model),
        pad_id=pad_id,
        decoder_start_id=pad_id if start_id is None else int(start_id),
        source_limit=source_limit,
        target_limit=target_limit,
    )


@dataclass(frozen=True)
class _TaskIds:
    """One task's examples as token ids, in example order."""

    sources: list[list[int]]
    candidates: list[list[list[int]]]  # per example, the ids of each answer candidate ([] without options)


def make_rouge_scorer() -> RougeL:
    """A ROUGE-L scorer that remembers the stems of the words it has seen: one per stage."""
    return RougeL()


def rouge_l(prediction: str, references: Iterable[str], scorer: RougeL | None = None) -> float:
    """ROUGE-L F-measure (0..1) of `prediction` against its best-matching reference, as rouge-score's
    `RougeScorer(["rougeL"], use_stemmer=True)` computes it."""
    return (scorer or make_rouge_scorer()).score(prediction, references)


def _references(example: Example) -> list[str]:
    return list(dict.fromkeys((example.output, *example.all_outputs)))


def evaluate(cfg: EvalRun, *, on_step: Callable[[StepReport], None]) -> list[TaskMetrics]:
    """Metrics for every task of the stage, in spec order. Raises StageCanceled/StagePreempted, DataError,
    ModelError."""
    spec = cfg.spec
    if spec.kind != StageKind.eval:
        raise ValueError(f"evaluate() runs eval stages, not {spec.kind.value}")
    if spec.eval is None:
        raise DataError(f"eval stage {spec.stage_id} has no eval settings")
    examples = _first_examples(spec.data, spec.tasks, spec.eval.max_examples)
    scorer = _Scorer(cfg, spec.eval, on_step, total=sum(len(task_examples) for task_examples in examples.values()))
    model = f"{spec.model} from {cfg.model_dir}" if cfg.model_dir else spec.model
    precision = "bf16 weights" if scorer.loaded.bf16_weights else "fp32"
    cfg.log(f"evaluating {model} on {len(spec.tasks)} task(s), {scorer.total} examples, on {cfg.device} ({precision})")
    results = []
    try:
        for task in dict.fromkeys(spec.tasks):
            metrics = scorer.score_task(task, examples[task], scorer.encode_task(task, examples[task]))
            others = ", ".join(f"{name} {value:.4f}" for name, value in metrics.metrics.items()
                               if name != metrics.metric)
            also = f" ({others})" if others else ""
            cfg.log(f"{task}: {metrics.metric} {metrics.value:.4f}{also} over {metrics.n} examples")
            results.append(metrics)
    finally:
        # A worker's stage ends with its process; a caller that evaluates again in the same process (a
        # benchmark, a test) must not find this stage's compiled steps counting against dynamo's limit.
        scorer.generator.release()
    return results


def _first_examples(source: str, tasks: Sequence[str], limit: int) -> dict[str, list[Example]]:
    """The first `limit` examples of each task, in one pass that stops once every task is full."""
    wanted = list(dict.fromkeys(tasks))
    found: dict[str, list[Example]] = {task: [] for task in wanted}
    open_tasks = set(wanted)
    for example in read_examples(source, wanted):
        bucket = found[example.task]
        if len(bucket) < limit:
            bucket.append(example)
            if len(bucket) == limit:
                open_tasks.discard(example.task)
                if not open_tasks:
                    break
    empty = [task for task in wanted if not found[task]]
    if empty:
        raise DataError(f"task(s) {', '.join(empty)} have no examples in {source}")
    return found


class _Scorer:
    """Scores an eval stage's tasks: encodes each (through the token cache), answers it by rank classification
    and greedy generation (jobs/ml/rank.py, jobs/ml/generation.py) and computes its metrics."""

    def __init__(
        self, cfg: EvalRun, settings: EvalConfig, on_step: Callable[[StepReport], None], *, total: int
    ) -> None:
        self.cfg, self.settings, self.total = cfg, settings, total
        self.spec = cfg.spec
        self.loaded = _load_model(cfg, settings)
        self.batches = EvalBatches(cfg, self.loaded.device, rows=settings.batch_size, total=total, on_step=on_step,
                                   on_out_of_memory=lambda: self.generator.release())
        self.generator = Generator(self.loaded, cfg, settings, self.batches)
        self.classifier = RankClassifier(self.loaded, self.batches)
        self.tokenizer_id: str | None = None  # tokenizer_fingerprint(), computed on first use
        self.rouge = make_rouge_scorer()

    # --- token ids ---

    def encode_task(self, task: str, examples: Sequence[Example]) -> _TaskIds:
        """The task's sources and answer candidates as ids, from the token cache when it has them."""
        path = None
        fingerprint = None if self.cfg.cache_dir is None else source_fingerprint(self.spec.data)
        if self.cfg.cache_dir is not None and fingerprint is not None:
            # The examples are the first max_examples of the task in the file, so the file and the task
            # decide them; the rest decides how they are encoded.
            key = {
                "kind": "eval",
                "data": fingerprint,
                "task": task,
                "max_examples": self.settings.max_examples,
                **axes.token_key_fields(self.spec, axes.EVAL_TOKENS),  # instructions
                "tokenizer": self._tokenizer_id(),
                "source_limit": self.loaded.source_limit,
                "target_limit": self.loaded.target_limit,
                "seq2seq": self.loaded.seq2seq,
            }
            path = token_cache_path(self.cfg.cache_dir, key)
            cached = load_token_lists(path)
            ids = None if cached is None else _task_ids_from_lists(cached, len(examples))
            if ids is not None:
                self.cfg.log(f"token cache hit: {task}, {len(examples)} examples ({path})")
                return ids
        ids = self._encode_examples(examples)
        if path is not None:
            try:
                save_token_lists(path, _task_ids_to_lists(ids), description=f"eval {task}")
                self.cfg.log(f"token cache miss: {task}, {len(examples)} examples; wrote {path}")
            except OSError as e:
                self.cfg.log(f"token cache miss: {task}; could not write {path}: {e}")
        return ids

    def _tokenizer_id(self) -> str:
        # Hashing a large vocabulary takes tens of milliseconds: once per stage, not per task.
        if self.tokenizer_id is None:
            self.tokenizer_id = tokenizer_fingerprint(self.loaded.tokenizer)
        return self.tokenizer_id

    def _encode_examples(self, examples: Sequence[Example]) -> _TaskIds:
        loaded = self.loaded
        texts = [source_text(example, self.spec.instructions) for example in examples]
        sources = encode_sources(loaded.tokenizer, texts, loaded.source_limit, seq2seq=loaded.seq2seq)
        candidates = [answer_candidates(example) for example in examples]
        flat = [candidate for options in candidates for candidate in options]
        encoded = encode_targets(loaded.tokenizer, flat, loaded.target_limit, seq2seq=loaded.seq2seq) if flat else []
        grouped: list[list[list[int]]] = []
        first = 0
        for options in candidates:
            grouped.append(encoded[first : first + len(options)])
            first += len(options)
        return _TaskIds(sources=sources, candidates=grouped)

    # --- tasks ---

    def score_task(self, task: str, examples: list[Example], ids: _TaskIds) -> TaskMetrics:
        with_options = [i for i, example in enumerate(examples) if example.options is not None]
        if not with_options:
            return self._score_generation(task, examples, ids)
        # Examples that list options are rank-classified, two ways. Every example is also answered by greedy
        # generation (accuracy_gen); an example without options can only be, and counts that way throughout.
        answers = self.generator.generate(examples, range(len(examples)), ids.sources)
        by_generation = [float(is_correct(e, answer)) for e, answer in zip(examples, answers, strict=True)]
        predictions = list(answers)
        per_metric = {ACCURACY: list(by_generation), ACCURACY_NORM: list(by_generation), ACCURACY_GEN: by_generation}
        primary = self.settings.metric
        ranked = self.classifier.classify(examples, with_options, ids.sources, ids.candidates)
        for i, (by_sum, by_token) in ranked.items():
            correct = correct_options(examples[i])
            per_metric[ACCURACY][i] = float(by_sum in correct)
            per_metric[ACCURACY_NORM][i] = float(by_token in correct)
            if primary != ACCURACY_GEN:  # the samples show the answer the primary metric scored
                chosen = by_token if primary == ACCURACY_NORM else by_sum
                predictions[i] = answer_candidates(examples[i])[chosen]
        if len(with_options) < len(examples):  # some rows list no options: one mixed measure, as before
            return self._metrics(task, TaskType.classification, EXACT_MATCH, {EXACT_MATCH: per_metric[ACCURACY]},
                                 examples, predictions)
        return self._metrics(task, TaskType.classification, primary, per_metric, examples, predictions)

    def _score_generation(self, task: str, examples: list[Example], ids: _TaskIds) -> TaskMetrics:
        # Each batch's answers are scored while the GPU decodes the next batch; the last batch's after it.
        scores: dict[int, float] = {}
        scoring = IdleHostWork()

        def score_later(i: int, prediction: str) -> None:
            scoring.add(lambda: scores.__setitem__(i, rouge_l(prediction, _references(examples[i]), self.rouge)))

        started = time.perf_counter()
        predictions = self.generator.generate(
            examples, range(len(examples)), ids.sources, on_answer=score_later, idle_work=scoring
        )
        generated = time.perf_counter()
        scoring.run_all()
        # Where a stage's time goes, e.g. to see whether eval.compile pays for its start-up.
        alongside = ""
        if scoring.done_while_decoding:  # only on a GPU: a CPU has run each step by the time it returns
            alongside = f" after them and {scoring.seconds_while_decoding:.2f} s while the GPU decoded"
        self.cfg.log(
            f"{task}: generated {len(predictions)} answers in {generated - started:.2f} s "
            f"({len(predictions) / max(generated - started, 1e-9):.0f}/s), "
            f"ROUGE-L in {time.perf_counter() - generated:.2f} s{alongside}"
        )
        values = [scores[i] for i in range(len(examples))]
        return self._metrics(task, TaskType.generation, ROUGE_L, {ROUGE_L: values}, examples, predictions)

    def _metrics(
        self,
        task: str,
        task_type: TaskType,
        metric: str,
        values: dict[str, list[float]],
        examples: list[Example],
        predictions: list[str],
    ) -> TaskMetrics:
        samples = [
            {
                "source": source_text(example, self.spec.instructions),
                "prediction": prediction,
                "references": _references(example),
            }
            for example, prediction in list(zip(examples, predictions, strict=True))[: self.settings.samples]
        ]
        means = {name: sum(per_example) / len(per_example) for name, per_example in values.items()}
        return TaskMetrics(
            task=task,
            task_type=task_type.value,
            metric=metric,
            value=means[metric],
            n=len(examples),
            samples=samples,
            metrics=means,
        )

def _task_ids_to_lists(ids: _TaskIds) -> dict[str, list[list[int]]]:
    return {
        "sources": ids.sources,
        "candidates": [candidate for options in ids.candidates for candidate in options],
        "candidate_counts": [[len(options) for options in ids.candidates]],
    }


def _task_ids_from_lists(lists: dict[str, list[list[int]]], examples: int) -> _TaskIds | None:
    """What `_task_ids_to_lists` made, or None if it does not describe `examples` examples."""
    try:
        sources, flat, [counts] = lists["sources"], lists["candidates"], lists["candidate_counts"]
    except (KeyError, ValueError):
        return None
    if len(sources) != examples or len(counts) != examples or sum(counts) != len(flat):
        return None
    grouped: list[list[list[int]]] = []
    first = 0
    for count in counts:
        grouped.append(flat[first : first + count])
        first += count
    return _TaskIds(sources=sources, candidates=grouped)
