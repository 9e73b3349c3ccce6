"""stl's own stage code on a GPU, end to end (bench/gpu.sh runs it first; a minute on one GPU).

The benchmarks time `train()` and `evaluate()`; this checks the paths around them that only CUDA takes,
through `stl.jobs.ml.stages.execute_stage`, the function the worker's horse calls:
  1. an MTL stage of tiny:t5 with `train.compile: reduce-overhead` (inductor, CUDA graphs, length buckets,
     two micro-batches per step, caches under a temporary STL_HOME/cache), preempted half-way as SIGTERM
     would, then resumed: the resumed stage must log `resumed from step N` (model, optimizer, scheduler and
     CUDA RNG states from the checkpoint), and on CUDA that CUDA graphs are in use;
  2. a few-shot stage from that model, eager;
  3. an eval stage from the few-shot model with `eval.compile: true` (rank classification, and greedy
     generation in stl's decoding loop, its step compiled, which must replay CUDA graphs; filler rows in
     the last batch), then the same without it (the loop's eager step recorded as a CUDA graph per batch
     shape, which must replay); in that order, as a recording that fails breaks later ones in the process;
  4. NVML's reading of the GPU, as `stl status` shows it (the worker's parent never touches CUDA);
  5. (run right after item 1) one optimizer step's gradients, accumulated over two micro-batches replayed
     as CUDA graphs, against eager ones from the same weights and batch (same direction and size: the
     graphs' memory is reused between replays, and a gradient left there would be overwritten);
  6. the decoding loop's recorded CUDA graphs at BART-base's size (random weights, bf16): a batch, then
     another of the same shape (replaying the first one's graph on reset buffers), then the first again
     must give the first's tokens bit for bit, and nearly all of the eager loop's tokens; then batches of
     two shapes in turn, each recorded anew, must leave the memory reserved flat (dropped graphs' pools are
     given back); a step that syncs must be refused while it records, and recording must work afterwards.
It prints what to look at (first-step seconds, which hold the compile; MFU; metrics) and exits 1 on a
failure. On a CPU it runs the same stages eager (stl skips compile there), as a check of this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEMO_DATA, header  # noqa: E402
from ml import DECODING_LINES, quiet_transformers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--steps", type=int, default=60, help="MTL steps (default 60; preempted at half)")
    args = parser.parse_args()

    from stl.jobs.errors import StagePreempted
    from stl.jobs.ml.demo_dataset import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS
    from stl.jobs.ml.stages import StageContext, execute_stage
    from stl.jobs.specs import EvalConfig, StageKind, StageSpec, TrainConfig
    from stl.worker.gpu import GpuProbe

    header(f"gpu_check: stl's stages on {args.device} (tiny:t5, demo data)", args.device)
    quiet_transformers()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stl-gpu-check-") as tmp:
        home = Path(tmp)
        reports: list[Any] = []
        lines: list[str] = []
        stop_at = [0]  # the should_stop call that asks for a preemption; 0: never
        calls = [0]

        def should_stop() -> str | None:
            calls[0] += 1
            return "preempt" if calls[0] == stop_at[0] else None

        def context(name: str, parent: str | None) -> StageContext:
            return StageContext(workdir=home / "stages" / name, parent_dir=None if parent is None else
                                home / "stages" / parent, device=args.device, on_step=reports.append,
                                should_stop=should_stop, log=lines.append, cache_dir=home / "cache")

        def step_report(name: str, started: float) -> None:
            trained = [r for r in reports if r.phase == "train"]
            if not trained:
                failures.append(f"{name}: no progress reports")
                return
            first, last = trained[0], trained[-1]
            mfu = "n/a" if last.mfu is None else f"{last.mfu:.1%}"
            print(f"   note: {name}: {time.perf_counter() - started:.1f} s; first report (step {first.step}) after "
                  f"{first.elapsed_s:.1f} s of training; last (step {last.step}): {last.samples_per_s:.0f} "
                  f"samples/s, MFU {mfu}", flush=True)
            reports.clear()

        mtl = StageSpec(kind=StageKind.mtl, model="tiny:t5", data=str(DEMO_DATA), tasks=DEMO_TRAIN_TASKS,
                        # 64 source tokens (byte-level: most prompts are longer) keep the compile to
                        # one or two bucket shapes, so the check stays near a minute.
                        train=TrainConfig(max_steps=args.steps, batch_size=16, grad_accum=2, max_source_length=64,
                                          max_target_length=32, checkpoint_every=10, compile="reduce-overhead"))
        started = time.perf_counter()
        stop_at[0] = args.steps // 2 + 1  # before step steps/2 + 1: checkpoint at steps/2, then stop
        try:
            execute_stage(mtl, context("mtl", None))
            failures.append("the MTL stage was not preempted")
        except StagePreempted as e:
            print(f"   preempted: {e}")
        step_report("mtl, until preempted", started)
        started, stop_at[0], calls[0] = time.perf_counter(), 0, 0
        outcome = execute_stage(mtl, context("mtl", None))
        step_report("mtl, resumed", started)
        resumed = [line for line in lines if line.startswith("resumed from step")]
        print(f"   note: {resumed or 'no resume line'}; final loss "
              f"{outcome.train.final_loss if outcome.train else '?'}")
        if resumed != [f"resumed from step {args.steps // 2}"]:
            failures.append(f"expected one 'resumed from step {args.steps // 2}', got {resumed}")
        compile_lines = [line for line in lines if line.startswith(("compiling", "compile skipped", "CUDA graphs"))
                         or "without CUDA graphs" in line]
        print(f"   note: {' | '.join(compile_lines[-3:]) if compile_lines else 'no compile line'}")
        # Both lines count: a resumed stage in this process reuses the compiled graphs, so inductor (which
        # counts skips when it compiles) has no new skip to report then, and the stage says "in use".
        skipped = [line for line in lines if "without CUDA graphs" in line]
        if args.device.startswith("cuda") and (skipped or not any(line.startswith("CUDA graphs in use")
                                                                  for line in lines)):
            failures.append(f"train.compile: reduce-overhead did not run CUDA graphs: {compile_lines}")
        # Item 5 here, on the MTL stage's cache, so that a time limit cuts the eval checks rather than this.
        failure = check_accumulated_gradients(args.device, home / "gradients", home / "cache")
        if failure:
            failures.append(failure)

        finetune = StageSpec(kind=StageKind.finetune, model="tiny:t5", parent=mtl.stage_id, data=str(DEMO_DATA),
                             tasks=(DEMO_EVAL_TASKS[0],), shots=8,
                             train=TrainConfig(max_steps=20, batch_size=8, max_source_length=128,
                                               max_target_length=32))
        started = time.perf_counter()
        execute_stage(finetune, context("finetune", "mtl"))
        step_report("finetune", started)

        # Eval with eval.compile first (stl's decoding loop over a static KV cache, compiled into CUDA graphs):
        # a CUDA graph recording that fails in this process breaks later ones, so each kind runs before
        # the next can break it.
        # 45 examples in batches of 16: the last batch needs filler rows.
        compiled = StageSpec(kind=StageKind.eval, model="tiny:t5", parent=finetune.stage_id, data=str(DEMO_DATA),
                             tasks=DEMO_EVAL_TASKS, eval=EvalConfig(max_examples=45, batch_size=16,
                                                                     max_new_tokens=16, compile=True))
        started = time.perf_counter()
        lines.clear()
        compiled_metrics = execute_stage(compiled, context("eval-compiled", "finetune")).metrics
        static_lines = [line for line in lines if line.startswith(("generation decodes with a static",
                                                                   "eval.compile skipped"))]
        # stl's own decoding loop, its step compiled, should replay CUDA graphs (jobs/ml/decoding.py).
        loop_lines = [line for line in lines if line.startswith(DECODING_LINES)]
        print("   note: eval, compiled, decoding: " + ("; ".join(loop_lines) or "no decoding line"))
        print(f"   note: eval, compiled: {time.perf_counter() - started:.1f} s (compile included); "
              + "; ".join(f"{m.task} {m.metric} {m.value:.3f} (n={m.n})" for m in compiled_metrics)
              + f"; {static_lines[-1] if static_lines else 'no static-decoding line'}")
        if [(m.task, m.n) for m in compiled_metrics] != [(task, 45) for task in DEMO_EVAL_TASKS]:
            failures.append(f"compiled eval metrics incomplete: {[(m.task, m.n) for m in compiled_metrics]}")
        if args.device.startswith("cuda") and not any(line.startswith("generation decodes with a static")
                                                      for line in static_lines):
            failures.append(f"eval.compile did not decode with a static KV cache on CUDA: {static_lines}")
        if args.device.startswith("cuda") and not any(line.startswith("CUDA graphs in use: each decoded")
                                                      for line in loop_lines):
            failures.append(f"eval.compile: stl's decoding loop did not replay CUDA graphs: {loop_lines}")

        evaluation = StageSpec(kind=StageKind.eval, model="tiny:t5", parent=finetune.stage_id, data=str(DEMO_DATA),
                               tasks=DEMO_EVAL_TASKS, eval=EvalConfig(max_examples=48, batch_size=16,
                                                                       max_new_tokens=16))
        started = time.perf_counter()
        lines.clear()
        metrics = execute_stage(evaluation, context("eval", "finetune")).metrics
        eager_lines = [line for line in lines if line.startswith(DECODING_LINES)]
        print("   note: eval, decoding: " + ("; ".join(eager_lines) or "no decoding line"))
        print(f"   note: eval: {time.perf_counter() - started:.1f} s; "
              + "; ".join(f"{m.task} {m.metric} {m.value:.3f} (n={m.n})" for m in metrics))
        if [m.task for m in metrics] != list(DEMO_EVAL_TASKS) or any(m.n != 48 for m in metrics):
            failures.append(f"eval metrics incomplete: {[(m.task, m.n) for m in metrics]}")
        if args.device.startswith("cuda") and not any(line.startswith("CUDA graphs in use: each decoded")
                                                      for line in eager_lines):
            failures.append(f"eval: stl's decoding loop did not replay its recorded CUDA graph: {eager_lines}")
        failure = check_decoding_graphs(args.device)
        if failure:
            failures.append(failure)

    probe = GpuProbe(0).read()
    print(f"   note: NVML: {probe}")
    if args.device.startswith("cuda") and probe["gpu"] in ("cpu", "unknown"):
        failures.append("NVML read no GPU: `stl status` would show this worker as cpu")
    for failure in failures:
        print(f"   note: FAILED: {failure}")
    print("RESULT " + json.dumps({"bench": f"gpu_check:{args.device}", "label": "stage-path failures",
                                  "value": len(failures), "unit": "(0 = all passed)", "absolute": True}))
    return 1 if failures else 0


def check_decoding_graphs(device: str) -> str | None:
    """Item 6: the decoding loop's recorded CUDA graphs against themselves and the eager loop; a failure,
    or None."""
    if not device.startswith("cuda"):
        print("   note: decoding graphs: skipped (CUDA graphs need a CUDA device)")
        return None
    try:
        return _compare_decoding_graphs(device)
    except Exception as e:
        print(f"   note: decoding graph check raised {type(e).__name__}: {str(e)[:500]}")
        return f"the decoding graph check raised {type(e).__name__}: {str(e)[:200]}"


def _compare_decoding_graphs(device: str) -> str | None:
    import torch
    from ml import VOCAB, model_config, stl_decoder, use_bench_token_ids
    from transformers import AutoModelForSeq2SeqLM

    started = time.perf_counter()
    torch.manual_seed(0)
    vocab = VOCAB["bart-base"]
    model = AutoModelForSeq2SeqLM.from_config(model_config("bart-base", vocab)).eval().to(device, torch.bfloat16)
    use_bench_token_ids(model)
    first, second = (torch.randint(3, vocab, (16, 96), device=device) for _ in range(2))
    mask = torch.ones_like(first)
    mask[8:, 80:] = 0  # padded rows: the cross-attention mask is part of what the graph replays
    graphs = stl_decoder(model, 24, compiled=False, cuda_graphs=True)
    recorded = graphs.decode(first, mask)
    graphs.decode(second, mask)  # the same shape: replays the graph recorded for `first`
    replayed = graphs.decode(first, mask)
    eager = stl_decoder(model, 24, compiled=False).decode(first, mask)
    agreement = float((recorded == eager).float().mean())
    print(f"   note: decoding graphs (bart-base size, bf16): replay after another batch equal to the recording: "
          f"{bool(torch.equal(recorded, replayed))}; tokens equal to the eager loop's at {agreement:.1%} of "
          f"positions ({time.perf_counter() - started:.1f} s)")
    if not torch.equal(recorded, replayed):
        return "the decoding loop's CUDA graph gave other tokens when replayed for a second batch of its shape"
    if agreement < 0.95:
        return f"the decoding loop's CUDA graph agrees with the eager loop at only {agreement:.1%} of tokens"
    # Two batch shapes in turn, one kept at a time: each batch records anew and lets the other's graph go.
    # Each graph has a memory pool of its own, which the loop must give back when it drops the graph.
    reserved = []
    for width in (96, 112) * 4:
        sources = torch.randint(3, vocab, (64, width), device=device)
        graphs.decode(sources, torch.ones_like(sources))
        reserved.append(torch.cuda.memory_reserved(device) / 2**20)
    growth = reserved[-1] - reserved[1]
    print(f"   note: decoding graphs, 8 batches of two shapes in turn (each recorded anew): GPU memory reserved "
          f"after each {', '.join(f'{mib:.0f}' for mib in reserved)} MiB")
    if growth > 64:
        return f"memory reserved grew by {growth:.0f} MiB over 6 recordings: dropped graphs' pools pile up"
    return _check_refused_recording(model, first, mask, recorded, device)


def _check_refused_recording(model: Any, first: Any, mask: Any, recorded: Any, device: str) -> str | None:
    """A step that syncs (BART without the decoder mask the loop passes it) must be refused while it records,
    leaving this process able to record again, random numbers included."""
    import torch
    from ml import stl_decoder

    from stl.jobs.errors import StepNotRecordable

    syncing = stl_decoder(model, 24, compiled=False, cuda_graphs=True)
    syncing._pass_decoder_mask = False
    refusal = None
    try:
        syncing.decode(first, mask)
    except StepNotRecordable as e:
        refusal = str(e)
    syncing.release()
    again = stl_decoder(model, 24, compiled=False, cuda_graphs=True).decode(first, mask)
    graph, noise = torch.cuda.CUDAGraph(), torch.zeros(4, device=device)
    with torch.cuda.graph(graph):
        noise.uniform_()
    graph.replay()
    print(f"   note: a syncing step: {refusal or 'not refused'}; recording afterwards gives the same tokens: "
          f"{bool(torch.equal(again, recorded))}; a graph of random numbers records and replays")
    if refusal is None:
        return "a decoding step that waits for the GPU was not refused while it recorded"
    if not torch.equal(again, recorded):
        return "after a refused recording, the decoding loop's recorded graph gave other tokens"
    return None


def check_accumulated_gradients(device: str, workdir: Path, cache_dir: Path) -> str | None:
    """Item 5: gradients of one step over two micro-batches, CUDA graphs vs eager; a failure, or None."""
    try:
        return _compare_accumulated_gradients(device, workdir, cache_dir)
    except Exception as e:  # e.g. torch's "accessing tensor output of CUDAGraphs that has been overwritten"
        print(f"   note: gradient check raised {type(e).__name__}: {str(e)[:500]}")
        return f"the gradient check raised {type(e).__name__}: {str(e)[:200]}"


def _compare_accumulated_gradients(device: str, workdir: Path, cache_dir: Path) -> str | None:
    import torch

    from stl.jobs.ml.acceleration import cuda_graph_skips
    from stl.jobs.ml.checkpoint import CheckpointStore
    from stl.jobs.ml.demo_dataset import DEMO_TRAIN_TASKS
    from stl.jobs.ml.train import TrainRun, _OomInjection, _Plan, _TrainingSession
    from stl.jobs.specs import StageKind, StageSpec, TrainConfig

    def gradients(compile_mode: bool | Literal["reduce-overhead"]) -> tuple[torch.Tensor, bool]:
        """The step's gradients, and whether they came through CUDA graphs."""
        settings = TrainConfig(max_steps=10, batch_size=16, grad_accum=2, max_source_length=64, max_target_length=32,
                               compile=compile_mode)
        spec = StageSpec(kind=StageKind.mtl, model="tiny:t5", data=str(DEMO_DATA), tasks=DEMO_TRAIN_TASKS,
                         train=settings)
        cfg = TrainRun(spec=spec, workdir=workdir / str(compile_mode), init_from=None, device=device,
                       should_stop=lambda: None, log=lambda _line: None, cache_dir=cache_dir)
        skips = cuda_graph_skips()
        store = CheckpointStore(cfg.workdir, spec.stage_id, cfg.log)
        session = _TrainingSession(cfg, settings, _Plan.for_micro_batch(16, 8), [], _OomInjection(None), store, None)
        session.model.eval()  # no dropout: both sides compute the same function
        micro_batches = next(session.batches.prepared(session.step))
        for _ in range(3):  # CUDA graph trees warm up, then record, then replay: the third call replays
            session.model.zero_grad(set_to_none=True)
            session._accumulate_gradients(micro_batches)
        grads = torch.cat([p.grad.float().flatten() for p in session.model.parameters() if p.grad is not None])
        return grads, session.cuda_graphs and cuda_graph_skips() == skips

    started = time.perf_counter()
    eager, _ = gradients(False)
    graphs, in_use = gradients("reduce-overhead")
    cosine = float(torch.nn.functional.cosine_similarity(eager, graphs, dim=0))
    size = float(graphs.norm() / eager.norm())
    print(f"   note: gradients over 2 micro-batches, CUDA graphs vs eager: cosine {cosine:.5f}, norm ratio "
          f"{size:.4f}; CUDA graphs in use: {in_use} ({time.perf_counter() - started:.1f} s)")
    if cosine < 0.99 or not 0.97 < size < 1.03:
        return f"accumulated gradients with CUDA graphs differ from eager: cosine {cosine:.4f}, norm ratio {size:.4f}"
    if device.startswith("cuda") and not in_use:
        return "the gradient check ran without CUDA graphs (set TORCH_LOGS=cudagraphs to see why)"
    return None


if __name__ == "__main__":
    sys.exit(main())
