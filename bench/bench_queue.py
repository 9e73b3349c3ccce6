"""The lab queue: enqueue a 10,000-run grid, `stl status --once` over 10,000 runs, and `stl --help` start-up.

Targets (issue "The lab queue"): enqueue <= 1 s, status <= 150 ms, --help <= 300 ms. On this CPU the
absolute figures are indicative; the ratios against references measured in the same run are the result:

  enqueue  stl (parse_grid + submit_runs, in-process) vs RQ's own Queue.enqueue_many of the same jobs,
           and vs a raw Redis pipeline of equivalent writes (HSET job hash + RPUSH per job; and the same
           plus stl's run/stage records). The whole `stl enqueue` CLI as a subprocess is timed too.
  status   `stl status --once` subprocess vs `python -c "import redis; ...ping()"` (the interpreter
           floor) and vs `rq info`; plus where the time goes (imports / query / render), in-process.
  --help   `stl --help` vs `python -c pass` and vs `python -c "import typer"`.

Every part runs against a private redis-server on a free port (never the machine's Redis on 6379).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEMO_DATA,
    VENV_BIN,
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

BENCH = "queue"
STL = str(VENV_BIN / "stl")
RQ = str(VENV_BIN / "rq")


def write_grid(directory: Path, seeds: int) -> Path:
    """A zero-shot grid on the demo data: tiny:bart, mtl none, instructions [true, false], shots 0,
    `seeds` seeds: 2 * seeds runs of one eval stage each."""
    text = "\n".join([
        "name: bench-queue",
        f"data: {DEMO_DATA}",
        "tasks:",
        "  train: []",
        "  eval: [emotion_classification, summarization]",
        "grid:",
        "  model: [tiny:bart]",
        "  mtl: [none]",
        "  instructions: [true, false]",
        "  shots: [0]",
        f"  seed: [{', '.join(str(s) for s in range(seeds))}]",
        "eval:",
        "  max_examples: 8",
        "  batch_size: 8",
        "  max_new_tokens: 8",
        "",
    ])
    path = directory / "grid.yaml"
    path.write_text(text)
    return path


# --- enqueue ----------------------------------------------------------------------------------------


def bench_enqueue(server: Any, grid_path: Path, home: Path, rounds: int, with_cli: bool) -> list[dict[str, Any]]:
    from rq import Queue
    from rq.serializers import JSONSerializer

    from stl.jobs import keys
    from stl.jobs.grid.parse import parse_grid
    from stl.jobs.queue.queueing import (
        ENTRY_POINT,
        FAILURE_TTL_S,
        RESULT_TTL_S,
        job_id_for,
        job_template,
        make_queue,
        submit_runs,
    )

    user, priority = "bench", "normal"
    conn = server.client()
    expanded = parse_grid(grid_path, max_runs=10_000)
    n_runs, n_stages = len(expanded.runs), len(expanded.stages)
    timeout = expanded.grid.stage_timeout
    print(f"grid: {n_runs:,} runs, {n_stages:,} stages ({grid_path.stat().st_size:,} bytes of YAML)")
    stage_ids = list(expanded.stages)
    descriptions = {sid: f"{s.kind.value} {s.model} {','.join(s.tasks)[:80]}" for sid, s in expanded.stages.items()}

    parse_s: list[float] = []
    submit_s: list[float] = []

    def stl_in_process() -> float:
        started = time.perf_counter()
        grid = parse_grid(grid_path, max_runs=10_000)
        parsed = time.perf_counter()
        report = submit_runs(conn, grid.runs, grid.stages, user=user, priority=priority,
                             stage_timeout=grid.grid.stage_timeout)
        ended = time.perf_counter()
        assert len(report.queued) == n_runs and report.stages_created == n_stages, report
        parse_s.append(parsed - started)
        submit_s.append(ended - parsed)
        return ended - started

    def stl_cli() -> None:
        result = run_quiet([STL, "enqueue", str(grid_path)], env=stl_env(server.url, home, user))
        assert f"{n_runs:,}" in result.stdout or str(n_runs) in result.stdout, result.stdout

    def rq_enqueue_many() -> None:
        queue = Queue(keys.queue_name(user, priority), connection=conn, serializer=JSONSerializer)
        datas = [Queue.prepare_data(ENTRY_POINT, args=(sid,), job_id=job_id_for(sid), timeout=timeout,
                                    result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S,
                                    description=descriptions[sid]) for sid in stage_ids]
        jobs = queue.enqueue_many(datas)
        assert len(jobs) == n_stages

    def raw_writes(full: bool) -> None:
        # The same job hash stl (and RQ) writes, built once per call like stl does, then one pipeline.
        queue = make_queue(conn, user, priority)
        template, prefix, suffix = job_template(queue, timeout=timeout)
        now = f"{time.time():.6f}"
        pipe = conn.pipeline(transaction=False)
        for sid in stage_ids:
            jid = job_id_for(sid)
            pipe.hset(f"{queue.job_class.redis_job_namespace_prefix}{jid}", mapping={
                **template, "data": prefix + sid + suffix, "description": descriptions[sid], "status": "queued",
                "enqueued_at": template.get("created_at", "")})
            pipe.rpush(queue.key, jid)
        if full:  # plus stl's own records: stage hash, run hash, stage->runs set, run indexes
            for run in expanded.runs:
                sid = run.stages[0]
                spec = expanded.stages[sid]
                pipe.hset(keys.stage(sid), mapping={
                    "id": sid, "kind": spec.kind.value, "model": spec.model, "spec": spec.model_dump_json(),
                    "status": "queued", "user": user, "queue": queue.name, "created_at": now, "step": 0,
                    "total": 0})
                pipe.hset(keys.run(run.run_id), mapping={
                    "id": run.run_id, "grid": run.grid, "user": user, "priority": priority, "status": "queued",
                    "cell": json.dumps(run.cell), "stages": json.dumps(list(run.stages)),
                    "eval_stages": json.dumps(list(run.eval_stages)), "n_stages": 1, "stages_done": 0,
                    "created_at": now})
                pipe.sadd(keys.stage_runs(sid), run.run_id)
                pipe.zadd(keys.RUNS, {run.run_id: float(now)})
                pipe.zadd(keys.grid_runs(run.grid), {run.run_id: float(now)})
        pipe.execute()

    fns: dict[str, Any] = {
        "stl enqueue (in-process)": stl_in_process,
        "RQ Queue.enqueue_many": rq_enqueue_many,
        "raw pipeline HSET+RPUSH": lambda: raw_writes(False),
        "raw pipeline, stl's records too": lambda: raw_writes(True),
    }
    if with_cli:
        fns["stl enqueue (CLI subprocess)"] = stl_cli
    print(f"\nenqueue of {n_runs:,} runs: {rounds} interleaved rounds (db flushed before each call)")
    results = interleave(fns, rounds=rounds, warmup=1, before=lambda _name: server.flush())
    # Sanity: the last stl call left exactly what it should.
    server.flush()
    stl_in_process()
    assert conn.zcard(keys.RUNS) == n_runs and conn.llen(make_queue(conn, user, priority).key) == n_stages
    server.flush()

    ratios = [Ratio("stl enqueue (in-process)", "RQ Queue.enqueue_many", "stl enqueue / RQ enqueue_many"),
              Ratio("stl enqueue (in-process)", "raw pipeline HSET+RPUSH", "stl enqueue / raw pipeline HSET+RPUSH"),
              Ratio("stl enqueue (in-process)", "raw pipeline, stl's records too",
                    "stl enqueue / raw pipeline incl. stl's records")]
    if with_cli:
        ratios.append(Ratio("stl enqueue (CLI subprocess)", "RQ Queue.enqueue_many",
                            "stl enqueue CLI (whole process) / RQ enqueue_many (in-process)"))
    records = Report(f"enqueue {n_runs:,} runs", results, ratios=ratios, bench=BENCH + ":enqueue",
                     notes=[f"stl in-process split: parse_grid {median(parse_s) * 1000:.0f} ms + submit_runs "
                            f"{median(submit_s) * 1000:.0f} ms (medians, incl. warm-up)",
                            "RQ enqueue_many and the raw pipelines get the stage ids for free (pre-expanded grid); "
                            "stl's figure includes reading and expanding the YAML"]).print()
    print_absolute(BENCH + ":enqueue", f"stl enqueue in-process, {n_runs:,} runs",
                   median(results["stl enqueue (in-process)"]), "s", "<= 1 s")
    if with_cli:
        print_absolute(BENCH + ":enqueue", f"stl enqueue CLI subprocess, {n_runs:,} runs",
                       median(results["stl enqueue (CLI subprocess)"]), "s", "<= 1 s")
    conn.close()
    return records


# --- status -------------------------------------------------------------------------------------------

_BREAKDOWN = r"""
# The real `stl status --once`, in-process, with its query and render steps wrapped in timers.
import contextlib, importlib, io, json, sys, time
t0 = time.perf_counter()
import rich.console
import stl.jobs.queue.records
from stl.cli.main import app
# What the command imports lazily (typer's adapters pull in pydantic), imported here to count as imports.
for name in ("redis", "stl.jobs.queue.connection", "stl.cli.render", "typer._adapters"):
    with contextlib.suppress(ImportError):
        importlib.import_module(name)
