"""Token ids as stages hand them to a model: how long they may be, and the label of positions without a loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stl.jobs.ml.models import is_seq2seq, max_positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100  # the label of a position that adds nothing to the loss or to a log-likelihood


def training_length_limits(model: PreTrainedModel, max_source_length: int, max_target_length: int) -> tuple[int, int]:
    """(source, target) token limits for training `model`: the settings, within its position embeddings. A
    causal LM reads source and target as one sequence, so the target gets at most half of its positions and
    the source what is left."""
    source, target = max_source_length, max_target_length
    limit = max_positions(model)
    if limit is None:
        return source, target
    if is_seq2seq(model):
        return min(source, limit), min(target, limit)
    target = min(target, limit // 2)
    return min(source, limit - target), target


def evaluation_length_limits(model: PreTrainedModel, max_source_length: int, max_new_tokens: int) -> tuple[int, int]:
    """(source, answer) token limits for evaluating `model`: the answer gets at most half of its positions,
    and the source all of them (an encoder-decoder) or what the answer leaves (a causal LM)."""
    limit = max_positions(model)
    if limit is None:
        return max_source_length, max_new_tokens
    target = min(max_new_tokens, limit // 2)
    return min(max_source_length, limit if is_seq2seq(model) else limit - target), target
