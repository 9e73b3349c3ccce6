"""Keeping the GPU busy: MFU figures, compile gating and its caches, length buckets, and cached token ids.

All on the CPU: the CUDA-only paths are checked through the pure functions they are built from.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stl.jobs.errors import StagePreempted
from stl.jobs.ml.acceleration import (
    bucketed_length,
    length_buckets,
    model_flops_utilization,
    peak_flops,
    use_compile_caches,
)
from stl.jobs.ml.checkpoint import CheckpointStore
from stl.jobs.ml.cuda_graphs import own_gradients
from stl.jobs.ml.demo_dataset import DEMO_EVAL_TASKS
from stl.jobs.ml.evaluate import EvalRun, evaluate
from stl.jobs.ml.model_inputs import IGNORE_INDEX
from stl.jobs.ml.train import (
    TrainOutcome,
    TrainRun,
    _OomInjection,
    _Plan,
    _TrainingSession,
)
from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TrainConfig
from tests.helpers import assert_bit_identical, run_training, saved_weights

if TYPE_CHECKING:
    from pathlib import Path

    from stl.jobs.ml.progress import StepReport

torch.set_num_threads(1)




def finetune_spec(demo_data: Path, *, model: str = "tiny:gpt2", **settings: Any) -> StageSpec:
    defaults: dict[str, Any] = {
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum": 2,
        "checkpoint_every": 2,
        "max_source_length": 48,
        "max_target_length": 12,
        "learning_rate": 3e-3,
    }
    return StageSpec(
        kind=StageKind.finetune,
        model=model,
        data=str(demo_data),
        tasks=(DEMO_EVAL_TASKS[1],),
        shots=6,
        seed=5,
        train=TrainConfig(**{**defaults, **settings}),
    )


def assert_same_weights(left: Path, right: Path) -> None:
    assert_bit_identical(saved_weights(left), saved_weights(right))


# --- MFU ---


def test_model_flops_utilization_is_six_n_tokens_over_time_and_peak() -> None:
    assert model_flops_utilization(params=1_000_000, tokens=2_000, seconds=0.5, peak=1e12) == pytest.approx(
        6 * 1_000_000 * 2_000 / 0.5 / 1e12
    )
    assert model_flops_utilization(124_000_000, 16 * 512, 0.1, 989e12) == pytest.approx(0.06164, rel=1e-3)
    assert model_flops_utilization(10, 10, 1.0, None) is None
    assert model_flops_utilization(10, 10, 0.0, 1e12) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("Tesla T4", 65e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None) -> None:
    assert peak_flops(name) == peak


def test_cpu_training_reports_tokens_per_second_and_no_mfu(tmp_path: Path, demo_data: Path) -> None:
    reports: list[StepReport] = []
    outcome, _ = run_training(finetune_spec(demo_data, max_steps=2), tmp_path, reports=reports)
    assert reports and all(r.mfu is None and r.tokens_per_s > 0 for r in reports)
    assert outcome.mfu is None and outcome.tokens_per_s > 0
    recorded = reports[-1].to_dict()
    assert recorded["mfu"] is None and recorded["tokens_per_s"] > 0
    done = json.loads((tmp_path / "done.json").read_text())["train"]
    assert done["mfu"] is None and done["tokens_per_s"] == outcome.tokens_per_s
    # A done.json written before these fields existed still reads.
    older = {key: value for key, value in done.items() if key not in ("mfu", "tokens_per_s")}
    assert TrainOutcome.from_dict(older) == TrainOutcome(**{**outcome.__dict__, "tokens_per_s": 0.0, "mfu": None})


# --- compile ---


def test_compile_is_skipped_on_cpu_with_a_log_line_and_changes_nothing(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager, _ = run_training(finetune_spec(demo_data, max_steps=3), tmp_path / "eager")
    compiled, lines = run_training(finetune_spec(demo_data, max_steps=3, compile=True), tmp_path / "asked",
                          cache_dir=tmp_path / "c")
    assert any(line.startswith("compile skipped") and "cpu" in line for line in lines)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not (tmp_path / "c" / "inductor").exists()
    assert compiled.final_loss == eager.final_loss
    assert_same_weights(tmp_path / "eager", tmp_path / "asked")


def test_compile_caches_go_under_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    directory = use_compile_caches(tmp_path / "cache")
    assert directory == tmp_path / "cache" / "inductor" and directory.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory)
    assert os.environ["TRITON_CACHE_DIR"] == str(directory / "triton")


# --- length buckets ---


def test_length_buckets_are_powers_of_two_capped() -> None:
    assert length_buckets(512) == (32, 64, 128, 256, 512)
    assert length_buckets(64) == (32, 64)
    assert length_buckets(48) == (32, 48)
    assert length_buckets(20) == (20,)
    buckets = length_buckets(300)
    assert buckets == (32, 64, 128, 256, 300)
    assert [bucketed_length(n, buckets) for n in (1, 32, 33, 200, 257, 300)] == [32, 32, 64, 256, 300, 300]


@pytest.mark.parametrize("model", ["tiny:t5", "tiny:gpt2"])
def test_bucketed_micro_batches_have_bucket_shapes_and_the_same_loss(
        tmp_path: Path, demo_data: Path, model: str) -> None:
    spec = finetune_spec(demo_data, model=model, max_source_length=100, max_target_length=40)
    assert spec.train is not None
    cfg = TrainRun(spec=spec, workdir=tmp_path, init_from=None, device="cpu", should_stop=lambda: None, log=print)
    session = new_session(cfg, _Plan.for_micro_batch(4, 4))
    batches = session.batches
    batch = next(batches.example_batches(0))
    [dynamic] = batches.encode(batch)
    if session.seq2seq:
        batches.buckets = (length_buckets(batches.source_limit), length_buckets(batches.target_limit))
        allowed = [batches.buckets[0], batches.buckets[0], batches.buckets[1], batches.buckets[1]]
    else:
        batches.buckets = (length_buckets(batches.source_limit + batches.target_limit),)
        allowed = [batches.buckets[0]] * 3
    [bucketed] = batches.encode(batch)
    shapes = [tensor.size(1) for tensor in bucketed.tensors.values()]
    assert all(width in widths for width, widths in zip(shapes, allowed, strict=True)), shapes
    assert shapes != [tensor.size(1) for tensor in dynamic.tensors.values()]  # the padding did change
    assert (bucketed.tokens, bucketed.target_tokens) == (dynamic.tokens, dynamic.target_tokens)
    labels = bucketed.tensors["labels"]
    assert (labels[:, dynamic.tensors["labels"].size(1) :] == IGNORE_INDEX).all()
    session.model.eval()  # no dropout: the two passes must see the same network
    with torch.no_grad():
        assert torch.allclose(session._loss_sum(bucketed.tensors), session._loss_sum(dynamic.tensors), rtol=1e-5)


# --- host syncs ---

# The ATen ops that copy a device value back to the host (`.item()`, `bool(t)`, data-dependent shapes). On a
# CPU they cost nothing, but on a GPU each one stalls the host until the device has drained its queue.
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal"})


class HostSyncSpy(TorchDispatchMode):
    """Records every host-sync op dispatched inside it, with the frames outside torch that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, list[str]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            frames = [f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_stack()]
            self.syncs.append((name, [frame for frame in frames if f"{os.sep}torch{os.sep}" not in frame]))
        return func(*args, **(kwargs or {}))


