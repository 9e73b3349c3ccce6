"""How much device memory a stage will need at its peak, before it runs: for admitting several stages to one GPU.

The best guess is what an earlier stage of the same kind, model, batch and lengths reached (recorded by the
horse: stl.jobs.queue.admission_gate). Without one, a formula from the model's shape:

- training: 16 bytes per parameter (fp32 weights, gradients and Adam's two moments) plus activations,
  `batch x (source + target tokens) x hidden x layers x TRAIN_ACTIVATION_BYTES`, plus the logits
  (`batch x target x vocab`, 4 bytes, three copies: logits, log-softmax, their gradient);
- evaluation: 4 bytes per parameter plus activations and the decoder's key/value cache,
  `batch x (source + new tokens) x hidden x layers x EVAL_ACTIVATION_BYTES`, plus one copy of the logits.

The constants are rough on purpose. After the first stage of a key, its recorded peak replaces the formula; and
the largest ratio of a recorded peak to the formula, per model and kind (training or evaluation), corrects the
formula for that model's other batches and lengths (`calibration_key`).
No torch here; transformers only to read a hub or local model's config.json, from local files (no network).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stl.jobs.specs import StageKind, StageSpec

BYTES_PER_PARAMETER_TRAIN = 16  # fp32 weights + gradients + Adam's first and second moments
BYTES_PER_PARAMETER_EVAL = 4
# Bytes kept per token, hidden unit and layer for the backward pass. Chosen so that t5-small at batch 64 with
# 512 + 64 tokens comes to about 8 GB, a little above the 7.4 GB the lab measured at that batch (issue 25).
TRAIN_ACTIVATION_BYTES = 24
EVAL_ACTIVATION_BYTES = 8  # one layer's activations at a time, and the key/value cache of generation
TRAIN_LOGIT_COPIES = 3
# A model whose config cannot be read here (not downloaded yet, a remote-code architecture): assumed as big as
# the largest this lab trains (t5-large: about 0.74 B parameters), so it is never packed on a guess.
UNKNOWN_MODEL_PARAMETERS = 800_000_000


@dataclass(frozen=True)
class ModelShape:
    """What of a model's architecture sets its memory."""

    vocab: int
    hidden: int
    ffn: int
    encoder_layers: int  # 0 for a decoder-only model
    decoder_layers: int
    positions: int = 0  # learned absolute position embeddings (BART, GPT-2); 0 for relative ones (T5)
    known: bool = True  # False: the conservative default for a model whose config could not be read

    @property
    def layers(self) -> int:
        return self.encoder_layers + self.decoder_layers

    @property
    def parameters(self) -> int:
        """Approximate: embeddings (tied with the output layer) and each layer's attention and feed-forward
        matrices; biases and norms are left out (under 1 % of a model this size)."""
        attention = 4 * self.hidden * self.hidden
        feed_forward = 2 * self.hidden * self.ffn
        cross_attention = attention if self.encoder_layers else 0
        embeddings = self.vocab * self.hidden + self.positions * self.hidden * (2 if self.encoder_layers else 1)
        return (embeddings + self.encoder_layers * (attention + feed_forward)
                + self.decoder_layers * (attention + cross_attention + feed_forward))


# The default's shape: bart-large's width and vocabulary, deep enough for UNKNOWN_MODEL_PARAMETERS or a little more.
UNKNOWN_MODEL = ModelShape(vocab=50_265, hidden=1024, ffn=4096, encoder_layers=32, decoder_layers=32,
                           known=False)


@dataclass(frozen=True)
class MemoryEstimate:
    bytes: int
    # "recorded" (an earlier stage's peak), "formula", "default formula" (model not readable), or either formula
    # with "corrected" (times the model's recorded ratio of peak to formula)
    source: str


def memory_key(spec: StageSpec) -> str:
    """What sets a stage's peak memory, as one string: stages with the same key reach about the same peak."""
    if spec.kind == StageKind.eval:
        ev = spec.eval
        assert ev is not None, "an eval stage has an eval config"
        return f"eval|{spec.model}|b{ev.batch_size}|s{ev.max_source_length}|t{ev.max_new_tokens}"
    tr = spec.train
    assert tr is not None, "a training stage has a train config"
    return f"train|{spec.model}|b{tr.batch_size}|s{tr.max_source_length}|t{tr.max_target_length}"


def calibration_key(spec: StageSpec) -> str:
    """Stages whose ratio of recorded peak to formula is alike: the same model, trained or evaluated. Not wider:
    a tiny model's fixed overheads would inflate a big model's guess many times over."""
    return f"{'eval' if spec.kind == StageKind.eval else 'train'}|{spec.model}"


