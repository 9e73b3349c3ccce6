"""The idle gap between consecutive stages: a warm `stl worker --burst` vs one fresh python process per run.

The GPU sits idle from one stage's last training step to the next stage's first step. On this CPU we
measure that gap in wall time (what it contains - saving the model, handing the job over, forking,
loading the next model and data, one step - is the same work a GPU worker does between stages).

A  stl: K small training stages (fine-tuning tiny:bart on the demo data, one run each) are queued with
   `stl.jobs.queue.queueing.submit_runs` on a private redis-server, then one `stl worker --burst` runs them all.
   Step times come from STL_HOME/stages/<id>/steps.jsonl (field t; step 1 and the last step are always
   written); the stage records in Redis (started_at, ended_at) split the gap into: save + finish,
   hand-over (RQ job done -> next job dequeued, horse forked, stage started), and load + first step.
B  the naive way: K fresh `python -c` processes one after the other, each importing torch and
   transformers, building tiny:bart, training the same steps on the same examples and saving the model,
   writing the same step timestamps.
Gap = next first step - previous last step, median over all consecutive pairs of all rounds; A and B
alternate per round (A B A B ...).
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

from common import (  # noqa: E402
    DEMO_DATA,
    REPO,
    VENV_BIN,
    Ratio,
    Report,
    header,
    median,
    print_absolute,
    private_redis,
    stl_env,
)

BENCH = "gap"
TASK = "emotion_classification"

_BASELINE = r"""
import json, sys, time
import torch, transformers  # what every fresh process pays for
from stl.jobs.ml.data import few_shot_examples
from stl.jobs.ml.examples import source_text
from stl.jobs.ml.models import encode_sources, encode_targets, load_model_and_tokenizer, pad_sequences
data, task, shots, seed, steps, batch, lr, src_len, tgt_len, out = sys.argv[1:]
shots, seed, steps, batch, src_len, tgt_len = map(int, (shots, seed, steps, batch, src_len, tgt_len))
model, tok = load_model_and_tokenizer("tiny:bart", device="cpu", seed=seed)
examples = few_shot_examples(data, [task], shots, seed)
optimizer = torch.optim.AdamW(model.parameters(), lr=float(lr))
model.train()
records = []
for step in range(1, steps + 1):
    chosen = [examples[(step * batch + j) % len(examples)] for j in range(batch)]
    ids = encode_sources(tok, [source_text(e, True) for e in chosen], src_len, seq2seq=True)
    labels = encode_targets(tok, [e.output for e in chosen], tgt_len, seq2seq=True)
    loss = model(input_ids=pad_sequences(ids, tok.pad_token_id),
                 attention_mask=pad_sequences([[1] * len(i) for i in ids], 0),
                 labels=pad_sequences(labels, -100)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if step == 1 or step % 10 == 0 or step == steps:
        records.append({"step": step, "loss": value, "t": time.time()})
model.save_pretrained(out + ".model")
tok.save_pretrained(out + ".model")
with open(out, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
"""


def _stage_specs(args: argparse.Namespace, round_number: int) -> tuple[list[Any], dict[str, Any]]:
    from stl.jobs.specs import RunSpec, StageKind, StageSpec, TrainConfig

    stages: dict[str, Any] = {}
    runs = []
    for index in range(args.stages):
        seed = round_number * 1000 + index  # distinct stages every round: nothing is reused
        spec = StageSpec(kind=StageKind.finetune, model="tiny:bart", seed=seed, instructions=True,
                         data=str(DEMO_DATA), tasks=(TASK,), shots=args.shots,
                         train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=1e-3,
                                           max_source_length=args.source_len, max_target_length=args.target_len,
                                           checkpoint_every=args.steps + 1))
        stages[spec.stage_id] = spec
        runs.append(RunSpec(grid="bench-gap", cell={"seed": seed}, stages=(spec.stage_id,), eval_stages=()))
    return runs, stages


def _steps(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _thread_env(env: dict[str, str], threads: int) -> dict[str, str]:
    if threads > 0:
        env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def run_stl(server: Any, workdir: Path, args: argparse.Namespace, round_number: int,
            parts: dict[str, list[float]]) -> list[float]:
    from stl.jobs import keys
    from stl.jobs.queue.queueing import submit_runs

    server.flush()
    home = workdir / f"stl-home-{round_number}"
    runs, stages = _stage_specs(args, round_number)
    with server.client() as conn:
        submit_runs(conn, runs, stages, user="bench", priority="normal", stage_timeout=3600)
    env = _thread_env(stl_env(server.url, home), args.threads)
    log = workdir / f"worker-{round_number}.log"
    with log.open("w") as handle:
        code = subprocess.run([str(VENV_BIN / "stl"), "worker", "--burst"], env=env, stdout=handle,
                              stderr=subprocess.STDOUT, timeout=args.timeout, check=False).returncode
    with server.client() as conn:
        records = {sid: {k.decode(): v.decode() for k, v in conn.hgetall(keys.stage(sid)).items()} for sid in stages}
    failed = {sid: r.get("status") for sid, r in records.items() if r.get("status") != "finished"}
    if code != 0 or failed:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"stl worker exited {code}; stages not finished: {failed}\n{tail}")
    order = sorted(stages, key=lambda sid: float(records[sid]["started_at"]))
    timeline = []
    for sid in order:
        steps = _steps(home / "stages" / sid / "steps.jsonl")
        timeline.append({"first": steps[0]["t"], "last": steps[-1]["t"], "started": float(records[sid]["started_at"]),
                         "ended": float(records[sid]["ended_at"]), "n_steps": steps[-1]["step"]})
    gaps = []
    for previous, following in zip(timeline, timeline[1:], strict=False):
        gaps.append(following["first"] - previous["last"])
        parts["save + finish (last step -> ended_at)"].append(previous["ended"] - previous["last"])
        parts["hand-over (ended_at -> next started_at)"].append(following["started"] - previous["ended"])
        parts["load + first step (started_at -> step 1)"].append(following["first"] - following["started"])
    return gaps


def run_baseline(workdir: Path, args: argparse.Namespace, round_number: int) -> list[float]:
    env = _thread_env({**os.environ, "PYTHONPATH": str(REPO)}, args.threads)
    timeline = []
    for index in range(args.stages):
        out = workdir / f"baseline-{round_number}-{index}.jsonl"
        seed = round_number * 1000 + index
        result = subprocess.run(
            [sys.executable, "-c", _BASELINE, str(DEMO_DATA), TASK, str(args.shots), str(seed), str(args.steps),
             str(args.batch_size), "1e-3", str(args.source_len), str(args.target_len), str(out)],
            env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
        if result.returncode != 0:
            raise SystemExit(f"baseline process failed:\n{result.stderr[-3000:]}")
        steps = _steps(out)
        timeline.append({"first": steps[0]["t"], "last": steps[-1]["t"]})
    return [b["first"] - a["last"] for a, b in zip(timeline, timeline[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=4, help="consecutive stages per round (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per stage (default 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="default 4")
    parser.add_argument("--shots", type=int, default=8, help="examples per stage (default 8)")
    parser.add_argument("--source-len", type=int, default=128, help="default 128")
    parser.add_argument("--target-len", type=int, default=16, help="default 16")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both sides (default 1, steadier on a shared machine; 0 = unset)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per worker / process")
    args = parser.parse_args()
    if args.stages < 2:
        parser.error("--stages must be at least 2 (a gap needs two stages)")

    header("bench_gap: idle gap between consecutive stages (warm stl worker vs fresh process per run)")
    print(f"{args.stages} fine-tuning stages of tiny:bart per round, {args.steps} steps of batch {args.batch_size} "
          f"each, {args.rounds} interleaved rounds")
    results: dict[str, list[float]] = {"stl worker --burst": [], "fresh python per run": []}
    parts: dict[str, list[float]] = {"save + finish (last step -> ended_at)": [],
                                     "hand-over (ended_at -> next started_at)": [],
                                     "load + first step (started_at -> step 1)": []}
    with tempfile.TemporaryDirectory(prefix="stl-bench-gap-") as tmp, private_redis() as server:
        workdir = Path(tmp)
        for round_number in range(args.rounds):
            started = time.perf_counter()
            gaps = run_stl(server, workdir, args, round_number, parts)
            results["stl worker --burst"] += gaps
            print(f"  round {round_number + 1}/{args.rounds}  stl worker --burst      gaps "
                  f"{', '.join(f'{g:.3f}' for g in gaps)} s  ({time.perf_counter() - started:.0f} s)", flush=True)
            started = time.perf_counter()
            gaps = run_baseline(workdir, args, round_number)
            results["fresh python per run"] += gaps
            print(f"  round {round_number + 1}/{args.rounds}  fresh python per run    gaps "
                  f"{', '.join(f'{g:.3f}' for g in gaps)} s  ({time.perf_counter() - started:.0f} s)", flush=True)
    notes = ["stl gap split (medians): " + "; ".join(f"{name} {median(v) * 1000:.0f} ms" for name, v in parts.items())]
    Report("idle gap between consecutive stages (one value per consecutive pair)", results, bench=BENCH,
           ratios=[Ratio("stl worker --burst", "fresh python per run", "stl gap / fresh-process gap")],
           notes=notes).print()
    print_absolute(BENCH, "stl median gap", median(results["stl worker --burst"]), "s")
    for name, values in parts.items():
        print_absolute(BENCH, f"stl gap part: {name}", median(values) * 1000, "ms")


if __name__ == "__main__":
    main()