def sync_callers(spy: HostSyncSpy) -> list[str]:
    """For each recorded sync, the nearest frame outside torch: the code that asked for the value."""
    return [frames[-2] for _op, frames in spy.syncs]  # frames[-1] is the spy itself


def new_session(cfg: TrainRun, plan: _Plan) -> _TrainingSession:
    """A training attempt from step 0, as train() makes one."""
    assert cfg.spec.train is not None
    store = CheckpointStore(cfg.workdir, cfg.spec.stage_id, cfg.log)
    return _TrainingSession(cfg, cfg.spec.train, plan, [], _OomInjection(None), store, None)


def steady_state_session(tmp_path: Path, demo_data: Path, model: str, **settings: Any) -> _TrainingSession:
    spec = finetune_spec(demo_data, model=model, grad_accum=1, **settings)
    assert spec.train is not None
    cfg = TrainRun(spec=spec, workdir=tmp_path, init_from=None, device="cpu", should_stop=lambda: None,
                   log=lambda _line: None, cache_dir=tmp_path / "cache")
    session = new_session(cfg, _Plan.for_micro_batch(4, 4))
    batches = session.batches.prepared(session.step)
    session._optimizer_step(next(batches))  # the first step creates the optimizer state (and compiles)
    return session


@pytest.mark.parametrize("model", ["tiny:t5", "tiny:bart", "tiny:gpt2"])
def test_an_eager_training_step_makes_no_host_sync_of_stls_own(tmp_path: Path, demo_data: Path, model: str) -> None:
    """Issue 6: keep host syncs out of the step. stl reads the loss back only at reports; an eager step's
    syncs are all transformers' checks of its attention masks (which compiled graphs skip)."""
    session = steady_state_session(tmp_path, demo_data, model)
    spy = HostSyncSpy()
    with spy:
        session._optimizer_step(next(session.batches.prepared(session.step)))
    callers = sync_callers(spy)
    assert callers, "the spy must see transformers' mask checks, or it is not watching"
    assert all(f"transformers{os.sep}" in caller for caller in callers), callers


# --- CUDA graphs (train.compile: reduce-overhead) ---


