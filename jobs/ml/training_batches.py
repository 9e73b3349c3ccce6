"""The batches a training stage learns from: examples drawn, tokenized, padded and split into micro-batches.

Batches are a pure function of (data, seed, batch number), so a stage resumed at step n draws batch n next.
An MTL stage draws from its task mixture and tokenizes each batch as it comes (jobs/ml/prefetch.py does that
ahead, in a thread); a few-shot stage cycles through its examples, tokenized once, up front, and kept in the
token cache under STL_HOME/cache. Examples are grouped by length within a window of batches, so a batch
pads little. Padding goes to the longest row of the micro-batch, or, where the step is compiled, to fixed
length buckets (stl.jobs.ml.acceleration.length_buckets) so that shapes repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stl.jobs import axes
from stl.jobs.ml import data as data_lib
from stl.jobs.ml.acceleration import bucketed_length, length_buckets
from stl.jobs.ml.data_cache import load_token_lists, save_token_lists, token_cache_path
from stl.jobs.ml.examples import source_text
from stl.jobs.ml.model_inputs import IGNORE_INDEX
from stl.jobs.ml.models import encode_sources, encode_targets, is_seq2seq, pad_sequences, tokenizer_fingerprint
from stl.jobs.ml.sources import source_fingerprint
from stl.jobs.specs import StageKind

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stl.jobs.ml.examples import Example
    from stl.jobs.specs import StageSpec, TrainConfig

WINDOW_BATCHES = 50  # length-grouping window, in batches (fewer when the data is small)

# Padded lengths: (source, target) buckets for seq2seq, or (whole sequence,) for a causal LM.
Buckets = tuple[tuple[int, ...], ...]


@dataclass
class MicroBatch:
    """One micro-batch on the host: padded tensors plus counts for the throughput figures."""

    tensors: dict[str, torch.Tensor]
    target_tokens: int
    tokens: int
    samples: int


def padding_buckets(*, seq2seq: bool, source_limit: int, target_limit: int) -> Buckets:
    """The length buckets of a compiled step's inputs: source and target apart for an encoder-decoder, the
    whole sequence for a causal LM."""
    if seq2seq:
        return (length_buckets(source_limit), length_buckets(target_limit))
    return (length_buckets(source_limit + target_limit),)


class TrainingBatches:
    """Every batch of one training attempt, from a given batch number on, as host tensors ready to copy."""

    def __init__(
        self,
        spec: StageSpec,
        settings: TrainConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        limits: tuple[int, int],  # (source, target) tokens
        buckets: Buckets | None,  # None: pad to the longest row
        micro_batch: int,
        pin: bool,  # page-locked memory, for copies to CUDA that do not wait
        cache_dir: Path | None,
        log: Callable[[str], None],
    ) -> None:
        self.spec, self.settings, self.tokenizer = spec, settings, tokenizer
        self.source_limit, self.target_limit = limits
        self.buckets, self.micro_batch, self.pin = buckets, micro_batch, pin
        self.cache_dir, self.log = cache_dir, log
        self.seq2seq = is_seq2seq(model)
        self.pad_id = int(tokenizer.pad_token_id)
        start_id = getattr(model.config, "decoder_start_token_id", None)
        self.decoder_start_id = self.pad_id if start_id is None else int(start_id)
        # Few-shot sets are encoded once, not every time an example comes round again; None: encode per batch.
        self.encoded: dict[Example, tuple[list[int], list[int]]] | None = None
        self.stream_from, self.window_batches = self._training_stream()

    @property
    def tokenized_up_front(self) -> bool:
        """Whether a batch only needs padding (a few-shot set), not tokenizing too."""
        return self.encoded is not None

    def prepared(self, start_batch: int) -> Iterator[list[MicroBatch]]:
        """Every batch from `start_batch` on, as micro-batches of host tensors (pinned on CUDA)."""
        for batch in self.example_batches(start_batch):
            yield self.encode(batch)

    def example_batches(self, start_batch: int) -> Iterator[list[Example]]:
        spec = self.spec

        def length(example: Example) -> int:
            return len(source_text(example, spec.instructions)) + len(example.output)

        return data_lib.length_grouped_batches(
            self.stream_from,
            batch_size=self.settings.batch_size,
            seed=spec.seed,
            length=length,
            start_batch=start_batch,
            window_batches=self.window_batches,
        )

    def encode(self, batch: Sequence[Example]) -> list[MicroBatch]:
        if self.encoded is not None:
            sources = [self.encoded[example][0] for example in batch]
            targets = [self.encoded[example][1] for example in batch]
        else:
            sources, targets = self._encode_texts(batch)
        size = self.micro_batch
        return [
            self._micro_batch(sources[first : first + size], targets[first : first + size])
            for first in range(0, len(batch), size)
        ]

    # --- drawing and tokenizing ---

    def _training_stream(self) -> tuple[Callable[[int], Iterator[Example]], int]:
        """The example stream (from a given draw on) and the length-grouping window, in batches.

        The window never holds more examples than there are distinct ones: sorting a window that
        holds several copies of a small few-shot set would put copies of one example in one batch.
        """
        spec, settings = self.spec, self.settings
        stream_from: Callable[[int], Iterator[Example]]
        if spec.kind == StageKind.mtl:
            mixture = data_lib.Mixture(
                spec.data,
                spec.tasks,
                cap=settings.mixture_cap,
                seed=spec.seed,
                cache_dir=self.cache_dir,
                log=self.log,
            )
            distinct = sum(mixture.sizes.values())
            stream_from = mixture.stream
        else:
            examples = data_lib.few_shot_examples(
                spec.data, spec.tasks, spec.shots, spec.seed, holdout=spec.holdout, cache_dir=self.cache_dir,
                log=self.log,
            )
            distinct = len(examples)

            self.encoded = self._few_shot_encodings(examples)

            def stream_from(start: int) -> Iterator[Example]:
                return data_lib.cycle_shuffled(examples, spec.seed, start)

        return stream_from, max(1, min(WINDOW_BATCHES, distinct // settings.batch_size))

    def _few_shot_encodings(self, examples: list[Example]) -> dict[Example, tuple[list[int], list[int]]]:
        """Source and target ids of every few-shot example; with a cache_dir, read from (or written to) the
        token cache, keyed by everything that decides them."""
        spec = self.spec
        path = None
        fingerprint = None if self.cache_dir is None else source_fingerprint(spec.data)
        if self.cache_dir is not None and fingerprint is not None:
            key = {
                "kind": "few-shot",
                "data": fingerprint,
                "tasks": list(spec.tasks),
                "holdout": spec.holdout,
                **axes.token_key_fields(spec, axes.FEW_SHOT_TOKENS),  # shots, seed, instructions
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "source_limit": self.source_limit,
                "target_limit": self.target_limit,
                "seq2seq": self.seq2seq,
            }
            path = token_cache_path(self.cache_dir, key)
            cached = load_token_lists(path)
            if cached is not None and len(cached["sources"]) == len(cached["targets"]) == len(examples):
                self.log(f"token cache hit: {len(examples)} few-shot examples ({path})")
                return dict(zip(examples, zip(cached["sources"], cached["targets"], strict=True), strict=True))
        sources, targets = self._encode_texts(examples)
        if path is not None:
            try:
                save_token_lists(
                    path, {"sources": sources, "targets": targets}, description=f"few-shot {spec.stage_id}"
                )
                self.log(f"token cache miss: {len(examples)} few-shot examples; wrote {path}")
            except OSError as e:
                self.log(f"token cache miss: could not write {path}: {e}")
        return dict(zip(examples, zip(sources, targets, strict=True), strict=True))

    def _encode_texts(self, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
        sources = encode_sources(
            self.tokenizer,
            [source_text(example, self.spec.instructions) for example in examples],
            self.source_limit,
            seq2seq=self.seq2seq,
        )
        targets = encode_targets(
            self.tokenizer, [example.output for example in examples], self.target_limit, seq2seq=self.seq2seq
        )
        return sources, targets

    # --- padding ---

    def _padded_widths(self, sources: list[list[int]], targets: list[list[int]]) -> tuple[int | None, int | None]:
        """(source, target) widths for seq2seq, (sequence, None) for a causal LM; None: the longest row."""
        if self.buckets is None:
            return None, None
        if self.seq2seq:
            source_buckets, target_buckets = self.buckets
            return (
                bucketed_length(max(map(len, sources)), source_buckets),
                bucketed_length(max(map(len, targets)), target_buckets),
            )
        longest = max(len(s) + len(t) for s, t in zip(sources, targets, strict=True))
        return bucketed_length(longest, self.buckets[0]), None

    def _micro_batch(self, sources: list[list[int]], targets: list[list[int]]) -> MicroBatch:
        tensors: dict[str, torch.Tensor]
        width, target_width = self._padded_widths(sources, targets)
        if self.seq2seq:
            tensors = {
                "input_ids": pad_sequences(sources, self.pad_id, width=width),
                "attention_mask": pad_sequences([[1] * len(s) for s in sources], 0, width=width),
                # Teacher forcing: the decoder sees the target shifted right behind the start token.
                "decoder_input_ids": pad_sequences(
                    [[self.decoder_start_id] + t[:-1] for t in targets], self.pad_id, width=target_width
                ),
                "labels": pad_sequences(targets, IGNORE_INDEX, width=target_width),
            }
        else:
            tensors = {
                "input_ids": pad_sequences(
                    [s + t for s, t in zip(sources, targets, strict=True)], self.pad_id, width=width
                ),
                "attention_mask": pad_sequences(
                    [[1] * (len(s) + len(t)) for s, t in zip(sources, targets, strict=True)], 0, width=width
                ),
                # Loss only on the answer: the prompt's positions are ignored.
                "labels": pad_sequences(
                    [[IGNORE_INDEX] * len(s) + t for s, t in zip(sources, targets, strict=True)],
                    IGNORE_INDEX,
                    width=width,
                ),
            }
        if self.pin:
            tensors = {name: tensor.pin_memory() for name, tensor in tensors.items()}
        return MicroBatch(
            tensors=tensors,
            target_tokens=sum(len(t) for t in targets),
            tokens=sum(len(s) + len(t) for s, t in zip(sources, targets, strict=True)),
            samples=len(sources),
        )
