"""ROUGE-L F-measure, equal to rouge-score's `RougeScorer(["rougeL"], use_stemmer=True)` to the last bit.

rouge-score's own scorer spends most of an eval stage's scoring time stemming (nltk's pure-Python Porter
stemmer, once per word of every prediction and reference) and the rest filling an LCS table cell by cell.
`RougeL` tokenizes with rouge-score's own tokenizer and stemmer, but stems each distinct word once a
stage, and finds the LCS length with the bit-parallel algorithm (one big-integer step per prediction
token instead of one table cell per pair of tokens). Precision, recall and F-measure are then the same
divisions rouge-score makes, so the scores are identical (tests/test_rouge.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


class _MemoizedStemmer:
    """nltk's PorterStemmer (the one rouge-score uses), each distinct word stemmed once."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()
        self._stems: dict[str, str] = {}

    def stem(self, word: str) -> str:
        found = self._stems.get(word)
        if found is None:
            found = self._stems[word] = self._stemmer.stem(word)
        return found


def lcs_length(reference: Sequence[str], prediction: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (Allison–Dix bit-parallel algorithm)."""
    if not reference or not prediction:
        return 0
    # Bit i of matches[token] is set where reference[i] == token.
    matches: dict[str, int] = {}
    for position, token in enumerate(reference):
        matches[token] = matches.get(token, 0) | (1 << position)
    full = (1 << len(reference)) - 1
    row = full  # zero bits count the LCS of the reference and the prediction so far
    for token in prediction:
        match = matches.get(token)
        if match is not None:
            common = row & match
            row = ((row + common) | (row - common)) & full
    return len(reference) - row.bit_count()


def _f_measure(reference: Sequence[str], prediction: Sequence[str]) -> float:
    # rouge_score.rouge_scorer._score_lcs and rouge_score.scoring.fmeasure, operation for operation.
    if not reference or not prediction:
        return 0.0
    common = lcs_length(reference, prediction)
    precision = common / len(prediction)
    recall = common / len(reference)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


class RougeL:
    """ROUGE-L F-measure (0..1) with stemming, as rouge-score computes it; keep one per stage."""

    def __init__(self) -> None:
        self._stemmer = _MemoizedStemmer()

    def tokens(self, text: str) -> list[str]:
        from rouge_score import tokenize

        return list(tokenize.tokenize(text, self._stemmer))

    def score(self, prediction: str, references: Iterable[str]) -> float:
        """The F-measure against the best-matching reference; 0.0 without references."""
        predicted = self.tokens(prediction)
        return max((_f_measure(self.tokens(reference), predicted) for reference in references), default=0.0)
