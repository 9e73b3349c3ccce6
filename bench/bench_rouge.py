"""ROUGE-L scoring of an eval stage's answers: stl's scorer (jobs/ml/rouge.py) vs rouge-score's RougeScorer.

Both compute rouge-score's ROUGE-L F-measure with stemming; the scores are checked to be identical.
Each round scores every (prediction, references) pair of a set with a new scorer, as each eval stage
makes one (so stl's remembered stems start empty every round). Sets:
  instructdial  the InstructDial sample in ../shared/data: each example's output against another
                example's output and the start of its input (dialogue text; skipped where absent)
  demo          the same over the project's demo data (grids/demo-data)
  synthetic     random words "w<number>" as bench/ml.py's synthetic data has, 31 against 32 words:
                every word new to the stemmer, the least a remembered stem can help
A and B interleaved per round; seconds per set, lower is better.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEMO_DATA, REPO, Ratio, Report, header, interleave  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

BENCH = "rouge"
INSTRUCTDIAL = REPO.parent / "shared" / "data" / "instructdial" / "sample_text2text.jsonl"

Pairs = list[tuple[str, list[str]]]


def dataset_pairs(path: Path, count: int, seed: int) -> Pairs:
    from stl.jobs.ml.sources import read_examples

    examples = list(read_examples(str(path)))
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        example, other = rng.sample(examples, 2)
        pairs.append((other.output, [example.output, example.input[:300]]))
    return pairs


def synthetic_pairs(count: int, seed: int) -> Pairs:
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, 50265)}" for _ in range(n))

    return [(words(32), [words(31)]) for _ in range(count)]


def scorers(pairs: Pairs) -> tuple[dict[str, Callable[[], None]], dict[str, list[float]]]:
    from rouge_score.rouge_scorer import RougeScorer

    from stl.jobs.ml.rouge import RougeL

    scores: dict[str, list[float]] = {}

    def stl() -> None:
        scorer = RougeL()
        scores["stl"] = [scorer.score(prediction, references) for prediction, references in pairs]

    def rouge_score() -> None:
        scorer = RougeScorer(["rougeL"], use_stemmer=True)
        scores["rouge-score"] = [
            max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)
            for prediction, references in pairs
        ]

    return {"stl RougeL": stl, "rouge-score RougeScorer": rouge_score}, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000, help="(prediction, references) pairs per set")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header("bench_rouge: ROUGE-L F-measure, stl's scorer vs rouge-score's")
    sets: dict[str, Pairs] = {}
    if INSTRUCTDIAL.is_file():
        sets["instructdial"] = dataset_pairs(INSTRUCTDIAL, args.pairs, args.seed)
    else:
        print(f"skipping instructdial: {INSTRUCTDIAL} is absent (it lives in ../shared/data, outside the repo)")
    sets["demo"] = dataset_pairs(DEMO_DATA, args.pairs, args.seed)
    sets["synthetic"] = synthetic_pairs(args.pairs, args.seed)
    for name, pairs in sets.items():
        fns, scores = scorers(pairs)
        results = interleave(fns, rounds=args.rounds, warmup=1)
        if scores["stl"] != scores["rouge-score"]:
            raise SystemExit(f"{name}: stl's ROUGE-L differs from rouge-score's; this benchmark is void")
        Report(f"ROUGE-L of {len(pairs)} answers, {name}", results, bench=f"{BENCH}:{name}",
               ratios=[Ratio("stl RougeL", "rouge-score RougeScorer", "stl seconds / rouge-score seconds")],
               notes=["identical scores on every pair"]).print()


if __name__ == "__main__":
    main()
