"""Training throughput: stl's loop (jobs/ml/train.py `train`, an MTL stage) vs Hugging Face `Seq2SeqTrainer`.

Same model (identical random weights, loaded from one directory), same data, batch size, lengths,
learning rate and schedule (linear decay, no warm-up), gradient clipping 1.0, no weight decay, no
checkpoints, same precision (fp32 on CPU; on a GPU stl's bf16 autocast vs Trainer's bf16=True).
Throughput is samples/s over the steps after the warm-up steps, per wall-second and (on a CPU, the
headline there) per CPU-second of the benchmark process, which other load on a shared machine barely
moves. stl: from its check before the first measured step (`should_stop`, called before every step) to
its report of the last step (made after a host sync); Trainer: a callback at the end of the last warm-up
step and of the last step (synced).
On CUDA the warm-up must be a multiple of 10 so that stl's start mark follows one of its synced reports.
A and B are interleaved; the ratio of medians is the result. Final losses (mean over all steps) are
compared as a sanity check.

With --compile on (or both), stl's arm is (also) run with `train.compile: true`: torch.compile on CUDA with
length buckets and inductor's caches under a cache dir the rounds share, so round 1 compiles cold and later
rounds hit the cache (each round builds a new model, as each stage does). The warm-up steps hold the compile;
the time to the first step is printed per round. On a CPU stl skips compile (it logs why), so there the
compiled arm runs eager: a plumbing check only.

With --cuda-graphs, another arm runs stl with `train.compile: reduce-overhead`: torch.compile replaying each
micro-batch's forward and backward as CUDA graphs (the stage log's line on whether they ran is printed).

With --prefetch both, another arm runs stl with its batches made in the step's own thread (no prefetch
thread), and with --cuda-graphs the CUDA-graph arm gets such a twin too: the ratio of the two shows how much
of the data work (drawing, tokenizing, padding) the background thread hides. Read it per wall-second: the
thread's CPU time is the process's either way.

Each side keeps its own defaults where the comparison leaves them free: stl uses torch AdamW (fused
on CUDA; torch's default single-tensor loop on CPU) and length-grouped batches from its streaming
mixture; Trainer uses its default optimizer (adamw_torch_fused for torch >= 2.8) and a random sampler
over a pre-tokenized list.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ratio, Report, header, interleave, median, print_absolute, set_torch_threads  # noqa: E402
from ml import Setup, add_model_arguments, check_device_dtype, hf_features, load_tokenizer, prepare, sync  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

BENCH = "train"
STL, STL_COMPILED, HF = "stl train()", "stl train(), compiled", "HF Seq2SeqTrainer"
STL_INLINE = "stl train(), no prefetch"  # batches made in the step's thread (TrainRun.prefetch_batches = 0)
STL_GRAPHS = "stl train(), CUDA graphs"  # train.compile: reduce-overhead
STL_GRAPHS_INLINE = "stl train(), CUDA graphs, no prefetch"


@dataclass(frozen=True)
class StlArm:
    key: str  # in Runner's per-arm records
    name: str  # in the report
    compile: bool | str  # train.compile
    prefetch: bool = True


STL_ARMS = {arm.name: arm for arm in (
    StlArm("stl", STL, False),
    StlArm("stl-inline", STL_INLINE, False, prefetch=False),
    StlArm("stl-compiled", STL_COMPILED, True),
    StlArm("stl-graphs", STL_GRAPHS, "reduce-overhead"),
    StlArm("stl-graphs-inline", STL_GRAPHS_INLINE, "reduce-overhead", prefetch=False),
)}
REPORT_EVERY = 10  # stl.jobs.ml.train.REPORT_EVERY: stl reports (and syncs) every 10 steps, and at the last one


class Runner:
    def __init__(self, setup: Setup, args: argparse.Namespace, workdir: Path) -> None:
        self.setup, self.args, self.workdir = setup, args, workdir
        self.total = args.warmup_steps + args.steps
        self.losses: dict[str, list[float]] = {arm.key: [] for arm in STL_ARMS.values()} | {"hf": []}
        self.first_step_s: dict[str, list[float]] = {arm.key: [] for arm in STL_ARMS.values()}
        self.mfu: dict[str, list[float]] = {arm.key: [] for arm in STL_ARMS.values()}
        self.counter = 0
        self.failed: list[str] = []  # arms left out after a failed probe
        self.cpu_rates: dict[str, list[float]] = {}
        self.train_examples = self._examples()

    def _examples(self) -> list[Any]:
        from stl.jobs.ml.sources import read_examples

        return list(read_examples(str(self.setup.data), self.setup.train_tasks))

    def warm_process(self) -> None:
        """Untimed: a few forward/backward passes at the benchmark's shapes, so that one-off costs of the
        first calls in this process (kernel set-up, allocator growth) fall on neither side."""
        import torch
        from transformers import AutoModelForSeq2SeqLM

        args = self.args
        model = AutoModelForSeq2SeqLM.from_pretrained(self.setup.model_dir).to(args.device)
        model.train()
        vocab = model.config.vocab_size
        for _ in range(2):
            source = torch.randint(3, vocab, (args.batch_size, args.source_len), device=args.device)
            labels = torch.randint(3, vocab, (args.batch_size, args.target_len), device=args.device)
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = model(input_ids=source, labels=labels).loss
            loss.backward()
        sync(args.device)
        del model

    def _rate(self, name: str, start: tuple[float, float], end: tuple[float, float]) -> float:
        """Samples per wall second (returned) and per CPU second of this process (kept in cpu_rates)."""
        samples = self.args.steps * self.args.batch_size
        self.cpu_rates.setdefault(name, []).append(samples / (end[1] - start[1]))
        return samples / (end[0] - start[0])

    # --- stl ---

    def probe(self, arm: StlArm) -> bool:
        """Run `arm` once, untimed (its compile is cached for the rounds); False, with a note, if it fails."""
        started = time.perf_counter()
        try:
            self._stl(arm)
        except Exception as e:
            self._left_out(arm, e)
            return False
        finally:  # the probe's figures are not a round's
            self.cpu_rates.pop(arm.name, None)
            for records in (self.losses, self.first_step_s, self.mfu):
                records[arm.key].clear()
        print(f"   note: {arm.name}: an untimed first run (cold compile) took {time.perf_counter() - started:.1f} s",
              flush=True)
        return True

    def stl_arm(self, arm: StlArm) -> Callable[[], float]:
        def run() -> float:
            if arm.name in self.failed:
                return math.nan
            try:
                return self._stl(arm)
            except Exception as e:
                if not arm.compile:
                    raise  # the eager arm failing is the benchmark failing
                self._left_out(arm, e)
                return math.nan

        return run

    def _left_out(self, arm: StlArm, error: Exception) -> None:
        """A compiled arm failed: say so, leave it out of the figures, and drop what torch.compile holds
        (compiled code, CUDA graph trees) so that the other arms run as they would alone."""
        import torch._dynamo

        print(f"   note: {arm.name} failed, so it is left out: {type(error).__name__}: {str(error)[:300]}", flush=True)
        self.failed.append(arm.name)
        torch._dynamo.reset()

    def _stl(self, stl_arm: StlArm) -> float:
        from stl.jobs.ml.train import TrainRun, train
        from stl.jobs.specs import StageKind, StageSpec, TrainConfig

        args = self.args
        arm = stl_arm.key
        spec = StageSpec(
            kind=StageKind.mtl, model="tiny:bart", seed=args.seed, instructions=True, data=str(self.setup.data),
            tasks=self.setup.train_tasks,
            train=TrainConfig(max_steps=self.total, batch_size=args.batch_size, learning_rate=args.lr,
                              warmup_ratio=0.0, weight_decay=0.0, max_source_length=args.source_len,
                              max_target_length=args.target_len, checkpoint_every=self.total + 1,
                              compile=stl_arm.compile),
        )
        marks: dict[str, tuple[float, float]] = {}
        reports: list[tuple[int, float]] = []
        checks = [0]

        def should_stop() -> None:
            checks[0] += 1
            if checks[0] == args.warmup_steps + 1:  # the warm-up steps are done
                marks["start"] = (time.perf_counter(), time.process_time())

        def on_step(report: Any) -> None:
            if report.step == 1:  # the first step holds one-off costs: compiling, when compiled
                self.first_step_s[arm].append(report.elapsed_s)
            if report.step == self.total:
                # stl has read the loss (.item()): the device is synced
                marks["end"] = (time.perf_counter(), time.process_time())
                if report.mfu is not None:  # over the last report interval (10 steps), as in the run record
                    self.mfu[arm].append(report.mfu)
            reports.append((report.step, report.loss))

        self.counter += 1
        # The compile caches live as long as the benchmark, like STL_HOME/cache across a worker's stages.
        run = TrainRun(spec=spec, workdir=self.workdir / f"stl-{self.counter}", init_from=self.setup.model_dir,
                       device=args.device, should_stop=should_stop, log=self._log(arm),
                       cache_dir=self.workdir / "cache", prefetch_batches=2 if stl_arm.prefetch else 0)
        outcome = train(run, on_step=on_step)
        assert outcome.steps == self.total
        # Mean loss over all steps: each report averages the steps since the previous one.
        previous, weighted = 0, 0.0
        for step, loss in reports:
            weighted += loss * (step - previous)
            previous = step
        self.losses[arm].append(weighted / previous)
        return self._rate(stl_arm.name, marks["start"], marks["end"])

    def _log(self, arm: str) -> Any:
        def log(line: str) -> None:  # stl's stage log: only what bears on the comparison
            if line.startswith(("compiling", "compile skipped", "no peak FLOP/s", "CUDA graphs")) or (
                "without CUDA graphs" in line
            ):
                print(f"     [{arm}] {line}", flush=True)

        return log

    # --- Hugging Face Seq2SeqTrainer ---

    def hf(self) -> float:
        import torch
        from transformers import (
            AutoModelForSeq2SeqLM,
            DataCollatorForSeq2Seq,
            Seq2SeqTrainer,
            Seq2SeqTrainingArguments,
            TrainerCallback,
        )
        from transformers.trainer_callback import PrinterCallback

        from stl.jobs.ml.examples import source_text

        args, device = self.args, self.args.device
        tokenizer = load_tokenizer(self.setup.model_dir)
        features = hf_features(tokenizer, [source_text(e, True) for e in self.train_examples],
                               [e.output for e in self.train_examples], args.source_len, args.target_len)
        torch.manual_seed(args.seed)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.setup.model_dir)
        marks: dict[int, tuple[float, float]] = {}
        measured = (args.warmup_steps, self.total)

        class Marks(TrainerCallback):
            def on_step_end(self, _args: Any, state: Any, _control: Any, **_kwargs: Any) -> None:
                if state.global_step in measured:
                    sync(device)
                    marks[state.global_step] = (time.perf_counter(), time.process_time())

        self.counter += 1
        training_args = Seq2SeqTrainingArguments(
            output_dir=str(self.workdir / f"hf-{self.counter}"), report_to=[], save_strategy="no",
            logging_strategy="no", max_steps=self.total, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            dataloader_num_workers=0, disable_tqdm=True, seed=args.seed, use_cpu=device == "cpu",
            bf16=args.dtype == "bf16",
        )
        trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=features,  # type: ignore[arg-type]
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, padding=True),
                                 callbacks=[Marks()])
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed at the end
        output = trainer.train()
        assert trainer.state.global_step == self.total
        self.losses["hf"].append(float(output.training_loss))
        return self._rate(HF, marks[args.warmup_steps], marks[self.total])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--source-len", type=int, default=128, help="source tokens (default 128)")
    parser.add_argument("--target-len", type=int, default=32, help="target tokens (default 32)")
    parser.add_argument("--steps", type=int, default=15,
                        help="measured steps (default 15, to finish in ~2 min on 2 CPU cores; 30+ on a GPU)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="unmeasured first steps (default 5; on CUDA a multiple of 10)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="stl's arm with train.compile off (default), on, or both arms side by side")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="add an arm with train.compile: reduce-overhead (torch.compile replaying CUDA graphs)")
    parser.add_argument("--prefetch", choices=["on", "both"], default="on",
                        help="stl makes the next batches in a background thread (on, default); both adds an "
                             "eager arm that makes them in the step's thread, to measure what that hides")
    parser.add_argument("--compile-on-cpu", action="store_true",
                        help="let stl compile on a CPU too (it never does in use): checks the compiled arm's "
                             "plumbing before GPU time is spent on it; slow (inductor builds C++)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default 1 on CPU (steadier on a shared machine), "
                             "torch's default on CUDA; 0 = torch's default")
    args = parser.parse_args()
    set_torch_threads(args.threads if args.threads is not None else (1 if args.device == "cpu" else 0))
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.steps <= 0 or args.warmup_steps <= 0:
        parser.error("--steps and --warmup-steps must be positive")
    if args.device.startswith("cuda") and args.warmup_steps % REPORT_EVERY:
        parser.error(f"on CUDA --warmup-steps must be a multiple of {REPORT_EVERY} (stl syncs only at its reports)")
    check_device_dtype(args.device, args.dtype)
    if args.compile_on_cpu:
        import stl.jobs.ml.train

        stl.jobs.ml.train.compile_pays_on = lambda device: True  # stl's own gate; see --help

    header(f"bench_train: stl train loop vs Seq2SeqTrainer ({args.size}, {args.device}, {args.dtype})", args.device)
    with tempfile.TemporaryDirectory(prefix="stl-bench-train-") as tmp:
        workdir = Path(tmp)
        rows = max(args.batch_size * 8, 64)
        setup = prepare(workdir, size=args.size, data=args.data, source_len=args.source_len,
                        target_len=args.target_len, rows_per_task=rows, seed=args.seed)
        print(f"model: {args.size} ({setup.parameters / 1e6:.1f} M parameters, random weights); data {args.data}; "
              f"batch {args.batch_size}, {args.source_len} -> {args.target_len} tokens, lr {args.lr}, "
              f"{args.warmup_steps} warm-up + {args.steps} measured steps; {args.rounds} interleaved rounds")
        runner = Runner(setup, args, workdir)
        runner.warm_process()
        names = ([STL] if args.compile in ("off", "both") else []) + ([STL_INLINE] if args.prefetch == "both" else [])
        names += ([STL_COMPILED] if args.compile in ("on", "both") else []) + ([STL_GRAPHS] if args.cuda_graphs else [])
        names += [STL_GRAPHS_INLINE] if args.cuda_graphs and args.prefetch == "both" else []
        if STL_GRAPHS in names and not runner.probe(STL_ARMS[STL_GRAPHS]):
            # so that the other arms' figures still come out
            names = [name for name in names if name not in (STL_GRAPHS, STL_GRAPHS_INLINE)]
        arms = {name: runner.stl_arm(STL_ARMS[name]) for name in names}
        arms[HF] = runner.hf
        results = interleave(arms, rounds=args.rounds)
        for name in runner.failed:  # left out after a failure: no figures, no ratios
            results.pop(name, None)
            runner.cpu_rates.pop(name, None)
            arms.pop(name, None)
    hf_loss = median(runner.losses["hf"])
    notes = []
    for arm, name in ((arm.key, arm.name) for arm in STL_ARMS.values()):
        if not runner.losses[arm]:
            continue
        loss = median(runner.losses[arm])
        notes.append(f"mean training loss over all {runner.total} steps (median of rounds): {name} {loss:.4f}, "
                     f"Trainer {hf_loss:.4f} (ratio {loss / hf_loss:.3f}; same curve within noise expected)")
        notes.append(f"per-round losses: {name} {[round(x, 4) for x in runner.losses[arm]]}, "
                     f"Trainer {[round(x, 4) for x in runner.losses['hf']]}")
        compiles = " (compile included)" if STL_ARMS[name].compile else ""
        notes.append(f"seconds of {name}'s first step{compiles}, per round: "
                     f"{[round(x, 1) for x in runner.first_step_s[arm]]}")
        if runner.mfu[arm]:
            notes.append(f"{name} MFU (6*N*tokens / the GPU's bf16 peak), per round: "
                         f"{[round(x, 3) for x in runner.mfu[arm]]}")
    tag = f"{BENCH}:{args.size}:{args.device}:{args.data}"
    what = f"({args.size}, {args.device}, {args.dtype}, data {args.data})"
    ratio = [Ratio(name, HF, f"{name} samples/s / Trainer samples/s") for name in arms if name != HF]
    if STL in arms and STL_COMPILED in arms:
        ratio.append(Ratio(STL_COMPILED, STL, "compiled / eager stl samples/s"))
    if STL_GRAPHS in arms:
        ratio += [Ratio(STL_GRAPHS, other, f"CUDA graphs / {label} stl samples/s")
                  for other, label in ((STL, "eager"), (STL_COMPILED, "compiled")) if other in arms]
    if STL in arms and STL_INLINE in arms:
        ratio.append(Ratio(STL, STL_INLINE, "prefetched / inline batches, stl samples/s"))
    if STL_GRAPHS in arms and STL_GRAPHS_INLINE in arms:
        ratio.append(Ratio(STL_GRAPHS, STL_GRAPHS_INLINE, "prefetched / inline batches, stl CUDA graphs samples/s"))
    if args.device == "cpu":
        # Headline on a CPU: samples per CPU-second of the (single-threaded) process. Other people's jobs on a
        # shared machine stretch wall time at random; they hardly change the CPU time the work itself needs.
        Report(f"training throughput, samples per CPU-second {what} [headline on CPU]", runner.cpu_rates,
               unit="samples/cpu-s", higher_is_better=True, bench=tag + ":cpu-time", ratios=ratio).print()
    Report(f"training throughput, samples per wall-second {what}", results, unit="samples/s",
           higher_is_better=True, bench=tag + ":wall", ratios=ratio, notes=notes).print()
    for arm, name in ((arm.key, arm.name) for arm in STL_ARMS.values()):
        if name not in results:
            continue
        print_absolute(tag, f"{name} samples/s (wall)", median(results[name]), "samples/s")
        print_absolute(tag, f"loss ratio {name} / Trainer", median(runner.losses[arm]) / hf_loss, "x")
        if runner.mfu[arm]:
            print_absolute(tag, f"{name} MFU", median(runner.mfu[arm]), "of bf16 peak")
    print_absolute(tag, f"{HF} samples/s (wall)", median(results[HF]), "samples/s")
    if runner.failed:
        raise SystemExit(f"arms that failed: {runner.failed}")


if __name__ == "__main__":
    main()
