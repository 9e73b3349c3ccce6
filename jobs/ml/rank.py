"""Rank classification (as in T0): every answer option is scored by its log-likelihood as the continuation of
the source, and the likeliest is the prediction, by total log-likelihood (which favours short options) and per
answer token. For an encoder-decoder the encoder runs once per example and all of its options go through the
decoder in batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stl.jobs.ml.model_inputs import IGNORE_INDEX
from stl.jobs.ml.models import pad_sequences

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from stl.jobs.ml.eval_batches import EvalBatches
    from stl.jobs.ml.evaluate import EvalModel
    from stl.jobs.ml.examples import Example


def sequence_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(label) for each row; positions labelled IGNORE_INDEX count for nothing.

    logits: [rows, positions, vocab] predicting labels: [rows, positions].
    """
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    known = labels != IGNORE_INDEX
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * known).sum(dim=-1)


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score; the first one wins ties."""
    if not scores:
        raise ValueError("no options to choose from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


class RankClassifier:
    def __init__(self, loaded: EvalModel, batches: EvalBatches) -> None:
        self.model, self.device, self.batches = loaded.model, loaded.device, batches
        self.seq2seq, self.pad_id, self.decoder_start_id = loaded.seq2seq, loaded.pad_id, loaded.decoder_start_id

    def classify(
        self,
        examples: Sequence[Example],
        positions: Sequence[int],
        sources: Sequence[list[int]],
        candidates: Sequence[list[list[int]]],
    ) -> dict[int, tuple[int, int]]:
        """For each example at `positions`, by position: the likeliest option by summed log-likelihood, and
        by log-likelihood per answer token (which does not favour short options). `sources` and
        `candidates` are every example's ids, by position."""
        import torch

        predictions: dict[int, tuple[int, int]] = {}

        def classify(batch: list[int]) -> None:
            scores = self.option_scores([sources[i] for i in batch], [candidates[i] for i in batch])
            for i, example_scores in zip(batch, scores, strict=True):
                lengths = [max(len(candidate), 1) for candidate in candidates[i]]
                per_token = [score / length for score, length in zip(example_scores, lengths, strict=True)]
                predictions[i] = (best_option(example_scores), best_option(per_token))

        with torch.inference_mode():
            self.batches.run(examples, positions, classify)
        return predictions

    def option_scores(self, sources: list[list[int]], candidates: Sequence[list[list[int]]]) -> list[list[float]]:
        """Log-likelihood of each candidate given its source. The encoder (seq2seq) runs once per source;
        (source, candidate) pairs go through the decoder, or the causal LM, `batches.rows` at a time."""
        import torch

        owners = [row for row, options in enumerate(candidates) for _ in options]
        options = [option for opts in candidates for option in opts]
        chunk = self.batches.rows
        flat_scores: list[torch.Tensor] = []
        if self.seq2seq:
            encoder_ids = pad_sequences(sources, self.pad_id).to(self.device)
            encoder_mask = pad_sequences([[1] * len(s) for s in sources], 0).to(self.device)
            encoded = self.model.get_encoder()(input_ids=encoder_ids, attention_mask=encoder_mask)
            for first in range(0, len(options), chunk):
                rows = torch.tensor(owners[first : first + chunk], device=self.device)
                targets = options[first : first + chunk]
                labels = pad_sequences(targets, IGNORE_INDEX).to(self.device)
                decoder_ids = pad_sequences([[self.decoder_start_id] + t[:-1] for t in targets], self.pad_id)
                logits = self.model(
                    encoder_outputs=(encoded.last_hidden_state.index_select(0, rows),),
                    attention_mask=encoder_mask.index_select(0, rows),
                    decoder_input_ids=decoder_ids.to(self.device),
                    use_cache=False,
                ).logits
                flat_scores.append(sequence_log_likelihoods(logits, labels))
        else:
            for first in range(0, len(options), chunk):
                pairs = list(zip(owners[first : first + chunk], options[first : first + chunk], strict=True))
                input_ids = pad_sequences([sources[row] + option for row, option in pairs], self.pad_id)
                mask = pad_sequences([[1] * (len(sources[row]) + len(option)) for row, option in pairs], 0)
                labels = pad_sequences(
                    [[IGNORE_INDEX] * len(sources[row]) + option for row, option in pairs], IGNORE_INDEX
                ).to(self.device)
                logits = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                ).logits
                flat_scores.append(sequence_log_likelihoods(logits[:, :-1], labels[:, 1:]))
        flat = torch.cat(flat_scores).tolist()  # one host sync per batch of examples
        scores: list[list[float]] = [[] for _ in sources]
        for row, score in zip(owners, flat, strict=True):
            scores[row].append(score)
        return scores