t1 = time.perf_counter()
spent = {"query": 0.0, "render": 0.0}
def timed(part, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - started
    return wrapper
for name in ("status_summary", "list_workers"):
    setattr(stl.jobs.queue.records, name, timed("query", getattr(stl.jobs.queue.records, name)))
rich.console.Console.print = timed("render", rich.console.Console.print)
sys.argv = ["stl", "status", "--once"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        app()
    except SystemExit:
        pass
t2 = time.perf_counter()
assert "Runs per" in out.getvalue(), out.getvalue()[-500:]
print(json.dumps({"imports": t1 - t0, "query": spent["query"], "render": spent["render"],
                  "typer dispatch, settings, connect": (t2 - t1) - spent["query"] - spent["render"],
                  "in-process total": t2 - t0}))
"""


def bench_status(server: Any, grid_path: Path, home: Path, rounds: int, importtime: bool) -> list[dict[str, Any]]:
    from stl.jobs.grid.parse import parse_grid
    from stl.jobs.queue.queueing import submit_runs

    conn = server.client()
    server.flush()
    grid = parse_grid(grid_path, max_runs=10_000)
    submit_runs(conn, grid.runs, grid.stages, user="bench", priority="normal", stage_timeout=grid.grid.stage_timeout)
    n_runs = len(grid.runs)
    env = stl_env(server.url, home)
    status_out: list[str] = []

    def stl_status() -> None:
        result = run_quiet([STL, "status", "--once"], env=env)
        status_out.append(result.stdout)

    ping = f"import redis; redis.Redis.from_url({server.url!r}).ping()"
    fns = {
        "stl status --once": stl_status,
        "python -c 'import redis; ping'": lambda: run_quiet([sys.executable, "-c", ping], env=env) and None,
        "rq info": lambda: run_quiet([RQ, "info", "--url", server.url], env=env) and None,
    }
    print(f"\nstl status --once with {n_runs:,} runs in Redis: {rounds} interleaved rounds")
    results = interleave(fns, rounds=rounds, warmup=1)
    assert str(n_runs) in status_out[-1] or f"{n_runs:,}" in status_out[-1], status_out[-1][-500:]

    parts: dict[str, list[float]] = {}
    for _ in range(max(3, rounds // 2)):
        out = run_quiet([sys.executable, "-c", _BREAKDOWN], env=env).stdout
        for name, value in json.loads(out.strip().splitlines()[-1]).items():
            parts.setdefault(name, []).append(value)
    floor = median(results["python -c 'import redis; ping'"])
    total = median(results["stl status --once"])
    in_process = median(parts.pop("in-process total"))
    notes = ["where the time goes (the CLI run in-process with timers; medians): "
             + ", ".join(f"{name} {median(values) * 1000:.0f} ms" for name, values in parts.items())
             + f"; interpreter start/exit and site ~{max(total - in_process, 0) * 1000:.0f} ms (subprocess median "
             f"minus in-process total); python+redis+ping floor {floor * 1000:.0f} ms"]
    records = Report(f"stl status --once, {n_runs:,} runs", results, bench=BENCH + ":status", ratios=[
        Ratio("stl status --once", "python -c 'import redis; ping'", "stl status --once / python+redis ping floor"),
        Ratio("stl status --once", "rq info", "stl status --once / rq info"),
    ], notes=notes).print()
    print_absolute(BENCH + ":status", f"stl status --once, {n_runs:,} runs", total * 1000, "ms", "<= 150 ms")
    for name, values in parts.items():
        print_absolute(BENCH + ":status", f"status part: {name}", median(values) * 1000, "ms")
    if importtime:
        print_import_profile([STL, "status", "--once"], env, "stl status --once")
    server.flush()
    conn.close()
    return records


def print_import_profile(args: list[str], env: dict[str, str], what: str, top: int = 12) -> None:
    """The top-level modules with the largest cumulative import time (python -X importtime), for information."""
    code = "import sys; from stl.cli.main import app; sys.argv = ['stl'] + sys.argv[1:]; app()"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args[1:]], env=env,
                            capture_output=True, text=True, check=False)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        fields = line.split(":", 1)[1].split("|")
        if len(fields) != 3:
            continue
        name = fields[2][1:]  # one space, then two more per nesting level
        if name.startswith(" "):
            continue
        rows.append((int(fields[1]), name.strip()))
    total = sum(c for c, _ in rows)
    print(f"\n   import time of `{what}` (python -X importtime, top-level imports by cumulative time; "
          f"all top-level: {total / 1000:.0f} ms):")
    for cumulative, name in sorted(rows, reverse=True)[:top]:
        print(f"     {cumulative / 1000:8.1f} ms  {name}")


# --- --help ----------------------------------------------------------------------------------------------


def bench_help(rounds: int, home: Path, url: str) -> list[dict[str, Any]]:
    env = stl_env(url, home)
    fns = {
        "stl --help": lambda: run_quiet([STL, "--help"], env=env) and None,
        "python -c pass": lambda: run_quiet([sys.executable, "-c", "pass"], env=env) and None,
        "python -c 'import typer'": lambda: run_quiet([sys.executable, "-c", "import typer"], env=env) and None,
    }
    print(f"\nstl --help start-up: {rounds} interleaved rounds")
    results = interleave(fns, rounds=rounds, warmup=1)
    records = Report("stl --help start-up", results, bench=BENCH + ":help", ratios=[
        Ratio("stl --help", "python -c pass", "stl --help / python -c pass"),
        Ratio("stl --help", "python -c 'import typer'", "stl --help / python -c 'import typer'"),
    ]).print()
    print_absolute(BENCH + ":help", "stl --help", median(results["stl --help"]) * 1000, "ms", "<= 300 ms")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5000, help="seeds in the grid; runs = 2 x seeds (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for enqueue (default 5)")
    parser.add_argument("--status-rounds", type=int, default=10, help="interleaved rounds for status (default 10)")
    parser.add_argument("--help-rounds", type=int, default=10, help="interleaved rounds for --help (default 10)")
    parser.add_argument("--no-cli", action="store_true", help="skip the `stl enqueue` subprocess timing")
    parser.add_argument("--no-importtime", action="store_true", help="skip the import-time profile of status")
    parser.add_argument("--only", choices=["enqueue", "status", "help"], action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    parts = set(args.only or ["enqueue", "status", "help"])
    header("bench_queue: the lab queue (enqueue / status / --help)")
    with tempfile.TemporaryDirectory(prefix="stl-bench-queue-") as tmp, private_redis() as server:
        directory = Path(tmp)
        home = directory / "stl-home"
        grid_path = write_grid(directory, args.seeds)
        if "enqueue" in parts:
            bench_enqueue(server, grid_path, home, args.rounds, with_cli=not args.no_cli)
        if "status" in parts:
            bench_status(server, grid_path, home, args.status_rounds, importtime=not args.no_importtime)
        if "help" in parts:
            bench_help(args.help_rounds, home, server.url)


if __name__ == "__main__":
    main()
