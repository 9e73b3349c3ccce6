"""The training loop for `mtl` and `finetune` stages: a plain loop in the spirit of nanoGPT.

One optimizer step consumes one batch of `batch_size` examples, split into `grad_accum` micro-batches.
The loss is the mean over all target tokens of the batch, however it is split, so halving the
micro-batch after an out-of-memory error keeps the effective batch (and the objective) unchanged.

Checkpoints go to workdir/checkpoint (see jobs.checkpoint: the newest two are kept, each written whole;
a damaged one is skipped for the one before). A finished stage has workdir/model (see
jobs.models.save_model) and workdir/done.json; its checkpoints are deleted then.

On CUDA the step runs under bf16 autocast (where the GPU has native bf16) with fused AdamW, and reads the
loss back to the host only on report steps. With `train.compile` the model goes through torch.compile
(CUDA only; skipped with a log line elsewhere), inductor's caches live under STL_HOME/cache/inductor so
later stages and runs reuse compiled kernels, and sequences are padded to fixed length buckets so a new
batch shape does not trigger a recompile (see jobs.acceleration.length_buckets); `train.compile: reduce-overhead` also
replays each micro-batch's forward and backward as CUDA graphs. A background thread (jobs/prefetch.py) makes
the next batches while the step runs.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from jobs import data as data_lib
from jobs.acceleration import (
    bucketed_length,
    caused_by_out_of_memory,
    compile_pays_on,
    cuda_graph_skips,
    length_buckets,
    model_flops_utilization,
    peak_flops,
    prepare_compile,
    release_accelerator_memory,
)
from jobs.checkpoint import STATE_FORMAT, Checkpoint, CheckpointStore
from jobs.durable import write_atomically
from jobs.errors import DataError, OutOfMemory, StageCanceled, StagePreempted
from jobs.layout import DONE_FILE, MODEL_DIR
from jobs.model_inputs import IGNORE_INDEX, training_length_limits
from jobs.models import (
    autocast_for,
    encode_sources,
    encode_targets,
    is_seq2seq,
    load_model_and_tokenizer,
    pad_sequences,
    save_model,
    tokenizer_fingerprint,
)
from jobs.prefetch import Prefetcher
from jobs.progress import StepReport
from jobs.specs import StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path

    import torch

    from jobs.data import Example

REPORT_EVERY = 10  # read the loss (a host sync) only this often
WINDOW_BATCHES = 50  # length-grouping window, in batches (fewer when the data is small)
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class OomRetry:
    step: int  # the optimizer step that ran out of memory
    micro_batch: int  # before
    new_micro_batch: int
    new_grad_accum: int
    restarted_from: int  # the step training went back to (0: from scratch)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    final_loss: float
    micro_batch: int
    grad_accum: int
    oom_retries: list[OomRetry]
    resumed_from: int | None  # the checkpoint step this call started from, if any
    samples_per_s: float  # over the steps run by this call
    tokens_per_s: float = 0.0  # source + target tokens (no padding) per second, over the steps run by this call
    mfu: float | None = None  # model FLOP utilisation over the steps run by this call; see StepReport.mfu

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["oom_retries"] = [retry.to_dict() for retry in self.oom_retries]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOutcome:
        # Fields added later (tokens_per_s, mfu) keep their defaults when reading an older done.json.
        fields = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        fields["oom_retries"] = [OomRetry(**retry) for retry in fields["oom_retries"]]
        return cls(**fields)


@dataclass
class TrainRun:
    spec: StageSpec  # kind mtl or finetune, with spec.train set
    workdir: Path
    init_from: Path | None  # a parent stage's model directory; None: start from spec.model
    device: str
    # Returns None, "cancel" or "preempt"; called before every step, so it must be cheap.
    should_stop: Callable[[], str | None]
    log: Callable[[str], None]
    # Fault injection: the first time this (1-based) optimizer step is reached in a train() call, raise
    # torch.OutOfMemoryError("injected"), as a real OOM would. Fires once per call, so a batch of more than
    # one example shows a halving and then completes, and a batch of one shows the clear failure.
    oom_at_step: int | None = None
    # STL_HOME/cache: inductor's compile caches and cached token ids of few-shot sets and row indexes go
    # here. None: nothing is cached on disk (library use, tests).
    cache_dir: Path | None = None
    # Batches drawn, tokenized and padded ahead of the step, in a background thread, where a stage tokenizes
    # per batch (MTL); 0: always in the step's own thread. The batches are the same either way (a benchmark
    # and a test compare the two).
    prefetch_batches: int = 2


@dataclass(frozen=True)
class _Plan:
    micro_batch: int
    grad_accum: int  # micro-batches per optimizer step

    @classmethod
    def for_micro_batch(cls, batch_size: int, micro_batch: int) -> _Plan:
        micro_batch = max(1, min(micro_batch, batch_size))
        return cls(micro_batch=micro_batch, grad_accum=math.ceil(batch_size / micro_batch))


@dataclass(frozen=True)
class _OutOfMemoryAt:
    step: int


@dataclass
class _OomInjection:
    at_step: int | None
    fired: bool = False

    def fires_at(self, step: int) -> bool:
        if self.at_step == step and not self.fired:
            self.fired = True
            return True
        return False


@dataclass
class _Encoded:
    """One micro-batch on the host: padded tensors plus counts for the throughput figures."""

    tensors: dict[str, torch.Tensor]
    target_tokens: int
    tokens: int
    samples: int


class _ShapesSeen:
    """The distinct tensor shapes of micro-batches met so far."""

    def __init__(self) -> None:
        self.seen: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()

    def first_sight(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether this micro-batch's shapes are new (and remember them)."""
        key = tuple(sorted((name, tuple(tensor.shape)) for name, tensor in tensors.items()))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@dataclass
