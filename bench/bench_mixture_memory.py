"""Peak memory of streaming the MTL mixture (jobs/ml/data.py `mixture`) over 1x vs 10x the data.

The mixture keeps 8 bytes per row (an offset) and reads one row per draw, so its memory must not grow
with the data the way the data grows: with 10x the rows, peak RSS above the interpreter floor should
stay far below 10x. Each measurement is a fresh subprocess that draws the same number of examples and
reports its peak RSS (VmHWM); the floor is a subprocess that imports the same modules and reads
nothing. A third subprocess loads the 10x data into a list (what not streaming would cost), for scale.
Rounds are interleaved (1x, 10x, floor, list, 1x, 10x, ...); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEMO_DATA, REPO, Ratio, Report, header, interleave, median, print_absolute  # noqa: E402

BENCH = "mixture-memory"

_PROBE = r"""
import json, sys, time
from itertools import islice
import stl.jobs.ml.data as data
from stl.jobs.ml.sources import read_examples
mode, path, draws = sys.argv[1], sys.argv[2], int(sys.argv[3])
tasks = sorted({json.loads(line)["task"] for line in open(sys.argv[4])})
started = time.perf_counter()
count = 0
if mode == "mixture":
    for example in islice(data.Mixture(path, tasks, cap=500_000, seed=0).stream(), draws):
        count += len(example.output) > -1
elif mode == "list":
    rows = list(read_examples(path, tasks))
    count = len(rows)
elapsed = time.perf_counter() - started
# VmHWM: this process's own peak RSS. (ru_maxrss is not: Linux carries the parent's peak across fork+exec.)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_kb": peak_kb, "count": count, "seconds": elapsed}))
"""


def copies(source: Path, target: Path, n: int) -> Path:
    text = source.read_bytes()
    with target.open("wb") as handle:
        for _ in range(n):
            handle.write(text)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-copies", type=int, default=1,
                        help="copies of the demo JSONL in the 1x file (default 1: the demo data itself)")
    parser.add_argument("--factor", type=int, default=10, help="the larger file is this many times the 1x (default 10)")
    parser.add_argument("--draws", type=int, default=20_000, help="examples drawn in each run (default 20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args()

    header("bench_mixture_memory: peak RSS of the streaming MTL mixture, 1x vs 10x data")
    with tempfile.TemporaryDirectory(prefix="stl-bench-mixture-") as tmp:
        directory = Path(tmp)
        small = copies(DEMO_DATA, directory / "data-1x.jsonl", args.base_copies)
        large = copies(DEMO_DATA, directory / f"data-{args.factor}x.jsonl", args.base_copies * args.factor)
        rows_small = sum(1 for _ in small.open("rb"))
        rows_large = sum(1 for _ in large.open("rb"))
        print(f"1x: {rows_small:,} rows ({small.stat().st_size / 1e6:.1f} MB); {args.factor}x: {rows_large:,} rows "
              f"({large.stat().st_size / 1e6:.1f} MB); {args.draws:,} draws per run; {args.rounds} rounds")
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        seconds: dict[str, list[float]] = {}

        def probe(name: str, mode: str, path: Path) -> float:
            out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(path), str(args.draws), str(DEMO_DATA)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            values = json.loads(out.strip().splitlines()[-1])
            seconds.setdefault(name, []).append(values["seconds"])
            return values["maxrss_kb"] / 1024  # MiB

        names = {"mixture 1x": ("mixture", small), f"mixture {args.factor}x": ("mixture", large),
                 "floor (imports only)": ("none", small), f"list of all {args.factor}x rows": ("list", large)}
        results = interleave({name: (lambda n=name, m=mode, p=path: probe(n, m, p))
                              for name, (mode, path) in names.items()}, rounds=args.rounds)
    floor = median(results["floor (imports only)"])
    small_name, large_name, list_name = "mixture 1x", f"mixture {args.factor}x", f"list of all {args.factor}x rows"
    above = {name: median(results[name]) - floor for name in (small_name, large_name, list_name)}
    growth = above[large_name] / above[small_name] if above[small_name] > 0 else float("nan")
    notes = [f"above the floor ({floor:.1f} MiB): mixture 1x +{above[small_name]:.2f} MiB, "
             f"mixture {args.factor}x +{above[large_name]:.2f} MiB (growth x{growth:.2f} for x{args.factor} data), "
             f"whole list +{above[list_name]:.2f} MiB",
             "time per run (medians): " + ", ".join(f"{n} {median(v):.2f} s" for n, v in seconds.items())]
    Report(f"peak RSS, MiB (mixture over 1x vs {args.factor}x data)", results, unit="MiB",
           bench=BENCH, ratios=[Ratio(large_name, small_name, f"peak RSS {args.factor}x / 1x"),
                                Ratio(large_name, list_name, f"peak RSS mixture {args.factor}x / list of all rows")],
           notes=notes).print()
    print_absolute(BENCH, f"RSS growth above floor, {args.factor}x / 1x data", growth, "x",
                   f"far below {args.factor}")


if __name__ == "__main__":
    main()
