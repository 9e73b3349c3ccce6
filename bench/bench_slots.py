"""Packing the device: one grid of 16 small stages worked off with `stl worker --burst --slots K`, K = 1, 2, 4.

The grid: 8 runs (seeds 0-7) of one model, each an in-domain MTL stage of --steps steps, then a zero-shot eval
stage on two held-out tasks of the demo data: 16 stages. Every K starts from a flushed private Redis and a cold
STL_HOME (nothing reused between K); with --rounds > 1 the order alternates (1 2 4 4 2 1 ...), as the machine
is shared and noisy.

It reports, for each K:
- the wall time of the whole grid and its ratio to --slots 1 (issue 25's target on a GPU: <= 0.55 at K = 4);
- on a GPU, the share of that wall time the GPU was busy: NVML's utilisation (the share of each sample period a
  kernel ran) sampled every 100 ms while the worker ran, i.e. while stages were queued or running (target >= 95 %
  at the best K);
- the sharing mode the worker reported (MPS or time-slicing; cpu);
- whether every result (run x task) equals the --slots 1 result (exactly, or within --tolerance).

On a CPU (the default when torch sees no GPU) it checks the plumbing with a tiny model: figures are indicative.
Everything runs on a private redis-server on a free port, never the machine's Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Ratio, Report, header, print_absolute, private_redis, stl_env  # noqa: E402
from ml import DEMO_CLASSIFICATION, DEMO_GENERATION, DEMO_TRAIN, prepare  # noqa: E402

BENCH = "slots"
GRID_NAME = "bench-slots"
SEEDS = 8  # 8 runs x (MTL + eval) = 16 stages
STL = [sys.executable, "-m", "stl.cli.main"]  # the checkout's stl, also where it is not installed (a lent GPU)


def write_grid(directory: Path, model_dir: Path, data: Path, *, steps: int, batch_size: int, source_len: int,
               target_len: int, eval_examples: int) -> Path:
    grid = {
        "name": GRID_NAME,
        "data": str(data),
        "tasks": {"train": list(DEMO_TRAIN), "eval": [DEMO_CLASSIFICATION, DEMO_GENERATION]},
        "grid": {"model": [str(model_dir)], "mtl": ["in-domain"], "instructions": [False], "shots": [0],
                 "seed": list(range(SEEDS))},
        "train": {"max_steps": steps, "batch_size": batch_size, "max_source_length": source_len,
                  "max_target_length": target_len, "checkpoint_every": max(steps, 1)},
        "eval": {"max_examples": eval_examples, "batch_size": min(eval_examples, 64), "max_new_tokens": target_len,
                 "max_source_length": source_len},
    }
    path = directory / "slots.yaml"
    path.write_text(json.dumps(grid, indent=1))  # JSON is YAML
    return path


class UtilisationSampler:
    """NVML's GPU utilisation every `interval` s in a thread; nothing (and no error) without NVML."""

    def __init__(self, gpu_index: int, interval: float = 0.1) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu_index, self._interval = gpu_index, interval

    def __enter__(self) -> UtilisationSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._gpu_index)
        except Exception:  # noqa: BLE001 - no NVML, no driver: a CPU run
            return self

        def sample() -> None:
            while not self._stop.wait(self._interval):
                with contextlib.suppress(Exception):
                    self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def busy_share(self) -> float | None:
        return statistics.fmean(self.samples) / 100.0 if self.samples else None


def sharing_modes(conn: Any) -> set[str]:
    """The sharing mode each live worker record names (field `sharing`), e.g. {"MPS"} or {"time-slicing"}."""
    from stl.jobs import keys

    modes = set()
    for name in conn.smembers(keys.WORKERS):
        mode = conn.hget(keys.worker(name.decode()), "sharing")
        if mode:
            modes.add(mode.decode())
    return modes


