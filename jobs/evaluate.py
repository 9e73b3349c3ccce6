"""Zero-/few-shot scoring of held-out tasks: classification accuracy (three ways) and ROUGE-L for generation.

Classification records three accuracies; eval.metric picks the primary one. `accuracy`: every option is
scored by its total log-likelihood as the answer to the source and the likeliest is the prediction (rank
classification, as in T0; the sum favours short options). `accuracy_norm`: the same per answer token.
`accuracy_gen`: the greedy answer, credited when it names an accepted answer (InstructDial's own scoring).
For encoder-decoder models the encoder runs once per example and all of its options go through the decoder
in batches.
Generation: batched greedy decoding with a KV cache, for encoder-decoders in stl's own loop
(jobs/decoding.py: the same tokens as `generate`, without its per-token host work), else with `generate`;
the score is rouge-score's ROUGE-L F-measure (stemming on, jobs/rouge.py) against the best of the example's
accepted outputs, averaged over examples, on a 0..1 scale (multiply by 100 for the paper's tables).
Each task's sources and answer candidates are encoded once; with a cache_dir (STL_HOME/cache) the ids are
kept there, keyed by the data file, task, limits and tokenizer, so evaluating again skips tokenization.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from jobs import data as data_lib
from jobs.acceleration import (
    bucketed_length,
    caused_by_out_of_memory,
    compile_pays_on,
    cuda_graph_skips,
    length_buckets,
    prepare_compile,
)
from jobs.decoding import GreedyDecoder, IdleHostWork, greedy_rules
from jobs.errors import DataError, OutOfMemory, StageCanceled, StagePreempted
from jobs.model_inputs import IGNORE_INDEX, evaluation_length_limits
from jobs.models import (
    bf16_autocast_supported,
    encode_sources,
    encode_targets,
    is_seq2seq,
    load_model_and_tokenizer,
    pad_sequences,
    tokenizer_fingerprint,
)
from jobs.progress import StepReport
from jobs.rouge import RougeL
from jobs.specs import EvalConfig, StageKind, StageSpec, TaskType

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

    import torch

    from jobs.data import Example

ACCURACY = "accuracy"  # rank classification by summed log-likelihood (T0)
ACCURACY_NORM = "accuracy_norm"  # rank classification by log-likelihood per answer token (lm-eval's acc_norm)
ACCURACY_GEN = "accuracy_gen"  # greedy generation matched against any accepted answer (InstructDial's run_eval)
CLASSIFICATION_METRICS = (ACCURACY, ACCURACY_NORM, ACCURACY_GEN)
EXACT_MATCH = "exact_match"
ROUGE_L = "rougeL"


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
class _TaskIds:
    """One task's examples as token ids, in example order."""

    sources: list[list[int]]
    candidates: list[list[list[int]]]  # per example, the ids of each answer candidate ([] without options)


