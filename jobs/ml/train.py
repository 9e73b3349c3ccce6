"""The training loop for `mtl` and `finetune` stages: a plain loop in the spirit of nanoGPT.

One optimizer step consumes one batch of `batch_size` examples, split into `grad_accum` micro-batches.
The loss is the mean over all target tokens of the batch, however it is split, so halving the
micro-batch after an out-of-memory error keeps the effective batch (and the objective) unchanged.

Checkpoints go to workdir/checkpoint (see stl.jobs.ml.checkpoint: the newest two are kept, each written whole;
a damaged one is skipped for the one before). A finished stage has workdir/model (see
stl.jobs.ml.models.save_model) and workdir/done.json; its checkpoints are deleted then.

On CUDA the step runs under bf16 autocast (where the GPU has native bf16) with fused AdamW, and reads the
loss back to the host only on report steps. With `train.compile` the model goes through torch.compile
(CUDA only; skipped with a log line elsewhere) over inputs padded to fixed length buckets, with inductor's
caches under STL_HOME/cache/inductor (jobs/ml/acceleration.py); `train.compile: reduce-overhead` also replays
each micro-batch's forward and backward as CUDA graphs (jobs/ml/cuda_graphs.py). The batches come from
jobs/ml/training_batches.py, made ahead of the step in a background thread (jobs/ml/prefetch.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from stl.jobs.durable import write_atomically
from stl.jobs.errors import DataError, OutOfMemory, StageCanceled, StagePreempted
from stl.jobs.layout import DONE_FILE, MODEL_DIR
from stl.jobs.ml.acceleration import (
    caused_by_out_of_memory,
    compile_pays_on,
    model_flops_utilization,
    peak_flops,
    prepare_compile,
    release_accelerator_memory,
)
from stl.jobs.ml.checkpoint import STATE_FORMAT, Checkpoint, CheckpointStore
from stl.jobs.ml.cuda_graphs import ShapesSeen, TrainingGraphNotes, own_gradients
from stl.jobs.ml.model_inputs import IGNORE_INDEX, training_length_limits
from stl.jobs.ml.models import autocast_for, is_seq2seq, load_model_and_tokenizer, save_model
from stl.jobs.ml.prefetch import Prefetcher
from stl.jobs.ml.progress import StepReport
from stl.jobs.ml.training_batches import TrainingBatches, padding_buckets
from stl.jobs.specs import StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import torch
    from transformers import PreTrainedModel

    from stl.jobs.ml.training_batches import Buckets, MicroBatch

REPORT_EVERY = 10  # read the loss (a host sync) only this often
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
    # Raises StageLeaseLost once another work horse took the stage over (stl.jobs.queue.fence): called right before a
    # checkpoint, the model or done.json replaces what is on disk.
    fence: Callable[[], None] = lambda: None


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
class _Progress:
    samples: int = 0
    tokens: int = 0
    steps: int = 0
    since: float = field(default_factory=time.perf_counter)

    def add_step(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        self.steps += 1


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
    store = CheckpointStore(cfg.workdir, spec.stage_id, cfg.log, fence=cfg.fence)
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
    write_atomically(cfg.workdir / DONE_FILE, json.dumps(done, indent=2) + "\n", before_commit=cfg.fence)
    # Only now are the checkpoints redundant: a crash before this line resumes and finishes again.
    store.remove_all()
    cfg.log(f"stage {cfg.spec.stage_id} trained: {outcome.steps} steps, final loss {outcome.final_loss:.4f}")


def _finished_outcome(cfg: TrainRun) -> TrainOutcome | None:
    done = cfg.workdir / DONE_FILE
    if not (done.is_file() and (cfg.workdir / MODEL_DIR).is_dir()):
        return None
    return TrainOutcome.from_dict(json.loads(done.read_text())["train"])


class _TrainingSession:
    """One attempt at training the stage: model, optimizer, batches and the step loop. Dropped whole after an
    OOM, and made again with smaller micro-batches."""

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
        limits = training_length_limits(self.model, settings.max_source_length, settings.max_target_length)
        self.forward: Callable[..., Any] = self.model
        # CUDA graphs (train.compile: reduce-overhead): each micro-batch's forward and backward are replayed
        # graphs, whose outputs live in memory the next replay overwrites (see _accumulate_gradients).
        self.cuda_graphs = False
        self.graph_notes: TrainingGraphNotes | None = None
        self.shapes_recorded = ShapesSeen()  # micro-batch shapes whose graphs this session has recorded
        buckets = None  # padded lengths: None pads to the longest row (eager)
        if settings.compile and compile_pays_on(self.device):
            buckets = padding_buckets(seq2seq=self.seq2seq, source_limit=limits[0], target_limit=limits[1])
            self.forward, self.cuda_graphs = _compile(self.model, buckets, settings, cfg)
            self.graph_notes = TrainingGraphNotes(cfg.log) if self.cuda_graphs else None
        elif settings.compile:
            cfg.log(f"compile skipped: torch.compile only pays on CUDA, and this stage runs on {self.device} (eager)")
        self.autocast = autocast_for(self.device)
        self.optimizer = _adamw(self.model, settings, fused=on_cuda)
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
        self.batches = TrainingBatches(
            self.spec, settings, self.model, self.tokenizer, limits=limits, buckets=buckets,
            micro_batch=plan.micro_batch, pin=on_cuda, cache_dir=cfg.cache_dir, log=cfg.log,
        )
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

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

    def _optimizer_step(self, micro_batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, int, int]:
        import torch

        if self.injection.fires_at(self.step + 1):
            raise torch.OutOfMemoryError("injected")
        step_loss = self._accumulate_gradients(micro_batches)
        if self.graph_notes is not None:
            self.graph_notes.after_step(self.step + 1)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, sum(m.samples for m in micro_batches), sum(m.tokens for m in micro_batches)

    def _accumulate_gradients(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
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
        depth = 0 if self.batches.tokenized_up_front else self.cfg.prefetch_batches
        with Prefetcher(self.batches.prepared(self.step), depth=depth, name="stl-batches") as batches:
            outcome = self._steps(batches, on_step, started)
        if isinstance(outcome, _OutOfMemoryAt):
            return outcome
        loss_value, run_samples, run_tokens = outcome
        return self._finish(loss_value, run_samples, run_tokens, max(time.perf_counter() - started, 1e-9))

    def _steps(
        self, batches: Iterator[list[MicroBatch]], on_step: Callable[[StepReport], None], started: float
    ) -> tuple[float, int, int] | _OutOfMemoryAt:
        """Train to the last step: (last reported loss, samples, tokens), or where memory ran out."""
        import torch

        total = self.settings.max_steps
        progress, run = _Progress(), _Progress()  # since the last report, and since `started`
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
            progress.add_step(samples, tokens)
            run.add_step(samples, tokens)
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
        return loss_value, run.samples, run.tokens

    def _finish(self, final_loss: float, samples: int, tokens: int, seconds: float) -> TrainOutcome:
        save_model(self.model, self.tokenizer, self.cfg.workdir / MODEL_DIR, before_replace=self.cfg.fence)
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
        import torch

        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        state = {
            "format": STATE_FORMAT,
            "stage_id": self.spec.stage_id,
            "step": self.step,
            "batch_size": self.settings.batch_size,
            "micro_batch": self.plan.micro_batch,
            "grad_accum": self.plan.grad_accum,
            # Batches are a pure function of (data, seed, batch number): the next one is the position.
            "data": {"next_batch": self.step, "window_batches": self.batches.window_batches},
            "oom_retries": [retry.to_dict() for retry in self.retries],
            "elapsed_s": self.elapsed_before + time.perf_counter() - started,
            **_host_rng_states(),
        }
        self.store.save(self.step, self.model, trainer_state, state)

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        from safetensors.torch import load_model as load_weights

        state, trainer_state = checkpoint.state, checkpoint.trainer
        layout = (state["batch_size"], state["data"]["window_batches"])
        if layout != (self.settings.batch_size, self.batches.window_batches):
            raise DataError(f"checkpoint in {checkpoint.directory} was written with another batch layout; delete it")
        load_weights(self.model, str(checkpoint.weights), device=str(self.device))
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        _restore_rng_states(state, trainer_state, self.device)
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.resumed_step = self.step
        self.cfg.log(f"resumed from step {self.step}")


def _compile(
    model: PreTrainedModel, buckets: Buckets, settings: TrainConfig, cfg: TrainRun
) -> tuple[Callable[..., Any], bool]:
    """`model` compiled for the static shapes of `buckets`, and whether it replays CUDA graphs."""
    import torch

    # Static shapes: one specialised graph per bucket combination, times two batch sizes (a batch that
    # does not split evenly ends with a smaller micro-batch).
    where = prepare_compile(cfg.cache_dir, shapes=math.prod(len(widths) for widths in buckets) * 2)
    cuda_graphs = settings.compile == "reduce-overhead"
    mode = "reduce-overhead" if cuda_graphs else None
    forward = torch.compile(model, dynamic=False, mode=mode)
    cfg.log(
        f"compiling with torch.compile{' (mode reduce-overhead: CUDA graphs)' if cuda_graphs else ''}: "
        f"static shapes, padded lengths "
        f"{' x '.join('/'.join(map(str, widths)) for widths in buckets)}; caches in {where}"
    )
    return forward, cuda_graphs


def _adamw(model: torch.nn.Module, settings: TrainConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    # Fused AdamW updates all parameters in one kernel: on CUDA since torch 2.0, on CPU since 2.4
    # (there it is about 3x faster than the per-tensor loop for a small model).
    fused = fused or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        fused=True if fused else None,
    )


def _host_rng_states() -> dict[str, list[Any]]:
    """Python's and numpy's random states as JSON values, for a checkpoint's state.json."""
    import numpy as np

    python_rng = random.getstate()
    numpy_rng = np.random.get_state()
    return {
        "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
        "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],  # type: ignore[index, union-attr]
    }


def _restore_rng_states(state: dict[str, Any], trainer_state: dict[str, Any], device: torch.device) -> None:
    """Every random state a checkpoint holds: torch's (and CUDA's) from trainer.pt, Python's and numpy's
    from state.json."""
    import numpy as np
    import torch

    torch.set_rng_state(trainer_state["torch_rng"].cpu())
    if device.type == "cuda" and trainer_state["cuda_rng"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in trainer_state["cuda_rng"]])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _warmup_then_linear_decay(max_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        # `step` counts optimizer steps taken; the factor applies to the next one.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return factor