def results_by_cell(env: dict[str, str]) -> dict[tuple[str, str], float]:
    out = subprocess.run([*STL, "results", GRID_NAME, "--json"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return {(row["run"], row["task"]): float(row["value"]) for row in json.loads(out)["rows"]}


def run_grid(slots: int, grid: Path, redis_url: str, flush: Any, client: Any, work: Path, gpu_index: int | None,
             timeout: float) -> tuple[float, float | None, set[str], dict[tuple[str, str], float]]:
    """(wall seconds, GPU busy share, sharing modes seen, results) of one cold run of the grid at `slots`."""
    flush()
    home = Path(tempfile.mkdtemp(prefix=f"slots{slots}-", dir=work))
    env = stl_env(redis_url, home)
    subprocess.run([*STL, "enqueue", str(grid)], env=env, check=True, capture_output=True)
    command = [*STL, "worker", "--burst", "--slots", str(slots)]
    if gpu_index is not None:
        command += ["--gpu", str(gpu_index)]
    modes: set[str] = set()
    log = work / f"worker-slots{slots}.log"
    with UtilisationSampler(gpu_index or 0) as sampler, log.open("w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        while process.poll() is None:
            if time.perf_counter() - started > timeout:
                process.kill()
                raise SystemExit(f"--slots {slots} ran past {timeout:.0f} s; worker log, its end:\n"
                                 f"{log.read_text()[-6000:]}")
            with contextlib.suppress(Exception):
                modes |= sharing_modes(client)
            time.sleep(0.5)
        wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"`stl worker --slots {slots}` exited {process.returncode}:\n{log.read_text()[-3000:]}")
    results = results_by_cell(env)
    if len(results) != SEEDS * 2:
        # The work folder goes with the run: what went wrong is printed here.
        runs = subprocess.run([*STL, "status", "--json"], env=env, capture_output=True, text=True).stdout
        raise SystemExit(f"--slots {slots}: {len(results)} results, expected {SEEDS * 2}.\nstl status --json: "
                         f"{runs[-3000:]}\nworker log, its end:\n{log.read_text()[-6000:]}")
    return wall, sampler.busy_share(), modes, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--slots", default="1,2,4", help="slot counts to compare (default 1,2,4; 1 is the reference)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="MTL steps per stage (default 300 GPU, 8 CPU)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="largest difference from --slots 1 a result may show (default 0: equal)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one worker run may take")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    header(f"bench_slots: 16 stages, `stl worker --burst --slots K`, device {device}", device)
    slot_counts = [int(k) for k in args.slots.split(",")]
    if slot_counts[0] != 1:
        raise SystemExit("--slots must start with 1: it is the reference")
    steps = args.steps or (300 if gpu else 8)
    size, batch, source_len, target_len, examples = (("t5-small", 64, 256, 32, 128) if gpu
                                                     else ("tiny", 4, 96, 8, 8))
    with tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp, private_redis() as server:
        work = Path(tmp)
        setup = prepare(work / "model", size=size, data="demo", source_len=source_len, target_len=target_len,
                        rows_per_task=0)
        grid = write_grid(work, setup.model_dir, setup.data, steps=steps, batch_size=batch, source_len=source_len,
                          target_len=target_len, eval_examples=examples)
        client = server.client()
        walls: dict[str, list[float]] = {f"slots={k}": [] for k in slot_counts}
        busy: dict[int, list[float]] = {k: [] for k in slot_counts}
        modes: dict[int, set[str]] = {k: set() for k in slot_counts}
        reference: dict[tuple[str, str], float] = {}
        worst: dict[int, float] = dict.fromkeys(slot_counts, 0.0)
        for round_number in range(args.rounds):
            order = slot_counts if round_number % 2 == 0 else list(reversed(slot_counts))
            for k in order:
                wall, share, seen, results = run_grid(k, grid, server.url, server.flush, client, work,
                                                      0 if gpu else None, args.timeout)
                print(f"  round {round_number + 1}/{args.rounds}  --slots {k}: {wall:8.1f} s"
                      + (f", GPU busy {share:.1%}" if share is not None else "") + f", mode {'/'.join(seen) or '?'}",
                      flush=True)
                walls[f"slots={k}"].append(wall)
                if share is not None:
                    busy[k].append(share)
                modes[k] |= seen
                if k == 1 and not reference:
                    reference = results
                if reference:
                    worst[k] = max(worst[k], max(abs(results[c] - reference[c]) for c in reference))
        notes = [f"--slots {k}: sharing mode {'/'.join(sorted(modes[k])) or 'not reported'}; largest result "
                 f"difference from --slots 1: {worst[k]:.3g} (tolerance {args.tolerance:g})" for k in slot_counts]
        Report(title="wall time of the 16-stage grid", results=walls, bench=BENCH,
               ratios=[Ratio(f"slots={k}", "slots=1", f"wall --slots {k} / --slots 1",
                             "<= 0.55 on a GPU" if k == 4 else "") for k in slot_counts[1:]],
               notes=notes).print()
        for k in slot_counts:
            if busy[k]:
                print_absolute(BENCH, f"GPU busy share at --slots {k}", statistics.fmean(busy[k]) * 100, "%",
                               ">= 95 at the best K")
        if any(worst[k] > args.tolerance for k in slot_counts):
            raise SystemExit("results differ from --slots 1 beyond the tolerance (see the notes above)")


if __name__ == "__main__":
    main()
