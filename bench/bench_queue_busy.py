"""Queue operations while a run trains: `stl status --once` and `stl enqueue` of 10,000 runs, with a worker
training a stage (A) against the same moment with its work horse paused (B).

The issue "A GPU that never waits" asks that queue operations stay at the platform's targets (enqueue
<= 1 s, status <= 150 ms) while a run trains. One `stl worker` trains a long MTL stage of tiny:bart on
the demo data (one intra-op thread, as a GPU's host side keeps about one core busy launching kernels,
plus the prefetch thread), writing its progress to Redis as it does on a GPU. The two arms alternate
A B A B ...: before each A call the work horse gets SIGCONT (and a second to get back to full speed),
before each B call SIGSTOP, so both arms see the same Redis, the same 10,000 runs and the same machine,
and differ only by the training. The horse's CPU time is read from /proc during every call: a ratio
measured while nothing trained would be meaningless, so the script fails unless the horse kept at least
half a core busy through the A calls (and none through the B calls).

status   `stl status --once` (subprocess) with 10,000 runs and the training stage in Redis.
enqueue  the `stl enqueue` path in-process (parse_grid + submit_runs) of a 10,000-run grid into a second
         database of the same redis-server (flushed before each call; the worker's database is left alone).

Everything runs against a private redis-server on a free port (never the machine's Redis on 6379).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queue import STL, write_grid  # noqa: E402
from common import (  # noqa: E402
    DEMO_DATA,
    Ratio,
    Report,
    header,
    interleave,
    median,
    print_absolute,
    private_redis,
    run_quiet,
    stl_env,
)

BENCH = "queue-busy"
RESUME_S = 1.0  # after SIGCONT: the horse's step loop is back at full speed well within this
PAUSE_S = 0.2  # after SIGSTOP: let a step in flight end its system calls


def write_training_grid(directory: Path) -> Path:
    """One run whose MTL stage trains for far longer than the benchmark lasts."""
    text = "\n".join([
        "name: bench-busy-training",
        f"data: {DEMO_DATA}",
        "tasks:",
        "  train: [sentiment_classification, intent_classification, response_generation]",
        "  eval: [emotion_classification]",
        "grid:",
        "  model: tiny:bart",
        "  mtl: in-domain",
        "  instructions: true",
        "  shots: 0",
        "  seed: 0",
        "train:",
        "  max_steps: 1000000",
        "  batch_size: 8",
        "  max_source_length: 160",
        "  max_target_length: 32",
        "  checkpoint_every: 1000000",
        "",
    ])
    path = directory / "training.yaml"
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class TrainingWorker:
    """`stl worker` training one long stage; its work horse can be paused and resumed."""

    def __init__(self, server: Any, home: Path, workdir: Path, stage_id: str) -> None:
        env = stl_env(server.url, home, user="trainer")
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.log = workdir / "worker.log"
        self.stage_id = stage_id
        self.conn = server.client()
        with self.log.open("w") as handle:
            self.process = subprocess.Popen([STL, "worker"], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.horse = 0

    def step(self) -> int:
        from stl.jobs import keys

        value = self.conn.hget(keys.stage(self.stage_id), "step")
        return int(value or 0)

    def wait_until_training(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"stl worker exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            horses = children_of(self.process.pid)
            if horses and self.step() >= 2:
                self.horse = horses[0]
                return
            time.sleep(0.5)
        raise SystemExit(f"the training stage did not start within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def resume(self) -> None:
        os.kill(self.horse, signal.SIGCONT)

    def pause(self) -> None:
        os.kill(self.horse, signal.SIGSTOP)

    def stop(self) -> None:
        horses = {*children_of(self.process.pid), self.horse} - {0}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in horses:  # RQ puts each work horse in a session of its own: killpg does not reach it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5000, help="seeds in the grid; runs = 2 x seeds (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for enqueue (default 5)")
    parser.add_argument("--status-rounds", type=int, default=10, help="interleaved rounds for status (default 10)")
    parser.add_argument("--only", choices=["enqueue", "status"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds allowed for the stage to start")
    args = parser.parse_args()
    parts = set(args.only or ["enqueue", "status"])

    from stl.jobs.grid.parse import parse_grid
    from stl.jobs.queue.queueing import submit_runs

    header("bench_queue_busy: enqueue and status while a stage trains (A) vs with its work horse paused (B)")
    with tempfile.TemporaryDirectory(prefix="stl-bench-busy-") as tmp, private_redis() as server:
        workdir = Path(tmp)
        home = workdir / "stl-home"
        training = parse_grid(write_training_grid(workdir), max_runs=1)
        (mtl_stage,) = [sid for sid, spec in training.stages.items() if spec.kind.value == "mtl"]
        conn = server.client()
        submit_runs(conn, training.runs, training.stages, user="trainer", priority="normal",
                    stage_timeout=training.grid.stage_timeout)
        worker = TrainingWorker(server, home, workdir, mtl_stage)
        try:
            worker.wait_until_training(args.start_timeout)
            print(f"worker training stage {mtl_stage} (work horse pid {worker.horse}, step {worker.step()})")
            # Queued behind the training stage: the worker does not reach them while the benchmark lasts.
            grid_path = write_grid(workdir, args.seeds)
            grid = parse_grid(grid_path, max_runs=10_000)
            submit_runs(conn, grid.runs, grid.stages, user="bench", priority="normal",
                        stage_timeout=grid.grid.stage_timeout)
            n_runs = len(grid.runs)
            horse_busy: dict[str, list[float]] = {"while training": [], "work horse paused": []}
            wall: dict[str, list[float]] = {"while training": [], "work horse paused": []}

            def arm(name: str, fn: Any) -> Any:
                def timed() -> float:
                    cpu_before = cpu_seconds(worker.horse)
                    started = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - started
                    horse_busy[name].append(cpu_seconds(worker.horse) - cpu_before)
                    wall[name].append(elapsed)
                    return elapsed
                return timed

            def busy_note() -> str:
                return ("work horse CPU during the timed calls: " + "; ".join(
                    f"{name} {sum(horse_busy[name]):.1f} s over {sum(wall[name]):.1f} s wall"
                    for name in horse_busy))

            def clear_busy() -> None:
                for values in (*horse_busy.values(), *wall.values()):
                    values.clear()

            def check_busy() -> None:
                trained, paused = sum(horse_busy["while training"]), sum(horse_busy["work horse paused"])
                if trained < 0.5 * sum(wall["while training"]) or paused > 0.05 * sum(wall["work horse paused"]):
                    raise SystemExit(f"the work horse was not training in A and paused in B: {busy_note()}")

            def before(name: str) -> None:
                if name == "while training":
                    worker.resume()
                    time.sleep(RESUME_S)
                else:
                    worker.pause()
                    time.sleep(PAUSE_S)

            def paired(part: str, fn: Any, rounds: int, before_each: Any, title: str, what: str, *, scale: float,
                       unit: str, target: str) -> None:
                """A B A B ...: A with the horse training, B with it paused; the ratio, then A against the target."""
                clear_busy()
                results = interleave({"while training": arm("while training", fn),
                                      "work horse paused": arm("work horse paused", fn)},
                                     rounds=rounds, warmup=1, before=before_each)
                Report(title, results, bench=f"{BENCH}:{part}", notes=[busy_note()], ratios=[
                    Ratio("while training", "work horse paused",
                          f"{part} while training / {part} with the horse paused")]).print()
                check_busy()
                print_absolute(f"{BENCH}:{part}", f"{what} while training", median(results["while training"]) * scale,
                               unit, target)

            if "status" in parts:
                env = stl_env(server.url, home)
                outputs: list[str] = []

                def status() -> None:
                    outputs.append(run_quiet([STL, "status", "--once"], env=env).stdout)

                print(f"\nstl status --once with {n_runs:,} runs queued and one training: "
                      f"{args.status_rounds} interleaved rounds")
                paired("status", status, args.status_rounds, before, f"stl status --once, {n_runs:,} runs, a stage "
                       "training", "stl status --once", scale=1000, unit="ms", target="<= 150 ms")
                assert f"{n_runs:,}" in outputs[-1] or str(n_runs) in outputs[-1], outputs[-1][-500:]
            if "enqueue" in parts:
                second = server.url.rsplit("/", 1)[0] + "/1"
                import redis

                other = redis.Redis.from_url(second)

                def enqueue() -> None:
                    expanded = parse_grid(grid_path, max_runs=10_000)
                    report = submit_runs(other, expanded.runs, expanded.stages, user="bench", priority="normal",
                                         stage_timeout=expanded.grid.stage_timeout)
                    assert len(report.queued) == n_runs, report

                def before_enqueue(name: str) -> None:
                    other.flushdb()  # the second database only: the worker's records stay
                    before(name)

                print(f"\nstl enqueue of {n_runs:,} runs (in-process, a second database) while a stage trains: "
                      f"{args.rounds} interleaved rounds")
                paired("enqueue", enqueue, args.rounds, before_enqueue, f"stl enqueue of {n_runs:,} runs, a stage "
                       "training", f"stl enqueue in-process, {n_runs:,} runs", scale=1, unit="s", target="<= 1 s")
                other.flushdb()
                other.close()
            worker.resume()
            if worker.process.poll() is not None:
                raise SystemExit(f"stl worker exited during the benchmark:\n{worker.log.read_text()[-3000:]}")
        finally:
            worker.stop()
            conn.close()


if __name__ == "__main__":
    main()