class _Progress:
    samples: int = 0
    tokens: int = 0
    steps: int = 0
    since: float = field(default_factory=time.perf_counter)


def train(cfg: TrainRun, *, on_step: Callable[[StepReport], None]) -> TrainOutcome:
    """Train the stage to completion (resuming from its checkpoint if there is one).

    Raises StageCanceled, StagePreempted (after checkpointing), OutOfMemory, DataError, ModelError.
    """
    spec = cfg.spec
    settings = _train_settings(spec)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    finished = _finished_outcome(cfg)
    if finished is not None:
        cfg.log(f"stage {spec.stage_id} already trained ({finished.steps} steps); reusing its model")
        return finished
    store = CheckpointStore(cfg.workdir, spec.stage_id, cfg.log)
    checkpoint = _resume_point(store, cfg)
    if checkpoint is None:
        plan = _Plan.for_micro_batch(settings.batch_size, math.ceil(settings.batch_size / settings.grad_accum))
        retries: list[OomRetry] = []
    else:
        plan = _Plan(micro_batch=checkpoint.state["micro_batch"], grad_accum=checkpoint.state["grad_accum"])
        retries = [OomRetry(**retry) for retry in checkpoint.state["oom_retries"]]
    resumed_from = None if checkpoint is None else checkpoint.step
    injection = _OomInjection(cfg.oom_at_step)
    while True:
        try:
            session = _TrainingSession(cfg, settings, plan, retries, injection, store, checkpoint)
            checkpoint = None  # the session holds what it needs of it
            result = session.run(on_step)
        except Exception as e:  # outside a step: the model itself does not fit
            if not caused_by_out_of_memory(e):
                raise
            raise OutOfMemory(
                f"stage {spec.stage_id} ran out of GPU memory loading or checkpointing {spec.model}; "
                "use a smaller model or free the GPU"
            ) from e
        if isinstance(result, TrainOutcome):
            outcome = TrainOutcome(**{**asdict(result), "oom_retries": retries, "resumed_from": resumed_from})
            _mark_done(cfg, outcome, store)
            return outcome
        del session  # drop the model, optimizer and activations before retrying
        release_accelerator_memory(compiled=bool(settings.compile))
        checkpoint = _resume_point(store, cfg)
        restart_step = 0 if checkpoint is None else checkpoint.step
        if plan.micro_batch == 1:
            raise OutOfMemory(
                f"stage {spec.stage_id} ran out of GPU memory even at micro-batch 1 (step {result.step}); "
                "lower max_source_length or use a smaller model"
                + (" (or drop train.compile: reduce-overhead: its CUDA graphs hold memory of their own)"
                   if settings.compile == "reduce-overhead" else "")
            )
        new_plan = _Plan.for_micro_batch(settings.batch_size, math.ceil(plan.micro_batch / 2))
        retries.append(OomRetry(result.step, plan.micro_batch, new_plan.micro_batch, new_plan.grad_accum, restart_step))
        cfg.log(
            f"out of GPU memory at step {result.step} with micro-batch {plan.micro_batch}; retrying with "
            f"micro-batch {new_plan.micro_batch} x {new_plan.grad_accum} accumulation steps "
            f"from {f'the checkpoint at step {restart_step}' if checkpoint else 'scratch'}"
        )
        plan = new_plan


