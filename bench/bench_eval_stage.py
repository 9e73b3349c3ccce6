"""A whole eval stage with and without `eval.compile`, each in a fresh process, as the worker runs stages.

The worker's parent imports torch and transformers once; each stage runs in a forked work horse that starts
with no compiled code in memory, only inductor's on-disk cache (STL_HOME/cache/inductor) from earlier
stages. bench_eval.py times `eval.compile` inside one process, where compiled code also stays in memory
between rounds; this times what an eval stage costs end to end in a fresh process: loading the model,
tokenizing, compiling (or loading the compiled kernels from the cache), and decoding a generation task.

Each arm is a fresh `python` child that imports torch and transformers first (the worker's parent has done
that before it forks), then times `stl.jobs.ml.evaluate.evaluate` from its call to its return:
  eager     eval.compile off
  compiled  eval.compile on, with inductor's cache warm: a first compiled child fills it, untimed (its
            seconds are printed apart: what the first such stage on a machine pays)
A and B interleaved over --rounds; the ratio of median stage seconds compiled / eager is the result (< 1:
the compiled stage is faster). Random-weight model from config, synthetic tokens, no network. On a CPU stl
skips eval.compile, so both arms decode the same way: a check of this script, not a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ratio, Report, header, interleave, median, print_absolute  # noqa: E402
from ml import add_model_arguments, check_device_dtype, prepare  # noqa: E402

BENCH = "eval-stage"
EAGER, COMPILED = "eval stage, eager", "eval stage, eval.compile"
MARK = "STAGE_RESULT "
REPO = Path(__file__).resolve().parent.parent


def run_child(config: dict[str, Any]) -> None:
    """One eval stage in this (fresh) process; prints MARK + its seconds and results as JSON."""
    import torch  # noqa: F401  (imported before the timer, as in the worker's parent)
    import transformers  # noqa: F401

    sys.path.insert(0, str(REPO))
    from stl.jobs.ml.evaluate import EvalRun, evaluate
    from stl.jobs.specs import EvalConfig, StageKind, StageSpec

    lines: list[str] = []
    spec = StageSpec(kind=StageKind.eval, model="tiny:bart", instructions=True, data=config["data"],
                     tasks=(config["task"],),
                     eval=EvalConfig(max_examples=config["examples"], batch_size=config["batch_size"],
                                     max_new_tokens=config["max_new_tokens"], max_source_length=config["source_len"],
                                     samples=0, compile=config["compile"]))
    run = EvalRun(spec=spec, model_dir=Path(config["model_dir"]), device=config["device"],
                  should_stop=lambda: None, log=lines.append, cache_dir=Path(config["cache_dir"]))
    started = time.perf_counter()
    (result,) = evaluate(run, on_step=lambda _report: None)
    seconds = time.perf_counter() - started
    compile_lines = [line for line in lines if "static KV cache" in line or "eval.compile skipped" in line]
    print(MARK + json.dumps({"seconds": seconds, "n": result.n, "value": result.value,
                             "compile_line": compile_lines[0] if compile_lines else ""}), flush=True)


def child_pythonpath() -> str:
    """The repository first, then whatever PYTHONPATH already holds (e.g. wheels unpacked to a directory)."""
    existing = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([str(REPO), existing]) if existing else str(REPO)


def stage(config: dict[str, Any], *, compile: bool) -> dict[str, Any]:
    """Run one stage in a fresh child process; its MARK record."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({**config, "compile": compile})],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": child_pythonpath()}, check=False,
    )
    records = [line[len(MARK):] for line in child.stdout.splitlines() if line.startswith(MARK)]
    if child.returncode != 0 or not records:
        raise SystemExit(f"the {'compiled' if compile else 'eager'} stage failed (exit {child.returncode}):\n"
                         + child.stderr[-3000:])
    record: dict[str, Any] = json.loads(records[-1])
    return record


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--examples", type=int, default=512, help="examples in the stage (default 512)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    check_device_dtype(args.device, args.dtype)
    header(f"{BENCH}: a whole eval stage per fresh process, eager vs eval.compile ({args.size}, {args.device})",
           args.device)
    with tempfile.TemporaryDirectory(prefix="stl-bench-eval-stage-") as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir, size=args.size, data=args.data, source_len=args.source_len,
                        target_len=args.max_new_tokens, rows_per_task=args.examples, max_new_tokens=args.max_new_tokens)
        config = {"data": str(setup.data), "task": setup.generation_task, "model_dir": str(setup.model_dir),
                  "device": args.device, "examples": args.examples, "batch_size": args.batch_size,
                  "source_len": args.source_len, "max_new_tokens": args.max_new_tokens,
                  "cache_dir": str(workdir / "cache")}
        print(f"model: {args.size} ({setup.parameters / 1e6:.1f} M parameters, random weights); {args.examples} "
              f"examples, batch {args.batch_size}, {args.source_len}-token sources, {args.max_new_tokens} new tokens; "
              f"{args.rounds} interleaved rounds", flush=True)
        cold = stage(config, compile=True)
        print(f"   note: first compiled stage, cold inductor cache: {cold['seconds']:.1f} s; {cold['compile_line']}",
              flush=True)
        values: dict[str, list[float]] = {EAGER: [], COMPILED: []}
        compile_lines: list[str] = []

        def arm(compile: bool, name: str) -> Any:
            def run() -> float:
                record = stage(config, compile=compile)
                assert record["n"] == args.examples, record
                values[name].append(record["value"])
                if compile:
                    compile_lines.append(record["compile_line"])
                return float(record["seconds"])

            return run

        results = interleave({EAGER: arm(False, EAGER), COMPILED: arm(True, COMPILED)}, rounds=args.rounds)
    tag = f"{BENCH}:{args.size}:{args.device}"
    notes = [f"ROUGE-L per stage: eager {values[EAGER]}, compiled {values[COMPILED]} (random weights: ~0; equal "
             "expected)", f"compiled stage's log: {compile_lines[-1] if compile_lines else '?'}"]
    Report(f"seconds per eval stage in a fresh process ({args.size}, {args.device}, {args.dtype})", results,
           unit="s", higher_is_better=False, bench=tag,
           ratios=[Ratio(COMPILED, EAGER, "compiled stage seconds / eager stage seconds")], notes=notes).print()
    for name in (EAGER, COMPILED):
        print_absolute(tag, f"{name} examples/s, whole stage", args.examples / median(results[name]), "examples/s")
    print_absolute(tag, "first compiled stage on a cold cache", cold["seconds"], "s")


if __name__ == "__main__":
    main()