def sequence_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(label) for each row; positions labelled IGNORE_INDEX count for nothing.

    logits: [rows, positions, vocab] predicting labels: [rows, positions].
    """
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    known = labels != IGNORE_INDEX
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * known).sum(dim=-1)


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score; the first one wins ties."""
    if not scores:
        raise ValueError("no options to choose from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


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
    precision = "bf16 weights" if scorer.bf16_weights else "fp32"
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
        if scorer.decoder is not None:
            scorer.decoder.release()
    return results


def _first_examples(source: str, tasks: Sequence[str], limit: int) -> dict[str, list[Example]]:
    """The first `limit` examples of each task, in one pass that stops once every task is full."""
    wanted = list(dict.fromkeys(tasks))
    found: dict[str, list[Example]] = {task: [] for task in wanted}
    open_tasks = set(wanted)
    for example in data_lib.read_examples(source, wanted):
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
    def __init__(
        self, cfg: EvalRun, settings: EvalConfig, on_step: Callable[[StepReport], None], *, total: int
    ) -> None:
        import torch

        self.cfg, self.settings, self.on_step, self.total = cfg, settings, on_step, total
        self.spec = cfg.spec
        self.device = torch.device(cfg.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            self.spec.model, device=cfg.device, seed=self.spec.seed, init_from=cfg.model_dir
        )
        self.model.eval()
        # Evaluation never steps an optimizer, so on a GPU with native bf16 the weights themselves go to
        # bf16 (as Trainer's bf16_full_eval does) and no autocast is needed: it would cast every weight
        # again at each decoding step, and greedy decoding runs one small step per token. Log-likelihoods
        # are summed in fp32. Elsewhere evaluation runs in fp32.
        self.bf16_weights = bf16_autocast_supported(self.device)
        if self.bf16_weights:
            cast("Any", self.model).to(dtype=torch.bfloat16)
        self.seq2seq = is_seq2seq(self.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        start_id = getattr(self.model.config, "decoder_start_token_id", None)
        self.decoder_start_id = self.pad_id if start_id is None else int(start_id)
        self.source_limit, self.target_limit = evaluation_length_limits(
            self.model, settings.max_source_length, settings.max_new_tokens
        )
        self.source_buckets = self._static_decoding_buckets() if settings.compile else None
        self.decoder: GreedyDecoder | None = None  # stl's decoding loop, set up by the first _generate
        self.generation_prepared = False
        self.decoding_graphs_confirmed = False
        self.tokenizer_id: str | None = None  # tokenizer_fingerprint(), computed on first use
        self.rouge = make_rouge_scorer()
        self.batch_rows = settings.batch_size  # halved for the rest of the stage if the GPU runs out of memory
        self.done = 0
        self.started = time.perf_counter()

    def _static_decoding_buckets(self) -> tuple[int, ...] | None:
        """Set up `eval.compile`: the padded source lengths of static decoding, or None where it is skipped.

        The decoding step is compiled (CUDA graphs) over a static KV cache, so its shapes must repeat:
        sources are padded to length buckets and every batch to `batch_size` rows, and each bucket
        compiles once (tens of seconds, then from the cache under STL_HOME/cache).
        """
        if not compile_pays_on(self.device):
            self.cfg.log(f"eval.compile skipped: torch.compile only pays on CUDA, and this stage runs on {self.device}")
            return None
        if not getattr(self.model, "_can_compile_fullgraph", False):
            # transformers marks the architectures whose decoding step compiles; others may fail mid-stage.
            self.cfg.log(
                f"eval.compile skipped: transformers does not mark {type(self.model).__name__} as compilable; "
                "decoding with the dynamic KV cache"
            )
            return None
        buckets = length_buckets(self.source_limit)
        where = prepare_compile(self.cfg.cache_dir, shapes=2 * len(buckets))  # room for dynamic recompiles
        self.cfg.log(
            f"generation decodes with a static KV cache compiled by torch.compile: sources padded to "
            f"{'/'.join(map(str, buckets))} tokens, batches to {self.settings.batch_size} rows; caches in {where}"
        )
        return buckets

    def _greedy_decoder(self) -> GreedyDecoder | None:
        """stl's own decoding loop (jobs/decoding.py) where it reproduces `generate`, else None (then
        `generate` decodes, and the log says why)."""
        if not self.seq2seq:
            return None
        rules = greedy_rules(self.model, max_new_tokens=self.target_limit, pad_id=self.pad_id)
        if isinstance(rules, str):
            self.cfg.log(f"generation runs transformers' generate, not stl's decoding loop: {rules}")
            return None
        compiled = self.source_buckets is not None
        # On a GPU the eager step is recorded as a CUDA graph per batch shape: no compile, and one launch
        # per token instead of hundreds (the step's host work, not the GPU, set eager decoding's pace).
        graphs = not compiled and records_decoding_graphs(self.device)
        # Batches come sorted by length, so a shape's batches follow one another; the second shape kept
        # covers a batch whose tokens sort it into the bucket before.
        keep_shapes = len(self.source_buckets) if self.source_buckets is not None else 2 if graphs else 1
        try:
            decoder = GreedyDecoder(
                self.model,
                rules,
                compile_step=compiled,
                compile_options={"mode": "reduce-overhead"},
                cuda_graphs=graphs,
                keep_shapes=keep_shapes,
            )
        except (ImportError, TypeError, AttributeError) as e:  # a transformers release without these caches
            self.cfg.log(f"generation runs transformers' generate, not stl's decoding loop: {e}")
            return None
        self.cfg.log(
            "generation decodes greedily in stl's own loop (the tokens of transformers' generate, without its "
            "per-token host work)"
            + (", its step compiled by torch.compile (CUDA graphs)" if compiled else "")
            + (
                f", its step recorded as a CUDA graph once per batch shape: sources padded to "
                f"{'/'.join(map(str, length_buckets(self.source_limit)))} tokens, batches to "
                f"{self.batch_rows} rows" if graphs else ""
            )
        )
        return decoder

    def _padding_buckets(self) -> tuple[int, ...] | None:
        """The source lengths each generation batch is padded to (its rows to a full batch too), or None
        to pad to the batch's longest source only. A compiled step and a recorded CUDA graph are reused
        only on the shape they were made for: a few fixed shapes make them repeat. Each recording runs the
        step on the host once more, eagerly, while padding costs the encoder a few tokens per source, a
        large cheap matrix product on a GPU."""
        if self.source_buckets is not None:
            return self.source_buckets
        if self.decoder is not None and self.decoder.cuda_graphs:
            return length_buckets(self.source_limit)
        return None

    # --- bookkeeping ---

    def _between_batches(self, finished: int) -> None:
        self.done += finished
        elapsed = time.perf_counter() - self.started
        self.on_step(
            StepReport(
                step=self.done,
                total=self.total,
                loss=math.nan,
                learning_rate=0.0,
                samples_per_s=self.done / max(elapsed, 1e-9),
                tokens_per_s=0.0,
                elapsed_s=elapsed,
                micro_batch=self.batch_rows,
                grad_accum=1,
                phase="eval",
            )
        )
        request = self.cfg.should_stop()
        if request == "cancel":
            raise StageCanceled(f"eval stage {self.spec.stage_id} was canceled")
        if request == "preempt":
            raise StagePreempted(f"eval stage {self.spec.stage_id} was interrupted and will start again")

    def _batches(self, examples: Sequence[Example], positions: Sequence[int]) -> list[list[int]]:
        """`positions` (into `examples`) in batches of similar source length (less padding)."""
        order = sorted(
            positions,
            key=lambda i: (len(data_lib.source_text(examples[i], self.spec.instructions)), i),
        )
        size = self.batch_rows
        return [order[first : first + size] for first in range(0, len(order), size)]

    def _each_batch(self, batches: list[list[int]], work: Callable[[list[int]], None]) -> None:
        """`work` on each batch. Out of GPU memory, the batch size halves for the rest of the stage and the
        batch is tried again in smaller ones, down to one example; only a single example that does not fit fails."""
        import torch

        pending = list(batches)
        while pending:
            batch = pending.pop(0)
            try:
                if self.cfg.oom_over_rows is not None and len(batch) > self.cfg.oom_over_rows:
                    raise torch.OutOfMemoryError("injected")
                work(batch)
                continue
            except Exception as e:
                if not caused_by_out_of_memory(e):
                    raise
                if len(batch) == 1:
                    raise OutOfMemory(
                        f"eval stage {self.spec.stage_id} ran out of GPU memory on a single example of "
                        f"{self.spec.model}; lower eval.max_source_length or eval.max_new_tokens, or free the GPU"
                    ) from e
            # Out of the except block: the failed attempt's tensors are garbage by now.
            if self.decoder is not None:
                self.decoder.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.batch_rows = max(1, min(self.batch_rows, len(batch)) // 2)
            self.cfg.log(f"out of GPU memory with a batch of {len(batch)}; going on with batches of "
                         f"{self.batch_rows} (set eval.batch_size to {self.batch_rows} to start there)")
            rest = [*batch, *(i for later in pending for i in later)]
            pending = [rest[first : first + self.batch_rows] for first in range(0, len(rest), self.batch_rows)]

    # --- token ids ---

    def encode_task(self, task: str, examples: Sequence[Example]) -> _TaskIds:
        """The task's sources and answer candidates as ids, from the token cache when it has them."""
        path = None
        fingerprint = None if self.cfg.cache_dir is None else data_lib.source_fingerprint(self.spec.data)
        if self.cfg.cache_dir is not None and fingerprint is not None:
            # The examples are the first max_examples of the task in the file, so the file and the task
            # decide them; the rest decides how they are encoded.
            key = {
                "kind": "eval",
                "data": fingerprint,
                "task": task,
                "max_examples": self.settings.max_examples,
                "instructions": self.spec.instructions,
                "tokenizer": self._tokenizer_id(),
                "source_limit": self.source_limit,
                "target_limit": self.target_limit,
                "seq2seq": self.seq2seq,
            }
            path = data_lib.token_cache_path(self.cfg.cache_dir, key)
            cached = data_lib.load_token_lists(path)
            ids = None if cached is None else _task_ids_from_lists(cached, len(examples))
            if ids is not None:
                self.cfg.log(f"token cache hit: {task}, {len(examples)} examples ({path})")
                return ids
        ids = self._encode_examples(examples)
        if path is not None:
            try:
                data_lib.save_token_lists(path, _task_ids_to_lists(ids), description=f"eval {task}")
                self.cfg.log(f"token cache miss: {task}, {len(examples)} examples; wrote {path}")
            except OSError as e:
                self.cfg.log(f"token cache miss: {task}; could not write {path}: {e}")
        return ids

    def _tokenizer_id(self) -> str:
        # Hashing a large vocabulary takes tens of milliseconds: once per stage, not per task.
        if self.tokenizer_id is None:
            self.tokenizer_id = tokenizer_fingerprint(self.tokenizer)
        return self.tokenizer_id

    def _encode_examples(self, examples: Sequence[Example]) -> _TaskIds:
        texts = [data_lib.source_text(example, self.spec.instructions) for example in examples]
        sources = encode_sources(self.tokenizer, texts, self.source_limit, seq2seq=self.seq2seq)
        candidates = [data_lib.answer_candidates(example) for example in examples]
        flat = [candidate for options in candidates for candidate in options]
        encoded = encode_targets(self.tokenizer, flat, self.target_limit, seq2seq=self.seq2seq) if flat else []
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
            # Each batch's answers are scored while the GPU decodes the next batch; the last batch's after it.
            scores: dict[int, float] = {}
            scoring = IdleHostWork()

            def score_later(i: int, prediction: str) -> None:
                scoring.add(lambda: scores.__setitem__(i, rouge_l(prediction, _references(examples[i]), self.rouge)))

            started = time.perf_counter()
            predictions = self._generate(examples, range(len(examples)), ids, on_answer=score_later, idle_work=scoring)
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
        # Examples that list options are rank-classified, two ways. Every example is also answered by greedy
        # generation (accuracy_gen); an example without options can only be, and counts that way throughout.
        answers = self._generate(examples, range(len(examples)), ids)
        by_generation = [float(data_lib.is_correct(e, answer)) for e, answer in zip(examples, answers, strict=True)]
        predictions = list(answers)
        per_metric = {ACCURACY: list(by_generation), ACCURACY_NORM: list(by_generation), ACCURACY_GEN: by_generation}
        primary = self.settings.metric
        for i, (by_sum, by_token) in self._classify(examples, with_options, ids).items():
            correct = data_lib.correct_options(examples[i])
            per_metric[ACCURACY][i] = float(by_sum in correct)
            per_metric[ACCURACY_NORM][i] = float(by_token in correct)
            if primary != ACCURACY_GEN:  # the samples show the answer the primary metric scored
                chosen = by_token if primary == ACCURACY_NORM else by_sum
                predictions[i] = data_lib.answer_candidates(examples[i])[chosen]
        if len(with_options) < len(examples):  # some rows list no options: one mixed measure, as before
            return self._metrics(task, TaskType.classification, EXACT_MATCH, {EXACT_MATCH: per_metric[ACCURACY]},
                                 examples, predictions)
        return self._metrics(task, TaskType.classification, primary, per_metric, examples, predictions)

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
                "source": data_lib.source_text(example, self.spec.instructions),
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

    # --- rank classification ---

    def _classify(
        self, examples: Sequence[Example], positions: Sequence[int], ids: _TaskIds
    ) -> dict[int, tuple[int, int]]:
        """For each example at `positions`, by position: the likeliest option by summed log-likelihood, and
        by log-likelihood per answer token (which does not favour short options)."""
        import torch

        predictions: dict[int, tuple[int, int]] = {}

        def classify(batch: list[int]) -> None:
            scores = self._option_scores([ids.sources[i] for i in batch], [ids.candidates[i] for i in batch])
            for i, example_scores in zip(batch, scores, strict=True):
                lengths = [max(len(candidate), 1) for candidate in ids.candidates[i]]
                per_token = [score / length for score, length in zip(example_scores, lengths, strict=True)]
                predictions[i] = (best_option(example_scores), best_option(per_token))
            self._between_batches(len(batch))

        with torch.inference_mode():
            self._each_batch(self._batches(examples, positions), classify)
        return predictions

    def _option_scores(self, sources: list[list[int]], candidates: Sequence[list[list[int]]]) -> list[list[float]]:
        """Log-likelihood of each candidate given its source. The encoder (seq2seq) runs once per source;
        (source, candidate) pairs go through the decoder, or the causal LM, `batch_size` at a time."""
        import torch

        owners = [row for row, options in enumerate(candidates) for _ in options]
        options = [option for opts in candidates for option in opts]
        chunk = self.batch_rows
        flat_scores: list[torch.Tensor] = []
        if self.seq2seq:
            encoder_ids = pad_sequences(sources, self.pad_id).to(self.device)
            encoder_mask = pad_sequences([[1] * len(s) for s in sources], 0).to(self.device)
            encoded = self.model.get_encoder()(input_ids=encoder_ids, attention_mask=encoder_mask)
            for first in range(0, len(options), chunk):
                rows = torch.tensor(owners[first : first + chunk], device=self.device)
                targets = options[first : first + chunk]
                labels = pad_sequences(targets, IGNORE_INDEX).to(self.device)
                decoder_ids = pad_sequences([[self.decoder_start_id] + t[:-1] for t in targets], self.pad_id)
                logits = self.model(
                    encoder_outputs=(encoded.last_hidden_state.index_select(0, rows),),
                    attention_mask=encoder_mask.index_select(0, rows),
                    decoder_input_ids=decoder_ids.to(self.device),
                    use_cache=False,
                ).logits
                flat_scores.append(sequence_log_likelihoods(logits, labels))
        else:
            for first in range(0, len(options), chunk):
                pairs = list(zip(owners[first : first + chunk], options[first : first + chunk], strict=True))
                input_ids = pad_sequences([sources[row] + option for row, option in pairs], self.pad_id)
                mask = pad_sequences([[1] * (len(sources[row]) + len(option)) for row, option in pairs], 0)
                labels = pad_sequences(
                    [[IGNORE_INDEX] * len(sources[row]) + option for row, option in pairs], IGNORE_INDEX
                ).to(self.device)
                logits = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                ).logits
                flat_scores.append(sequence_log_likelihoods(logits[:, :-1], labels[:, 1:]))
        flat = torch.cat(flat_scores).tolist()  # one host sync per batch of examples
        scores: list[list[float]] = [[] for _ in sources]
        for row, score in zip(owners, flat, strict=True):
            scores[row].append(score)
        return scores

    # --- generation ---

    def _log_cuda_graphs(self, width: int | None, skips_before: int) -> None:
        """Say once that the decoding step replays CUDA graphs (recorded or compiled), and whenever a
        new bucket's compiled graph falls back to plain compiled kernels (inductor counts that when it
        compiles)."""
        if cuda_graph_skips() > skips_before:
            self.cfg.log(
                f"the decoding step for {width}-token sources runs without CUDA graphs (compiled kernels only); "
                "set TORCH_LOGS=cudagraphs to see why"
            )
        elif not self.decoding_graphs_confirmed:
            self.cfg.log("CUDA graphs in use: each decoded token replays the recorded decoding step")
        self.decoding_graphs_confirmed = True

    def _generate(
        self,
        examples: Sequence[Example],
        positions: Sequence[int],
        ids: _TaskIds,
        *,
        on_answer: Callable[[int, str], None] | None = None,
        idle_work: IdleHostWork | None = None,
    ) -> list[str]:
        """Greedy continuation of the source of each example at `positions` (in that order), decoded without
        special tokens. `on_answer(position, answer)` hears each one as its batch ends; `idle_work` runs
        while stl's decoding loop waits for the GPU."""
        import torch

        found: dict[int, str] = {}
        if not self.generation_prepared:
            self.decoder, self.generation_prepared = self._greedy_decoder(), True

        def generate(batch: list[int]) -> None:
            sources = [ids.sources[i] for i in batch]
            width, static = None, {}
            buckets = self._padding_buckets()
            if buckets is not None:
                # Fixed shapes for the compiled step or recorded graph: a bucket's width, and a full batch
                # (copies of the last source fill it; their outputs are dropped below).
                width = bucketed_length(max(len(s) for s in sources), buckets)
                sources = sources + [sources[-1]] * (self.batch_rows - len(sources))
            if self.source_buckets is not None:
                static = {"cache_implementation": "static"}  # for generate, where stl's loop is not used
            # Causal LMs continue from the right end, so they are padded on the left.
            left = not self.seq2seq
            input_ids = pad_sequences(sources, self.pad_id, left=left, width=width).to(self.device)
            mask = pad_sequences([[1] * len(s) for s in sources], 0, left=left, width=width).to(self.device)
            generated = self._decode(input_ids, mask, width, idle_work) if self.decoder is not None else None
            if generated is None:
                generated = cast("Any", self.model).generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=self.target_limit,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=self.pad_id,
                    **static,
                )
            generated = generated[: len(batch)]
            if not self.seq2seq:
                generated = generated[:, input_ids.size(1) :]
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                found[i] = text.strip()
                if on_answer is not None:
                    on_answer(i, found[i])
            self._between_batches(len(batch))

        with torch.inference_mode():
            self._each_batch(self._batches(examples, positions), generate)
        if self.decoder is not None and not self.decoder.compiled:
            self.decoder.release()  # the memory goes back to classification; a compiled step keeps its shapes
        return [found[i] for i in positions]

    def _decode(
        self, input_ids: torch.Tensor, mask: torch.Tensor, width: int | None, idle_work: IdleHostWork | None = None
    ) -> torch.Tensor | None:
        """stl's decoding loop on one batch, or None where the stage has just given it up for `generate`.

        Should the loop fail other than by running out of memory, the stage logs why and goes on with
        the next way down: a compiled step is replaced by the eager loop, the eager loop by transformers'
        `generate`. Both give the same tokens; only the speed is lost."""
        assert self.decoder is not None
        skips = cuda_graph_skips()
        try:
            generated = self.decoder.decode(input_ids, mask, idle_work=idle_work)
        except Exception as e:
            if caused_by_out_of_memory(e):
                raise
            failed, rules = self.decoder, self.decoder.rules
            failed.release()
            if failed.compiled or failed.cuda_graphs:
                what = "the compiled decoding step"
                if not failed.compiled:
                    what = "recording the decoding step as a CUDA graph"
                self.cfg.log(f"{what} failed ({_root_reason(e)}); decoding eagerly for the rest of the stage")
                self.decoder = GreedyDecoder(self.model, rules)
                return self._decode(input_ids, mask, width, idle_work)
            self.cfg.log(f"stl's decoding loop failed ({_root_reason(e)}); "
                         "decoding with transformers' generate for the rest of the stage")
            self.decoder = None
            return None
        # Only where the step after the first ran (with one new token it never does).
        if (self.decoder.compiled or self.decoder.cuda_graphs) and self.decoder.rules.max_new_tokens > 1:
            self._log_cuda_graphs(width, skips)
        return generated


def records_decoding_graphs(device: torch.device) -> bool:
    """Whether eval stages on `device` record their decoding step as CUDA graphs (without eval.compile)."""
    return device.type == "cuda"


def _root_reason(error: BaseException) -> str:
    """The innermost cause as `Type: first line` (torch.compile wraps what its backend raised)."""
    root = error
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    return f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:300]}"


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