def deliver_gradients_like_cuda_graphs(model: torch.nn.Module) -> list[Any]:
    """Emulate replayed CUDA graphs on a CPU: each parameter's gradient arrives in one buffer that every
    backward overwrites, handed over as a fresh tensor that autograd may keep as .grad (as a graph's output)."""
    handles = []
    for param in model.parameters():
        buffer = torch.zeros_like(param)

        def deliver(grad: torch.Tensor, buffer: torch.Tensor = buffer) -> torch.Tensor:
            buffer.copy_(grad)
            return torch.empty(0, dtype=buffer.dtype).set_(buffer.untyped_storage(), 0, buffer.shape, buffer.stride())

        handles.append(param.register_hook(deliver))
    return handles


def accumulated_gradients(tmp_path: Path, demo_data: Path, *, graph_memory: bool, cuda_graphs: bool) -> list[Any]:
    spec = finetune_spec(demo_data, model="tiny:t5")
    assert spec.train is not None
    cfg = TrainRun(spec=spec, workdir=tmp_path, init_from=None, device="cpu", should_stop=lambda: None,
                   log=lambda _line: None)
    session = new_session(cfg, _Plan.for_micro_batch(4, 1))
    session.model.eval()  # no dropout: every session computes the same gradients
    if graph_memory:
        deliver_gradients_like_cuda_graphs(session.model)
    session.cuda_graphs = cuda_graphs  # what the reduce-overhead mode sets, without compiling on a CPU
    micro_batches = next(session.batches.prepared(session.step))
    assert len(micro_batches) == 4
    session._accumulate_gradients(micro_batches)
    return [param.grad.clone() for param in session.model.parameters()]


def test_accumulated_gradients_survive_gradients_delivered_in_graph_memory(tmp_path: Path, demo_data: Path) -> None:
    """With CUDA graphs, a micro-batch's gradients live in memory the next replay overwrites; stl copies them
    out, so accumulating over four micro-batches gives what eager training gives, bit for bit."""
    expected = accumulated_gradients(tmp_path / "a", demo_data, graph_memory=False, cuda_graphs=False)
    naive = accumulated_gradients(tmp_path / "b", demo_data, graph_memory=True, cuda_graphs=False)
    assert any(not torch.equal(a, b) for a, b in zip(naive, expected, strict=True)), "the emulation must bite"
    owned = accumulated_gradients(tmp_path / "c", demo_data, graph_memory=True, cuda_graphs=True)
    assert all(torch.equal(a, b) for a, b in zip(owned, expected, strict=True))


def test_a_parameter_whose_first_gradient_comes_in_a_later_micro_batch_is_copied_out_too() -> None:
    """Layer drop and other conditional computation: `late` gets no gradient from the first micro-batch."""
    torch.manual_seed(0)
    early, late = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*early.parameters(), *late.parameters()]
    inputs = [torch.randn(2, 4) for _ in range(3)]

    def accumulate(copy_out: bool) -> list[torch.Tensor]:
        for param in params:
            param.grad = None
        owned: set[int] = set()
        for index, x in enumerate(inputs):
            out = early(x) if index == 0 else late(early(x))
            out.square().sum().backward()
            if copy_out and index < len(inputs) - 1:
                own_gradients(params, owned)
        return [param.grad.clone() for param in params if param.grad is not None]

    expected = accumulate(copy_out=False)
    handles = deliver_gradients_like_cuda_graphs(early) + deliver_gradients_like_cuda_graphs(late)
    naive = accumulate(copy_out=False)
    assert any(not torch.equal(a, b) for a, b in zip(naive, expected, strict=True)), "the emulation must bite"
    owned_grads = accumulate(copy_out=True)
    assert all(torch.equal(a, b) for a, b in zip(owned_grads, expected, strict=True))
    for handle in handles:
        handle.remove()


def test_reduce_overhead_is_a_compile_setting_of_its_own_stage_id(demo_data: Path) -> None:
    ids = {str(mode): finetune_spec(demo_data, compile=mode).stage_id for mode in (False, True, "reduce-overhead")}
    assert len(set(ids.values())) == 3
    with pytest.raises(ValueError, match="reduce-overhead"):
        finetune_spec(demo_data, compile="max-autotune")