def estimate_memory(spec: StageSpec, *, recorded: int | None, shape: ModelShape | None = None,
                    correction: float | None = None) -> MemoryEstimate:
    """The stage's peak device memory: `recorded` (the largest peak of its memory key) if there is one, else
    the formula on `shape` (read from the model's config when not given), times `correction` if given (the
    largest recorded ratio of peak to formula of its calibration key)."""
    if recorded is not None and recorded > 0:
        return MemoryEstimate(recorded, "recorded")
    shape = shape or model_shape(spec.model)
    formula = _formula(spec, shape)
    # Not the default's: the ratio was measured against the model's real shape, read where it had been downloaded.
    if correction is not None and correction > 0 and shape.known:
        return MemoryEstimate(int(formula.bytes * correction), f"{formula.source} corrected x{correction:.2f}")
    return formula


def _formula(spec: StageSpec, shape: ModelShape) -> MemoryEstimate:
    source = "formula" if shape.known else "default formula"
    if spec.kind == StageKind.eval:
        ev = spec.eval
        assert ev is not None
        activations = ev.batch_size * (ev.max_source_length + ev.max_new_tokens) * shape.hidden * shape.layers
        logits = ev.batch_size * ev.max_new_tokens * shape.vocab * 4
        total = (shape.parameters * BYTES_PER_PARAMETER_EVAL + activations * EVAL_ACTIVATION_BYTES + logits)
        return MemoryEstimate(total, source)
    tr = spec.train
    assert tr is not None
    activations = tr.batch_size * (tr.max_source_length + tr.max_target_length) * shape.hidden * shape.layers
    logits = tr.batch_size * tr.max_target_length * shape.vocab * 4 * TRAIN_LOGIT_COPIES
    total = shape.parameters * BYTES_PER_PARAMETER_TRAIN + activations * TRAIN_ACTIVATION_BYTES + logits
    return MemoryEstimate(total, source)


def model_shape(name: str) -> ModelShape:
    """The shape of model `name`: a `tiny:` one from stl's own constants, a hub id or local folder from its
    config.json on this machine (never the network), anything else the conservative UNKNOWN_MODEL. A known
    shape is remembered; an unknown one is looked for again, since its first stage downloads the model."""
    try:
        return _known_shape(name)
    except LookupError:
        return UNKNOWN_MODEL


@functools.lru_cache(maxsize=64)
def _known_shape(name: str) -> ModelShape:
    """Raises LookupError where the shape cannot be read: lru_cache keeps no exception, so it is read again."""
    from stl.jobs.ml.models import TINY_LAYERS, TINY_MAX_POSITIONS, TINY_PREFIX, TINY_WIDTH

    if name.startswith(TINY_PREFIX):
        arch = name[len(TINY_PREFIX):]
        byte_vocab = 384  # ByT5's byte tokenizer: stl.jobs.ml.models.byte_tokenizer
        if arch == "gpt2":
            return ModelShape(vocab=byte_vocab, hidden=TINY_WIDTH, ffn=4 * TINY_WIDTH, encoder_layers=0,
                              decoder_layers=TINY_LAYERS, positions=TINY_MAX_POSITIONS)
        return ModelShape(vocab=byte_vocab, hidden=TINY_WIDTH, ffn=4 * TINY_WIDTH, encoder_layers=TINY_LAYERS,
                          decoder_layers=TINY_LAYERS, positions=TINY_MAX_POSITIONS + 2 if arch == "bart" else 0)
    try:
        from transformers import AutoConfig

        source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        shape = shape_from_config(AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False))
    except Exception as e:  # noqa: BLE001 - not downloaded, no such folder, an architecture transformers lacks
        raise LookupError(f"no readable config for {name}") from e
    if not shape.known:
        raise LookupError(f"{name}'s config names no width or vocabulary")
    return shape


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def shape_from_config(config: Any) -> ModelShape:
    """A transformers config's shape, by the attribute names BART, T5, GPT-2 and most others use."""
    hidden = _first_int(config, "d_model", "hidden_size", "n_embd")
    vocab = _first_int(config, "vocab_size")
    if hidden is None or vocab is None:
        return UNKNOWN_MODEL
    ffn = _first_int(config, "d_ff", "encoder_ffn_dim", "intermediate_size", "n_inner") or 4 * hidden
    if getattr(config, "is_encoder_decoder", False):
        encoder = _first_int(config, "encoder_layers", "num_layers", "num_hidden_layers") or 12
        decoder = _first_int(config, "decoder_layers", "num_decoder_layers") or encoder
    else:
        encoder, decoder = 0, _first_int(config, "n_layer", "num_hidden_layers", "num_layers") or 12
    positions = _first_int(config, "max_position_embeddings", "n_positions") or 0
    return ModelShape(vocab=vocab, hidden=hidden, ffn=ffn, encoder_layers=encoder, decoder_layers=decoder,
                      positions=positions)
