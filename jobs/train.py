"""The training loop for `mtl` and `finetune` stages: a plain loop in the spirit of nanoGPT.

One optimizer step consumes one batch of `batch_size` examples, split into `grad_accum` micro-batches.
The loss is the mean over all target tokens of the batch, however it is split, so halving the
micro-batch after an out-of-memory error keeps the effective batch (and the objective) unchanged.

Checkpoint layout (workdir/checkpoint, replaced atomically via workdir/.checkpoint.tmp):
    model.safetensors   model weights
    trainer.pt          optimizer + scheduler state, torch (and CUDA) RNG states (torch.save, weights only)
    state.json          step, micro-batch plan, data position, OOM history, python/numpy RNG states
A finished stage has workdir/model (see jobs.models.save_model) and workdir/done.json; its checkpoint
is deleted then.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from jobs import data as data_lib
from jobs.errors import DataError, OutOfMemory, StageCanceled, StagePreempted
from jobs.models import (
    encode_sources,
    encode_targets,
    existing_directory,
    is_seq2seq,
    load_model_and_tokenizer,
    max_positions,
    pad_sequences,
    replace_directory,
    save_model,
)
from jobs.specs import StageKind, StageSpec, TrainConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import torch
    from transformers import PreTrainedModel

    from jobs.data import Example

REPORT_EVERY = 10  # read the loss (a host sync) only this often
WINDOW_BATCHES = 50  # length-grouping window, in batches (fewer when the data is small)
GRAD_CLIP = 1.0
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
DONE_FILE = "done.json"
STATE_FORMAT = 1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class StepReport:
    step: int
    total: int
    loss: float  # mean target-token loss since the previous report; NaN during evaluation
    learning_rate: float
    samples_per_s: float
    tokens_per_s: float
    elapsed_s: float
    micro_batch: int
    grad_accum: int
    phase: str = "train"  # "train", or "eval" (step/total then count examples)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in values.items()}


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

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["oom_retries"] = [retry.to_dict() for retry in self.oom_retries]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOutcome:
        fields = {name: values[name] for name in cls.__dataclass_fields__}
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
    import torch

    spec = cfg.spec
    settings = _train_settings(spec)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    finished = _finished_outcome(cfg)
    if finished is not None:
        cfg.log(f"stage {spec.stage_id} already trained ({finished.steps} steps); reusing its model")
        return finished
    state = _read_checkpoint_state(cfg)
    if state is None:
        plan = _Plan.for_micro_batch(settings.batch_size, math.ceil(settings.batch_size / settings.grad_accum))
        retries: list[OomRetry] = []
    else:
        plan = _Plan(micro_batch=state["micro_batch"], grad_accum=state["grad_accum"])
        retries = [OomRetry(**retry) for retry in state["oom_retries"]]
    resumed_from = None if state is None else int(state["step"])
    injection = _OomInjection(cfg.oom_at_step)
    while True:
        try:
            session = _TrainingSession(cfg, settings, plan, retries, injection)
            result = session.run(on_step)
        except torch.OutOfMemoryError as e:  # outside a step: the model itself does not fit
            raise OutOfMemory(
                f"stage {spec.stage_id} ran out of GPU memory loading or checkpointing {spec.model}; "
                "use a smaller model or free the GPU"
            ) from e
        if isinstance(result, TrainOutcome):
            outcome = TrainOutcome(**{**asdict(result), "oom_retries": retries, "resumed_from": resumed_from})
            _mark_done(cfg, outcome)
            return outcome
        del session  # drop the model, optimizer and activations before retrying
        _release_accelerator_memory()
        checkpoint = _read_checkpoint_state(cfg)
        restart_step = 0 if checkpoint is None else int(checkpoint["step"])
        if plan.micro_batch == 1:
            raise OutOfMemory(
                f"stage {spec.stage_id} ran out of GPU memory even at micro-batch 1 (step {result.step}); "
                "lower max_source_length or use a smaller model"
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


def _mark_done(cfg: TrainRun, outcome: TrainOutcome) -> None:
    done = {"stage_id": cfg.spec.stage_id, "train": outcome.to_dict()}
    temporary = cfg.workdir / f".{DONE_FILE}.tmp"
    temporary.write_text(json.dumps(done, indent=2) + "\n")
    os.replace(temporary, cfg.workdir / DONE_FILE)
    # Only now is the checkpoint redundant: a crash before this line resumes and finishes again.
    for leftover in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        shutil.rmtree(cfg.workdir / leftover, ignore_errors=True)
    cfg.log(f"stage {cfg.spec.stage_id} trained: {outcome.steps} steps, final loss {outcome.final_loss:.4f}")


def _release_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finished_outcome(cfg: TrainRun) -> TrainOutcome | None:
    done = cfg.workdir / DONE_FILE
    if not (done.is_file() and (cfg.workdir / MODEL_DIR).is_dir()):
        return None
    return TrainOutcome.from_dict(json.loads(done.read_text())["train"])


def _read_checkpoint_state(cfg: TrainRun) -> dict[str, Any] | None:
    directory = existing_directory(cfg.workdir / CHECKPOINT_DIR)
    if directory is None:
        return None
    state: dict[str, Any] = json.loads((directory / "state.json").read_text())
    if state.get("format") != STATE_FORMAT or state.get("stage_id") != cfg.spec.stage_id:
        cfg.log(f"ignoring checkpoint in {directory}: written by another stage or stl version")
        shutil.rmtree(directory)
        return None
    return state


def _length_limits(model: PreTrainedModel, settings: TrainConfig) -> tuple[int, int]:
    source, target = settings.max_source_length, settings.max_target_length
    limit = max_positions(model)
    if limit is None:
        return source, target
    if is_seq2seq(model):
        return min(source, limit), min(target, limit)
    target = min(target, limit // 2)
    return min(source, limit - target), target


class _TrainingSession:
    """Everything one attempt needs: model, optimizer, data position. Dropped whole after an OOM."""

    def __init__(
        self,
        cfg: TrainRun,
        settings: TrainConfig,
        plan: _Plan,
        retries: list[OomRetry],
        injection: _OomInjection,
    ) -> None:
        import torch

        self.cfg, self.settings, self.plan = cfg, settings, plan
        self.retries, self.injection = retries, injection
        self.spec = cfg.spec
        self.device = torch.device(cfg.device)
        on_cuda = self.device.type == "cuda"
        self.model, self.tokenizer = load_model_and_tokenizer(
            self.spec.model, device=cfg.device, seed=self.spec.seed, init_from=cfg.init_from
        )
        self.model.train()
        self.seq2seq = is_seq2seq(self.model)
        self.source_limit, self.target_limit = _length_limits(self.model, settings)
        self.pad_id = int(self.tokenizer.pad_token_id)
        start_id = getattr(self.model.config, "decoder_start_token_id", None)
        self.decoder_start_id = self.pad_id if start_id is None else int(start_id)
        self.forward: Callable[..., Any] = self.model
        if settings.compile:
            if on_cuda:
                self.forward = torch.compile(self.model, dynamic=True)
            else:
                cfg.log("compile is ignored on CPU")
        use_bf16 = on_cuda and torch.cuda.is_bf16_supported()
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        self.pin = on_cuda
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=settings.learning_rate,
            fused=True if on_cuda else None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_then_linear_decay(settings.max_steps, settings.warmup_ratio)
        )
        self.step = 0
        self.elapsed_before = 0.0
        self.resumed_step: int | None = None
        self.last_lr = settings.learning_rate
        self.stream_from, self.window_batches = self._training_stream()
        self._load_checkpoint()

    # --- data ---

    def _training_stream(self) -> tuple[Callable[[int], Iterator[Example]], int]:
        """The example stream (from a given draw on) and the length-grouping window, in batches.

        The window never holds more examples than there are distinct ones: sorting a window that
        holds several copies of a small few-shot set would put copies of one example in one batch.
        """
        spec, settings = self.spec, self.settings
        stream_from: Callable[[int], Iterator[Example]]
        if spec.kind == StageKind.mtl:
            mixture = data_lib.Mixture(spec.data, spec.tasks, cap=settings.mixture_cap, seed=spec.seed)
            distinct = sum(mixture.sizes.values())
            stream_from = mixture.stream
        else:
            examples = data_lib.few_shot_examples(spec.data, spec.tasks, spec.shots, spec.seed)
            if len(examples) < spec.shots * len(spec.tasks):
                self.cfg.log(f"only {len(examples)} examples for {spec.shots} shots of {len(spec.tasks)} task(s)")
            distinct = len(examples)

            def stream_from(start: int) -> Iterator[Example]:
                return data_lib.cycle_shuffled(examples, spec.seed, start)

        return stream_from, max(1, min(WINDOW_BATCHES, distinct // settings.batch_size))

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
        sources = encode_sources(
            self.tokenizer,
            [data_lib.source_text(example, self.spec.instructions) for example in batch],
            self.source_limit,
            seq2seq=self.seq2seq,
        )
        targets = encode_targets(
            self.tokenizer, [example.output for example in batch], self.target_limit, seq2seq=self.seq2seq
        )
        size = self.plan.micro_batch
        return [
            self._micro_batch(sources[first : first + size], targets[first : first + size])
            for first in range(0, len(batch), size)
        ]

    def _micro_batch(self, sources: list[list[int]], targets: list[list[int]]) -> _Encoded:
        tensors: dict[str, torch.Tensor]
        if self.seq2seq:
            tensors = {
                "input_ids": pad_sequences(sources, self.pad_id),
                "attention_mask": pad_sequences([[1] * len(s) for s in sources], 0),
                # Teacher forcing: the decoder sees the target shifted right behind the start token.
                "decoder_input_ids": pad_sequences([[self.decoder_start_id] + t[:-1] for t in targets], self.pad_id),
                "labels": pad_sequences(targets, IGNORE_INDEX),
            }
        else:
            tensors = {
                "input_ids": pad_sequences([s + t for s, t in zip(sources, targets, strict=True)], self.pad_id),
                "attention_mask": pad_sequences(
                    [[1] * (len(s) + len(t)) for s, t in zip(sources, targets, strict=True)], 0
                ),
                # Loss only on the answer: the prompt's positions are ignored.
                "labels": pad_sequences(
                    [[IGNORE_INDEX] * len(s) + t for s, t in zip(sources, targets, strict=True)], IGNORE_INDEX
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

    def _optimizer_step(self, batch: Sequence[Example]) -> tuple[torch.Tensor, int, int]:
        import torch

        if self.injection.fires_at(self.step + 1):
            raise torch.OutOfMemoryError("injected")
        micro_batches = self._encode(batch)
        target_tokens = sum(micro.target_tokens for micro in micro_batches)
        step_loss = torch.zeros((), device=self.device)
        for micro in micro_batches:
            loss = self._loss_sum(micro.tensors) / target_tokens
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, sum(m.samples for m in micro_batches), sum(m.tokens for m in micro_batches)

    def run(self, on_step: Callable[[StepReport], None]) -> TrainOutcome | _OutOfMemoryAt:
        import torch

        total = self.settings.max_steps
        self.cfg.log(
            f"training {self.spec.kind.value} stage {self.spec.stage_id}: {self.spec.model}, "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters, {total} steps, batch "
            f"{self.settings.batch_size} = {self.plan.grad_accum} x {self.plan.micro_batch} on {self.device}"
        )
        batches = self._batches()
        started = time.perf_counter()
        run_samples = 0
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
            batch = next(batches)
            out_of_memory = False
            try:
                step_loss, samples, tokens = self._optimizer_step(batch)
            except torch.OutOfMemoryError:
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
                    )
                )
                loss_since_report.zero_()
                progress = _Progress()
            if self.step % self.settings.checkpoint_every == 0 and self.step < total:
                self._save_checkpoint(started)
        return self._finish(loss_value, run_samples / max(time.perf_counter() - started, 1e-9))

    def _finish(self, final_loss: float, samples_per_s: float) -> TrainOutcome:
        save_model(self.model, self.tokenizer, self.cfg.workdir / MODEL_DIR)
        return TrainOutcome(
            steps=self.step,
            final_loss=final_loss,
            micro_batch=self.plan.micro_batch,
            grad_accum=self.plan.grad_accum,
            oom_retries=list(self.retries),
            resumed_from=self.resumed_step,
            samples_per_s=samples_per_s,
        )

    # --- checkpoints ---

    def _save_checkpoint(self, started: float) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_model as save_weights

        temporary = self.cfg.workdir / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_weights(self.model, str(temporary / "model.safetensors"))
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        torch.save(trainer_state, temporary / "trainer.pt")
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
        (temporary / "state.json").write_text(json.dumps(state))
        replace_directory(temporary, self.cfg.workdir / CHECKPOINT_DIR)

    def _load_checkpoint(self) -> None:
        import numpy as np
        import torch
        from safetensors.torch import load_model as load_weights

        state = _read_checkpoint_state(self.cfg)
        directory = existing_directory(self.cfg.workdir / CHECKPOINT_DIR)
        if state is None or directory is None:
            return
        if state["batch_size"] != self.settings.batch_size or state["data"]["window_batches"] != self.window_batches:
            raise DataError(f"checkpoint in {directory} was written with another batch layout; delete it")
        load_weights(self.model, str(directory / "model.safetensors"), device=str(self.device))
        trainer_state = torch.load(directory / "trainer.pt", map_location=self.device, weights_only=True)
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