@pytest.mark.slow
def test_compiled_training_is_one_graph_per_shape_with_no_graph_break(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path, run on the CPU: torch.compile with length buckets. Dynamo captures the whole model in
    one graph (a graph break is where transformers would read a value back to the host, a sync), and a
    second batch of the same bucket shape runs that graph without compiling again."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr("stl.jobs.ml.train.compile_pays_on", lambda device: True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the stage points it at its cache
    counters.clear()
    # Caps at or below the smallest bucket leave one source and one target width: one graph to compile.
    session = steady_state_session(tmp_path, demo_data, "tiny:t5", max_source_length=32, max_target_length=16,
                                   compile=True)
    assert session.batches.buckets == ((32,), (16,))
    batches = session.batches.prepared(session.step)
    batch = next(batches)
    [encoded] = batch
    assert [t.size(1) for t in encoded.tensors.values()] == [32, 32, 16, 16]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    loss, _samples, _tokens = session._optimizer_step(batch)
    session._optimizer_step(next(batches))
    assert counters["stats"]["unique_graphs"] == graphs, "a batch of the same shapes compiled again"
    assert dict(counters["graph_break"]) == {}
    assert math.isfinite(float(loss))
    assert (tmp_path / "cache" / "inductor").is_dir()


@pytest.mark.slow
def test_reduce_overhead_compiles_and_says_whether_cuda_graphs_run(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reduce-overhead path, run on the CPU: it compiles with torch's mode of that name, accumulates over
    two micro-batches, and the stage log says that inductor ran the graphs without CUDA graphs (on a CPU it
    must: they are CUDA's)."""
    monkeypatch.setattr("stl.jobs.ml.train.compile_pays_on", lambda device: True)
    spec = finetune_spec(demo_data, model="tiny:t5", max_source_length=32, max_target_length=16, max_steps=2,
                         checkpoint_every=100, compile="reduce-overhead")
    outcome, lines = run_training(spec, tmp_path / "stage", cache_dir=tmp_path / "cache")
    assert outcome.steps == 2 and outcome.grad_accum == 2 and math.isfinite(outcome.final_loss)
    assert any(line.startswith("compiling with torch.compile (mode reduce-overhead: CUDA graphs)") for line in lines)
    fallbacks = [line for line in lines if "without CUDA graphs" in line]
    assert fallbacks and fallbacks[0].startswith("step 1: "), lines
    assert not any(line.startswith("CUDA graphs in use") for line in lines)


# --- cached token ids ---


def cache_files(cache: Path) -> list[Path]:
    return [path for path in cache.rglob("*") if path.is_file()]


def assert_no_pickle(cache: Path) -> None:
    files = cache_files(cache)
    assert files and all(path.suffix == ".safetensors" for path in files), files
    assert all(path.read_bytes()[:1] != b"\x80" for path in files)  # a pickle starts with 0x80


def test_second_eval_hits_the_token_cache_with_identical_metrics(tmp_path: Path, demo_data: Path) -> None:
    spec = StageSpec(
        kind=StageKind.eval,
        model="tiny:t5",
        data=str(demo_data),
        tasks=DEMO_EVAL_TASKS,
        eval=EvalConfig(max_examples=5, batch_size=4, max_new_tokens=4, samples=1),
    )
    cache = tmp_path / "cache"

    def metrics(cache_dir: Path | None) -> tuple[list[dict[str, Any]], list[str]]:
        lines: list[str] = []
        cfg = EvalRun(spec=spec, model_dir=None, device="cpu", should_stop=lambda: None, log=lines.append,
                      cache_dir=cache_dir)  # fmt: skip
        return [m.to_dict() for m in evaluate(cfg, on_step=lambda report: None)], lines

    uncached, _ = metrics(None)
    first, first_lines = metrics(cache)
    second, second_lines = metrics(cache)
    assert sum("token cache miss" in line for line in first_lines) == len(DEMO_EVAL_TASKS)
    assert sum("token cache hit" in line for line in second_lines) == len(DEMO_EVAL_TASKS)
    assert first == second == uncached
    assert_no_pickle(cache)


def test_cached_few_shot_ids_train_bit_identically_and_resume(tmp_path: Path, demo_data: Path) -> None:
    spec = finetune_spec(demo_data)
    cache = tmp_path / "cache"
    run_training(spec, tmp_path / "uncached")
    _, lines = run_training(spec, tmp_path / "first", cache_dir=cache)
    assert any("token cache miss" in line for line in lines)
    # Preempted and resumed, both halves reading the cache: still the uninterrupted run's weights.
    calls = {"n": 0}

    def preempt_after_two() -> str | None:
        calls["n"] += 1
        return "preempt" if calls["n"] > 2 else None

    with pytest.raises(StagePreempted):
        run_training(spec, tmp_path / "resumed", cache_dir=cache, should_stop=preempt_after_two)
    outcome, lines = run_training(spec, tmp_path / "resumed", cache_dir=cache)
    assert outcome.resumed_from == 2 and any("token cache hit" in line for line in lines)
    assert any("row index cache hit" in line for line in lines)
    assert_same_weights(tmp_path / "uncached", tmp_path / "first")
    assert_same_weights(tmp_path / "uncached", tmp_path / "resumed")
    assert_no_pickle(cache)
    assert not math.isnan(outcome.final_loss)
