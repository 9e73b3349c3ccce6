"""Run every CPU benchmark in turn (each in its own subprocess), print their output, then a summary.

`make bench` calls this. Each benchmark prints RATIOs against a reference measured in the same run
(interleaved A B A B ...); the summary at the end collects every RESULT line into one table. The GPU
part is bench/gpu.sh (run it on a machine with a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import REPO, machine_description  # noqa: E402

# name -> (script, default arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "queue": ("bench_queue.py", [], ["--seeds", "1000", "--rounds", "3", "--status-rounds", "5", "--help-rounds", "5"]),
    "queue-busy": ("bench_queue_busy.py", [], ["--seeds", "1000", "--rounds", "2", "--status-rounds", "3"]),
    "train": ("bench_train.py", [], ["--size", "tiny", "--steps", "10", "--rounds", "2"]),
    "eval": ("bench_eval.py", [], ["--size", "tiny", "--rounds", "2"]),
    "gap": ("bench_gap.py", [], ["--stages", "3", "--rounds", "1"]),
    "mixture-memory": ("bench_mixture_memory.py", [], ["--rounds", "2"]),
    "rouge": ("bench_rouge.py", [], ["--pairs", "300", "--rounds", "2"]),
    "demo": ("bench_demo.py", [], []),  # one `make demo`, minutes: the same with --quick
    "slots": ("bench_slots.py", ["--slots", "1,2"], ["--slots", "1,2", "--steps", "4"]),  # 16 stages per slot count
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only these benchmarks (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller settings: a smoke run, not figures to quote")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    if args.list:
        for name, (script, defaults, _quick) in BENCHMARKS.items():
            print(f"{name:<16} bench/{script} {' '.join(defaults)}")
        return
    names = args.only or list(BENCHMARKS)
    print(f"# stl CPU benchmarks; machine: {machine_description()}")
    results: list[dict] = []
    failed: list[str] = []
    for name in names:
        script, defaults, quick = BENCHMARKS[name]
        command = [sys.executable, str(BENCH_DIR / script), *(quick if args.quick else defaults)]
        print(f"\n{'=' * 100}\n$ {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT "):]))
        code = process.wait()
        print(f"[{name}: exit {code}, {time.perf_counter() - started:.0f} s]", flush=True)
        if code != 0:
            failed.append(name)

    print(f"\n{'=' * 100}\nSUMMARY (ratios: A / B, medians of interleaved rounds; absolute values indicative on CPU)")
    print("| benchmark | A | B | ratio | A median | B median |\n|---|---|---|---|---|---|")
    for r in results:
        if r.get("absolute"):
            continue
        print(f"| {r['bench']} | {r['a']} | {r['b']} | {r['ratio']:.3f} | {r['a_median']:.4g} {r['unit']} "
              f"| {r['b_median']:.4g} {r['unit']} |")
    print("\nabsolute (indicative):")
    for r in results:
        if r.get("absolute"):
            print(f"  {r['bench']}: {r['label']} = {r['value']:.4g} {r['unit']}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
