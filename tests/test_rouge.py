"""jobs/ml/rouge.py must give rouge-score's ROUGE-L F-measure exactly, only faster."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
from rouge_score.rouge_scorer import RougeScorer, _lcs_table

from stl.jobs.ml.rouge import RougeL, lcs_length
from tests.conftest import instructdial_sample

if TYPE_CHECKING:
    from pathlib import Path

# Stemmed words (running/ran/runs), short ones the stemmer skips, punctuation and non-ASCII that the
# tokenizer drops, digits, and the empty string.
WORDS = ["the", "cats", "cat", "running", "runs", "ran", "flight", "flights", "booked", "booking", "Rome", "a",
         "!", ",", "é", "42", "hello-world", "", "generously", "happily"]


def reference_f_measure(prediction: str, references: list[str]) -> float:
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return max((scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references), default=0.0)


def test_lcs_length_equals_the_dynamic_programming_table() -> None:
    rng = random.Random(0)
    for case in range(2000):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 200))]  # past 64 bits of the reference
        if case % 2:
            b = [rng.choice("abcde") for _ in range(rng.randrange(0, 200))]
        else:  # a with a few tokens changed, dropped or added: long common subsequences
            b = [token if rng.random() > 0.05 else rng.choice(["x", "", "ab"]) for token in a]
            b = [token for token in b if token]
        expected = _lcs_table(a, b)[-1][-1] if a and b else 0
        assert lcs_length(a, b) == expected, (a, b)


def test_random_texts_score_exactly_as_rouge_score() -> None:
    rng = random.Random(1)
    scorer = RougeL()  # one scorer for all: its remembered stems must not change any score
    for _ in range(3000):
        prediction = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 30)))
        references = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 30)))
                      for _ in range(rng.randrange(1, 3))]
        assert scorer.score(prediction, references) == reference_f_measure(prediction, references), (
            prediction, references)


def test_no_references_score_zero() -> None:
    assert RougeL().score("anything", []) == 0.0


def dataset_texts(path: Path) -> list[str]:
    from stl.jobs.ml.sources import read_examples

    texts: list[str] = []
    for example in read_examples(str(path)):
        texts.extend([example.output, *example.all_outputs, example.input[:300]])
    return texts


@pytest.mark.parametrize("dataset", ["demo", "instructdial"])
def test_real_texts_score_exactly_as_rouge_score(dataset: str, demo_data: Path) -> None:
    path = demo_data if dataset == "demo" else instructdial_sample()
    texts = dataset_texts(path)
    rng = random.Random(2)
    scorer = RougeL()
    for _ in range(1500):
        prediction, *references = rng.sample(texts, 3)
        assert scorer.score(prediction, references) == reference_f_measure(prediction, references)