def _train_settings(spec: StageSpec) -> TrainConfig:
    if spec.kind not in (StageKind.mtl, StageKind.finetune):
        raise ValueError(f"train() runs mtl and finetune stages, not {spec.kind.value}")
    if spec.train is None:
        raise DataError(f"stage {spec.stage_id} ({spec.kind.value}) has no train settings")
    return spec.train


def _resume_point(store: CheckpointStore, cfg: TrainRun) -> Checkpoint | None:
    """The checkpoint to resume from (see CheckpointStore.load), its trainer state on the stage's device."""
    try:
        return store.load(cfg.device)
    except Exception as e:
        if not caused_by_out_of_memory(e):
            raise
        raise OutOfMemory(
            f"stage {cfg.spec.stage_id} ran out of GPU memory loading its checkpoint; free the GPU"
        ) from e


def _mark_done(cfg: TrainRun, outcome: TrainOutcome, store: CheckpointStore) -> None:
    done = {"stage_id": cfg.spec.stage_id, "train": outcome.to_dict()}
    write_atomically(cfg.workdir / DONE_FILE, json.dumps(done, indent=2) + "\n")
    # Only now are the checkpoints redundant: a crash before this line resumes and finishes again.
    store.remove_all()
    cfg.log(f"stage {cfg.spec.stage_id} trained: {outcome.steps} steps, final loss {outcome.final_loss:.4f}")


def own_gradients(params: Iterable[torch.nn.Parameter], owned: set[int]) -> None:
    """Copy out of CUDA graph memory every .grad not copied yet (`owned`: ids of the copies, updated).

    Autograd keeps a replayed backward's output as a parameter's .grad when .grad is empty; the next replay
    overwrites that memory, and would then add its gradient to itself, losing this one (pytorch/pytorch#169545,
    #146569). Once a .grad is a copy, later micro-batches add into it in place. Checked after every
    micro-batch but the last, for a parameter may first get a gradient in a later one (layer drop)."""
    import torch

    targets, grads = [], []
    for param in params:
        if param.grad is not None and id(param.grad) not in owned:
            targets.append(param)
            grads.append(param.grad)
    if not targets:
        return
    copies = torch._foreach_mul(grads, 1.0)  # one multi-tensor copy, not a kernel per gradient
    for param, copy in zip(targets, copies, strict=True):
        param.grad = copy
        owned.add(id(copy))


def _finished_outcome(cfg: TrainRun) -> TrainOutcome | None:
    done = cfg.workdir / DONE_FILE
    if not (done.is_file() and (cfg.workdir / MODEL_DIR).is_dir()):
        return None
    return TrainOutcome.from_dict(json.loads(done.read_text())["train"])


class _TrainingSession:
    """Everything one attempt needs: model, optimizer, data position. Dropped whole after an OOM."""

    def __init__(
        self,
        cfg: TrainRun,
        settings: TrainConfig,
        plan: _Plan,
        retries: list[OomRetry],
        injection: _OomInjection,
        store: CheckpointStore,
        checkpoint: Checkpoint | None,  # to resume from; None: step 0
    ) -> None:
        import torch

        self.cfg, self.settings, self.plan = cfg, settings, plan
        self.retries, self.injection, self.store = retries, injection, store
        self.spec = cfg.spec
        self.device = torch.device(cfg.device)
        on_cuda = self.device.type == "cuda"
        self.model, self.tokenizer = load_model_and_tokenizer(
            self.spec.model, device=cfg.device, seed=self.spec.seed, init_from=cfg.init_from
        )
        self.model.train()
        self.seq2seq = is_seq2seq(self.model)
        self.source_limit, self.target_limit = training_length_limits(
            self.model, settings.max_source_length, settings.max_target_length
        )
        self.pad_id = int(self.tokenizer.pad_token_id)
        start_id = getattr(self.model.config, "decoder_start_token_id", None)
        self.decoder_start_id = self.pad_id if start_id is None else int(start_id)
        self.forward: Callable[..., Any] = self.model
        # CUDA graphs (train.compile: reduce-overhead): each micro-batch's forward and backward are replayed
        # graphs, whose outputs live in memory the next replay overwrites (see _accumulate_gradients).
        self.cuda_graphs = False
        self.graph_skips_seen: int | None = None  # inductor's count of skipped CUDA graphs, as last logged
        self.graphs_confirmed = False  # "CUDA graphs in use" logged
        self.shapes_recorded = _ShapesSeen()  # micro-batch shapes whose graphs this session has recorded
        # Padded lengths: None pads to the longest row (eager); else (source, target) buckets for seq2seq,
        # or (whole sequence,) for a causal LM.
        self.buckets: tuple[tuple[int, ...], ...] | None = None
        if settings.compile and compile_pays_on(self.device):
            self._compile()
        elif settings.compile:
            cfg.log(f"compile skipped: torch.compile only pays on CUDA, and this stage runs on {self.device} (eager)")
        self.autocast = autocast_for(self.device)
        self.pin = on_cuda
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        # Fused AdamW updates all parameters in one kernel: on CUDA since torch 2.0, on CPU since 2.4
        # (there it is about 3x faster than the per-tensor loop for a small model).
        fused = on_cuda or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.learning_rate,
            fused=True if fused else None,
        )
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) if on_cuda else None
        if on_cuda and self.peak_flops is None:
            cfg.log(f"no peak FLOP/s known for {torch.cuda.get_device_name(self.device)}; MFU is not reported")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_then_linear_decay(settings.max_steps, settings.warmup_ratio)
        )
        self.step = 0
        self.elapsed_before = 0.0
        self.resumed_step: int | None = None
        self.last_lr = settings.learning_rate
        # Few-shot sets are encoded once, not every time an example comes round again; None: encode per batch.
        self.encoded: dict[Example, tuple[list[int], list[int]]] | None = None
        self.stream_from, self.window_batches = self._training_stream()
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    def _compile(self) -> None:
        import torch

        if self.seq2seq:
            self.buckets = (length_buckets(self.source_limit), length_buckets(self.target_limit))
        else:
            self.buckets = (length_buckets(self.source_limit + self.target_limit),)
        # Static shapes: one specialised graph per bucket combination, times two batch sizes (a batch that
        # does not split evenly ends with a smaller micro-batch).
        where = prepare_compile(self.cfg.cache_dir, shapes=math.prod(len(widths) for widths in self.buckets) * 2)
        self.cuda_graphs = self.settings.compile == "reduce-overhead"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.forward = torch.compile(self.model, dynamic=False, mode=mode)
        self.graph_skips_seen = cuda_graph_skips() if self.cuda_graphs else None
        self.cfg.log(
            f"compiling with torch.compile{' (mode reduce-overhead: CUDA graphs)' if self.cuda_graphs else ''}: "
            f"static shapes, padded lengths "
            f"{' x '.join('/'.join(map(str, widths)) for widths in self.buckets)}; caches in {where}"
        )

    # --- data ---

    def _training_stream(self) -> tuple[Callable[[int], Iterator[Example]], int]:
        """The example stream (from a given draw on) and the length-grouping window, in batches.

        The window never holds more examples than there are distinct ones: sorting a window that
        holds several copies of a small few-shot set would put copies of one example in one batch.
        """
        spec, settings = self.spec, self.settings
        stream_from: Callable[[int], Iterator[Example]]
        if spec.kind == StageKind.mtl:
            mixture = data_lib.Mixture(
                spec.data,
                spec.tasks,
                cap=settings.mixture_cap,
                seed=spec.seed,
                cache_dir=self.cfg.cache_dir,
                log=self.cfg.log,
            )
            distinct = sum(mixture.sizes.values())
            stream_from = mixture.stream
        else:
            examples = data_lib.few_shot_examples(
                spec.data, spec.tasks, spec.shots, spec.seed, holdout=spec.holdout, cache_dir=self.cfg.cache_dir,
                log=self.cfg.log,
            )
            distinct = len(examples)

            self.encoded = self._few_shot_encodings(examples)

            def stream_from(start: int) -> Iterator[Example]:
                return data_lib.cycle_shuffled(examples, spec.seed, start)

        return stream_from, max(1, min(WINDOW_BATCHES, distinct // settings.batch_size))

    def _few_shot_encodings(self, examples: list[Example]) -> dict[Example, tuple[list[int], list[int]]]:
        """Source and target ids of every few-shot example; with a cache_dir, read from (or written to) the
        token cache, keyed by everything that decides them."""
        spec = self.spec
        path = None
        fingerprint = None if self.cfg.cache_dir is None else data_lib.source_fingerprint(spec.data)
        if self.cfg.cache_dir is not None and fingerprint is not None:
            key = {
                "kind": "few-shot",
                "data": fingerprint,
                "tasks": list(spec.tasks),
                "shots": spec.shots,
                "holdout": spec.holdout,
                "seed": spec.seed,
                "instructions": spec.instructions,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "source_limit": self.source_limit,
                "target_limit": self.target_limit,
                "seq2seq": self.seq2seq,
            }
            path = data_lib.token_cache_path(self.cfg.cache_dir, key)
            cached = data_lib.load_token_lists(path)
            if cached is not None and len(cached["sources"]) == len(cached["targets"]) == len(examples):
                self.cfg.log(f"token cache hit: {len(examples)} few-shot examples ({path})")
                return dict(zip(examples, zip(cached["sources"], cached["targets"], strict=True), strict=True))
        sources, targets = self._encode_texts(examples)
        if path is not None:
            try:
                data_lib.save_token_lists(
                    path, {"sources": sources, "targets": targets}, description=f"few-shot {spec.stage_id}"
                )
                self.cfg.log(f"token cache miss: {len(examples)} few-shot examples; wrote {path}")
            except OSError as e:
                self.cfg.log(f"token cache miss: could not write {path}: {e}")
        return dict(zip(examples, zip(sources, targets, strict=True), strict=True))

    def _encode_texts(self, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
        sources = encode_sources(
            self.tokenizer,
            [data_lib.source_text(example, self.spec.instructions) for example in examples],
            self.source_limit,
            seq2seq=self.seq2seq,
        )
        targets = encode_targets(
            self.tokenizer, [example.output for example in examples], self.target_limit, seq2seq=self.seq2seq
        )
        return sources, targets

    def _prepared_batches(self) -> Iterator[list[_Encoded]]:
        """Every batch from the current step on, as host tensors ready to copy (pinned on CUDA)."""
        for batch in self._batches():
            yield self._encode(batch)

    def _batches(self) -> Iterator[list[Example]]:
        spec = self.spec

        def length(example: Example) -> int:
            return len(data_lib.source_text(example, spec.instructions)) + len(example.output)

        return data_lib.length_grouped_batches(
            self.stream_from,
            batch_size=self.settings.batch_size,
            seed=spec.seed,
            length=length,
            start_batch=self.step,
            window_batches=self.window_batches,
        )

    def _encode(self, batch: Sequence[Example]) -> list[_Encoded]:
        if self.encoded is not None:
            sources = [self.encoded[example][0] for example in batch]
            targets = [self.encoded[example][1] for example in batch]
        else:
            sources, targets = self._encode_texts(batch)
        size = self.plan.micro_batch
        return [
            self._micro_batch(sources[first : first + size], targets[first : first + size])
            for first in range(0, len(batch), size)
        ]

    def _padded_widths(self, sources: list[list[int]], targets: list[list[int]]) -> tuple[int | None, int | None]:
        """(source, target) widths for seq2seq, (sequence, None) for a causal LM; None: the longest row."""
        if self.buckets is None:
            return None, None
        if self.seq2seq:
            source_buckets, target_buckets = self.buckets
            return (
                bucketed_length(max(map(len, sources)), source_buckets),
                bucketed_length(max(map(len, targets)), target_buckets),
            )
        longest = max(len(s) + len(t) for s, t in zip(sources, targets, strict=True))
        return bucketed_length(longest, self.buckets[0]), None

    def _micro_batch(self, sources: list[list[int]], targets: list[list[int]]) -> _Encoded:
        tensors: dict[str, torch.Tensor]
        width, target_width = self._padded_widths(sources, targets)
        if self.seq2seq:
            tensors = {
                "input_ids": pad_sequences(sources, self.pad_id, width=width),
                "attention_mask": pad_sequences([[1] * len(s) for s in sources], 0, width=width),
                # Teacher forcing: the decoder sees the target shifted right behind the start token.
                "decoder_input_ids": pad_sequences(
                    [[self.decoder_start_id] + t[:-1] for t in targets], self.pad_id, width=target_width
                ),
                "labels": pad_sequences(targets, IGNORE_INDEX, width=target_width),
            }
        else:
            tensors = {
                "input_ids": pad_sequences(
                    [s + t for s, t in zip(sources, targets, strict=True)], self.pad_id, width=width
                ),
                "attention_mask": pad_sequences(
                    [[1] * (len(s) + len(t)) for s, t in zip(sources, targets, strict=True)], 0, width=width
                ),
                # Loss only on the answer: the prompt's positions are ignored.
                "labels": pad_sequences(
                    [[IGNORE_INDEX] * len(s) + t for s, t in zip(sources, targets, strict=True)],
                    IGNORE_INDEX,
                    width=width,
                ),
            }
        if self.pin:
            tensors = {name: tensor.pin_memory() for name, tensor in tensors.items()}
        return _Encoded(
            tensors=tensors,
            target_tokens=sum(len(t) for t in targets),
            tokens=sum(len(s) + len(t) for s, t in zip(sources, targets, strict=True)),
            samples=len(sources),
        )

    # --- the step ---

    def _loss_sum(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        on_device = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        labels = on_device.pop("labels")
        with self.autocast():
            logits = self.forward(**on_device, use_cache=False).logits
        if not self.seq2seq:
            logits, labels = logits[:, :-1], labels[:, 1:]  # position i predicts token i + 1
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def _optimizer_step(self, micro_batches: Sequence[_Encoded]) -> tuple[torch.Tensor, int, int]:
        import torch

        if self.injection.fires_at(self.step + 1):
            raise torch.OutOfMemoryError("injected")
        step_loss = self._accumulate_gradients(micro_batches)
        if self.graph_skips_seen is not None:
            self._log_cuda_graph_skips()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, sum(m.samples for m in micro_batches), sum(m.tokens for m in micro_batches)

    def _accumulate_gradients(self, micro_batches: Sequence[_Encoded]) -> torch.Tensor:
        """Forward and backward over every micro-batch, summing into the parameters' .grad; the batch's loss."""
        import torch

        target_tokens = sum(micro.target_tokens for micro in micro_batches)
        step_loss = torch.zeros((), device=self.device)
        owned: set[int] = set()  # ids of the .grad tensors copied out of graph memory in this step
        for index, micro in enumerate(micro_batches):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new replay: the previous one's outputs are done
                if self.shapes_recorded.first_sight(micro.tensors):
                    # While a graph records, the allocator cannot hand back blocks that eager work cached, so
                    # a length bucket first met deep into a stage could run out of memory (and halve the
                    # micro-batch for good) where an emptied cache fits it.
                    torch.cuda.empty_cache()
            loss = self._loss_sum(micro.tensors) / target_tokens
            loss.backward()
            step_loss += loss.detach()
            if self.cuda_graphs and index < len(micro_batches) - 1:
                own_gradients(self.model.parameters(), owned)
        return step_loss

    def _log_cuda_graph_skips(self) -> None:
        """Say after the first step whether inductor replays CUDA graphs, and later when a new shape's graph
        falls back to plain compiled kernels (inductor's own log says why). Inductor counts a fallback when it
        compiles: a stage reusing graphs compiled earlier in the same process sees none (in the worker each
        stage has a fresh work horse, so it compiles, from the on-disk cache at best)."""
        assert self.graph_skips_seen is not None
        skips = cuda_graph_skips()
        if skips > self.graph_skips_seen:
            self.cfg.log(
                f"step {self.step + 1}: torch.compile ran {skips - self.graph_skips_seen} graph(s) without CUDA "
                "graphs (compiled kernels only); set TORCH_LOGS=cudagraphs to see why"
            )
        elif not self.graphs_confirmed:
            self.cfg.log("CUDA graphs in use: each micro-batch's forward and backward replay as recorded graphs")
        self.graph_skips_seen, self.graphs_confirmed = skips, True

    def run(self, on_step: Callable[[StepReport], None]) -> TrainOutcome | _OutOfMemoryAt:
        total = self.settings.max_steps
        self.cfg.log(
            f"training {self.spec.kind.value} stage {self.spec.stage_id}: {self.spec.model}, "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters, {total} steps, batch "
            f"{self.settings.batch_size} = {self.plan.grad_accum} x {self.plan.micro_batch} on {self.device}"
        )
        started = time.perf_counter()
        # Closed before _finish: the producer thread uses the tokenizer, which saving the model also reads.
        # A few-shot stage's examples are tokenized once, up front: its batches only need padding, which costs
        # less than handing them over between threads (the two contend for the GIL).
        depth = self.cfg.prefetch_batches if self.encoded is None else 0
        with Prefetcher(self._prepared_batches(), depth=depth, name="stl-batches") as batches:
            outcome = self._steps(batches, on_step, started)
        if isinstance(outcome, _OutOfMemoryAt):
            return outcome
        loss_value, run_samples, run_tokens = outcome
        return self._finish(loss_value, run_samples, run_tokens, max(time.perf_counter() - started, 1e-9))

    def _steps(
        self, batches: Iterator[list[_Encoded]], on_step: Callable[[StepReport], None], started: float
    ) -> tuple[float, int, int] | _OutOfMemoryAt:
        """Train to the last step: (last reported loss, samples, tokens), or where memory ran out."""
        import torch

        total = self.settings.max_steps
        run_samples = run_tokens = 0
        progress = _Progress()
        loss_since_report = torch.zeros((), device=self.device)
        loss_value = math.nan
        while self.step < total:
            request = self.cfg.should_stop()
            if request == "cancel":
                raise StageCanceled(f"stage {self.spec.stage_id} was canceled at step {self.step}")
            if request == "preempt":
                self._save_checkpoint(started)
                raise StagePreempted(
                    f"stage {self.spec.stage_id} checkpointed at step {self.step} and will resume there"
                )
            micro_batches = next(batches)
            out_of_memory = False
            try:
                step_loss, samples, tokens = self._optimizer_step(micro_batches)
            except Exception as e:
                if not caused_by_out_of_memory(e):
                    raise
                out_of_memory = True  # handled outside `except` so the failed step's tensors can be freed
            if out_of_memory:
                self.optimizer.zero_grad(set_to_none=True)
                return _OutOfMemoryAt(self.step + 1)
            self.step += 1
            loss_since_report += step_loss
            progress.samples += samples
            progress.tokens += tokens
            progress.steps += 1
            run_samples += samples
            run_tokens += tokens
            if self.step % REPORT_EVERY == 0 or self.step in (1, total):
                loss_value = float((loss_since_report / progress.steps).item())  # the only host sync
                now = time.perf_counter()
                interval = max(now - progress.since, 1e-9)
                on_step(
                    StepReport(
                        step=self.step,
                        total=total,
                        loss=loss_value,
                        learning_rate=self.last_lr,
                        samples_per_s=progress.samples / interval,
                        tokens_per_s=progress.tokens / interval,
                        elapsed_s=self.elapsed_before + now - started,
                        micro_batch=self.plan.micro_batch,
                        grad_accum=self.plan.grad_accum,
                        mfu=model_flops_utilization(self.trainable_params, progress.tokens, interval, self.peak_flops),
                    )
                )
                loss_since_report.zero_()
                progress = _Progress()
            if self.step % self.settings.checkpoint_every == 0 and self.step < total:
                self._save_checkpoint(started)
        return loss_value, run_samples, run_tokens

    def _finish(self, final_loss: float, samples: int, tokens: int, seconds: float) -> TrainOutcome:
        save_model(self.model, self.tokenizer, self.cfg.workdir / MODEL_DIR)
        return TrainOutcome(
            steps=self.step,
            final_loss=final_loss,
            micro_batch=self.plan.micro_batch,
            grad_accum=self.plan.grad_accum,
            oom_retries=list(self.retries),
            resumed_from=self.resumed_step,
            samples_per_s=samples / seconds,
            # Means over the whole call (compile time and the first steps included), as samples_per_s.
            tokens_per_s=tokens / seconds,
            mfu=model_flops_utilization(self.trainable_params, tokens, seconds, self.peak_flops),
        )

    # --- checkpoints ---

    def _save_checkpoint(self, started: float) -> None:
        import numpy as np
        import torch

        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        python_rng = random.getstate()
        numpy_rng = np.random.get_state()
        state = {
            "format": STATE_FORMAT,
            "stage_id": self.spec.stage_id,
            "step": self.step,
            "batch_size": self.settings.batch_size,
            "micro_batch": self.plan.micro_batch,
            "grad_accum": self.plan.grad_accum,
            # Batches are a pure function of (data, seed, batch number): the next one is the position.
            "data": {"next_batch": self.step, "window_batches": self.window_batches},
            "oom_retries": [retry.to_dict() for retry in self.retries],
            "elapsed_s": self.elapsed_before + time.perf_counter() - started,
            "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
            "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],  # type: ignore[index, union-attr]
        }
        self.store.save(self.step, self.model, trainer_state, state)

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        import numpy as np
        import torch
        from safetensors.torch import load_model as load_weights

        state, trainer_state = checkpoint.state, checkpoint.trainer
        if state["batch_size"] != self.settings.batch_size or state["data"]["window_batches"] != self.window_batches:
            raise DataError(f"checkpoint in {checkpoint.directory} was written with another batch layout; delete it")
        load_weights(self.model, str(checkpoint.weights), device=str(self.device))
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["torch_rng"].cpu())
        if self.device.type == "cuda" and trainer_state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in trainer_state["cuda_rng"]])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.resumed_step = self.step
        self.cfg.log(f"resumed from step {self.step}")


def _warmup_then_linear_decay(max_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        # `step` counts optimizer steps taken; the factor applies to the next one.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return factor
