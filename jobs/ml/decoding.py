"""Greedy decoding of encoder-decoder models in a loop of stl's own, with a KV cache.

Why not Hugging Face `generate`: its loop runs about 1,360 Python calls per token around the model
(bench/profile_generate.py), and waits for the GPU once per token to test for the end. On a GPU with
the decoding step compiled, the host, not the GPU, sets the pace. This loop keeps the whole step on
the device: the model call, the logits rules below, the argmax and the bookkeeping are one function,
which on a GPU runs over a static KV cache as one CUDA graph replay per token: recorded from the eager
step once per batch shape, or compiled by torch.compile under `eval.compile`. On a GPU the host looks for
the end only every few tokens, and while it waits there it does the stage's other host work (scoring
the last batch's answers, say: stl.jobs.ml.prefetch.IdleHostWork) instead of sitting idle.

It produces `generate`'s tokens for greedy decoding, including the rules the model's generation config
turns into logits processors (`no_repeat_ngram_size`, `min_length`, `min_new_tokens`,
`forced_bos_token_id`, `forced_eos_token_id`, `suppress_tokens`, `begin_suppress_tokens`):
tests/test_decoding.py checks token for token. A generation config that asks for anything else
(a repetition penalty, bad words, ...) gets `generate` itself, with the reason logged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from stl.jobs.ml.cuda_graphs import GraphRecorder, free_graph_pools

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from stl.jobs.ml.prefetch import IdleHostWork

# Generation-config fields that do not change greedy tokens: token ids read below, length limits
# stl sets, and settings of sampling and beam search, which greedy decoding ignores.
_NEUTRAL_FIELDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "do_sample", "num_beams", "early_stopping", "length_penalty", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile", "max_cache_len",
    "output_attentions", "output_hidden_states", "transformers_version", "_from_model_config",
    "return_legacy_cache", "is_assistant", "trust_remote_code",
})
# Fields whose rules this module applies itself (see `apply_rules`).
_RULE_FIELDS = frozenset({
    "min_length", "min_new_tokens", "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id",
    "suppress_tokens", "begin_suppress_tokens",
})
# Fields that change nothing at these values, which a config may state explicitly (transformers' own
# defaults are None, so `to_diff_dict` lists them).
_NEUTRAL_VALUES: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": 1.0, "num_return_sequences": 1, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "remove_invalid_values": False, "renormalize_logits": False,
}
_EOS_CHECK_EVERY = 8  # tokens between looks at "all rows finished?" on a GPU (each look waits for it)
@dataclass(frozen=True)
class GreedyRules:
    """What greedy `generate` would do for one model: its special tokens, length limits and logits rules.
    Lengths count the decoder's tokens including its start token, as transformers' processors do."""

    max_new_tokens: int
    decoder_start_id: int
    pad_id: int
    eos_ids: tuple[int, ...] = ()  # empty: no row ever finishes early
    min_length: int = 0
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    forced_bos_id: int | None = None
    forced_eos_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    begin_suppress_ids: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        """Decoder tokens in a finished row: the start token and `max_new_tokens`."""
        return 1 + self.max_new_tokens


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def greedy_rules(model: Any, *, max_new_tokens: int, pad_id: int) -> GreedyRules | str:
    """The rules of `model.generate(do_sample=False, num_beams=1, max_new_tokens=..., pad_token_id=...)`,
    or why this loop can't reproduce them (then use `generate`)."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return "the model is not an encoder-decoder"
    config = model.generation_config  # read only
    changed = {
        name for name, value in config.to_diff_dict().items()
        if not (name in _NEUTRAL_VALUES and value == _NEUTRAL_VALUES[name])
    }
    unknown = sorted(changed - _NEUTRAL_FIELDS - _RULE_FIELDS)
    if unknown:
        return f"its generation config sets {', '.join(unknown)}"
    start = config.decoder_start_token_id
    if start is None:
        start = config.bos_token_id
    if start is None or not isinstance(start, int):
        return "its generation config names no single decoder start token"
    eos = _ids(config.eos_token_id)
    min_new_tokens = int(config.min_new_tokens or 0)
    # As in `generate`: a `min_new_tokens` replaces `min_length` (counted after the start token).
    min_length = min_new_tokens + 1 if config.min_new_tokens is not None else int(config.min_length or 0)
    return GreedyRules(
        max_new_tokens=max_new_tokens,
        decoder_start_id=int(start),
        pad_id=pad_id,
        eos_ids=eos,
        # transformers applies the minimum-length rules only where there is an EOS to hold back.
        min_length=min_length if eos else 0,
        min_new_tokens=min_new_tokens if eos else 0,
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        forced_bos_id=None if config.forced_bos_token_id is None else int(config.forced_bos_token_id),
        forced_eos_ids=_ids(config.forced_eos_token_id),
        suppress_ids=_ids(config.suppress_tokens),
        begin_suppress_ids=_ids(config.begin_suppress_tokens),
    )


@dataclass(frozen=True)
class RuleMasks:
    """The rules' token sets as device tensors over the vocabulary, made once per decoder."""

    eos: torch.Tensor  # bool
    eos_ids: torch.Tensor  # long, the ids themselves
    forced_bos: torch.Tensor | None  # fp32 scores: 0 at the forced token, -inf elsewhere
    forced_eos: torch.Tensor | None
    suppress: torch.Tensor | None  # bool
    begin_suppress: torch.Tensor | None  # bool


def rule_masks(rules: GreedyRules, vocab: int, device: torch.device) -> RuleMasks:
    import torch

    def mask(ids: Sequence[int]) -> torch.Tensor:
        # As transformers' `isin(arange(vocab), ids)`: an id outside the vocabulary (negative ones too)
        # matches nothing.
        found = torch.zeros(vocab, dtype=torch.bool)
        found[[i for i in ids if 0 <= i < vocab]] = True
        return found.to(device)

    def only(ids: Sequence[int]) -> torch.Tensor:
        # As transformers' `scores[:, ids] = 0`: plain indexing (a negative id counts from the end).
        scores = torch.full((vocab,), float("-inf"), dtype=torch.float32)
        scores[list(ids)] = 0.0
        return scores.to(device)

    return RuleMasks(
        eos=mask(rules.eos_ids),
        eos_ids=torch.tensor(rules.eos_ids, dtype=torch.long).to(device),
        forced_bos=None if rules.forced_bos_id is None else only([rules.forced_bos_id]),
        forced_eos=only(rules.forced_eos_ids) if rules.forced_eos_ids else None,
        suppress=mask(rules.suppress_ids) if rules.suppress_ids else None,
        begin_suppress=mask(rules.begin_suppress_ids) if rules.begin_suppress_ids else None,
    )


def apply_rules(
    rules: GreedyRules, masks: RuleMasks, tokens: torch.Tensor, length: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """`scores` (rows x vocabulary, fp32) for the next token after the first `length` (a 0-dim tensor) of
    `tokens`, with the rules applied in transformers' order. Only tensor operations, no host syncs, so
    it compiles into the decoding step's graph."""
    import torch

    vocab = scores.size(-1)
    n = rules.no_repeat_ngram_size
    if 0 < n <= tokens.size(1):
        # A complete n-gram whose first n-1 tokens are the last n-1 tokens bans its last token.
        windows = tokens.unfold(1, n, 1)  # rows x starts x n
        starts = torch.arange(windows.size(1), device=tokens.device)
        suffix_at = (length - n + 1 + torch.arange(n - 1, device=tokens.device)).clamp(min=0)
        suffix = tokens.index_select(1, suffix_at)
        matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=-1) & (starts <= length - n)
        # Windows that don't match write to a spare column past the vocabulary.
        banned_ids = torch.where(matches, windows[..., -1], vocab)
        banned = torch.zeros(scores.size(0), vocab + 1, dtype=torch.bool, device=scores.device)
        banned = banned.scatter(1, banned_ids, True)[:, :vocab]
        scores = scores.masked_fill(banned, float("-inf"))
    if rules.min_length > 0:
        scores = scores.masked_fill((length < rules.min_length) & masks.eos, float("-inf"))
    if rules.min_new_tokens > 0:
        scores = scores.masked_fill((length - 1 < rules.min_new_tokens) & masks.eos, float("-inf"))
    if masks.forced_bos is not None:
        scores = torch.where(length == 1, masks.forced_bos, scores)
    if masks.forced_eos is not None:
        scores = torch.where(length == rules.length - 1, masks.forced_eos, scores)
    if masks.suppress is not None:
        scores = scores.masked_fill(masks.suppress, float("-inf"))
    if masks.begin_suppress is not None:
        begin = 1 if rules.forced_bos_id is None else 2
        scores = scores.masked_fill((length == begin) & masks.begin_suppress, float("-inf"))
    return scores


@dataclass
class _Batch:
    """Device buffers of one batch shape, reused batch after batch (a compiled step replays on them)."""

    cache: Any  # transformers' EncoderDecoderCache of two StaticCaches (compiled) or DynamicCaches
    encoder_states: torch.Tensor  # rows x source x hidden
    attention_mask: torch.Tensor  # rows x source
    tokens: torch.Tensor  # rows x rules.length: the start token, then what is decoded (pad after the end)
    unfinished: torch.Tensor  # rows, bool
    length: torch.Tensor  # 0-dim: decoder tokens so far, the start token included
    graph: Any = None  # torch.cuda.CUDAGraph of the step on these buffers, once recorded (RECORDED)
    # RECORDED: ones over the static self-attention cache. Given none, BART sizes one from the cache's
    # length on the host (a sync, which a CUDA graph recording refuses); with it the step stays on the device.
    decoder_mask: torch.Tensor | None = None


class DecodingStep(StrEnum):
    """How the per-token decoding step runs."""

    EAGER = "eager"  # eagerly, over transformers' dynamic KV cache
    # Compiled by torch.compile over a static KV cache (`compile_options` mode "reduce-overhead" replays it as
    # a CUDA graph, after a compile per batch shape).
    COMPILED = "compiled"
    # CUDA only: the eager step over a static KV cache, recorded as a CUDA graph once per batch shape and
    # replayed for every later token: the host launches one graph per token instead of the step's hundreds
    # of kernels, with no compile.
    RECORDED = "recorded"


class GreedyDecoder:
    """Greedy decoding of `model` (an encoder-decoder) by `rules`, one batch at a time, its step run as
    `step` says."""

    def __init__(
        self,
        model: Any,
        rules: GreedyRules,
        *,
        step: DecodingStep = DecodingStep.EAGER,
        compile_options: dict[str, Any] | None = None,
        keep_shapes: int = 1,
    ) -> None:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache, StaticCache

        self.model, self.rules = model, rules
        self.step = DecodingStep(step)
        # Fail here, not mid-stage, where this transformers release builds its caches differently.
        decoder_config = model.config.get_text_config(decoder=True)
        if self.static:
            StaticCache(config=decoder_config, max_cache_len=1)
        else:
            DynamicCache(config=decoder_config)
        self.keep_shapes = keep_shapes  # batch shapes whose buffers stay allocated (one per length bucket)
        self._batches: dict[tuple[int, int], _Batch] = {}  # least recently used first
        self._masks: RuleMasks | None = None  # made from the first logits (their width is the vocabulary)
        self._cache_types = (EncoderDecoderCache, StaticCache, DynamicCache)
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` along the way; older releases also want
        # the write position, newer ones keep it in the cache.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._pass_position = "cache_position" in parameters
        self._pass_decoder_mask = self.step is DecodingStep.RECORDED and "decoder_attention_mask" in parameters
        self._recorder = GraphRecorder(model)
        run_step: Callable[[_Batch], None] = self._step
        if self.step is DecodingStep.COMPILED:
            options = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
            run_step = torch.compile(self._step, **options)
        self._compiled_step = run_step

    @property
    def static(self) -> bool:
        """Whether the KV cache is static (fixed shapes and addresses), reset in place between batches."""
        return self.step is not DecodingStep.EAGER

    def release(self) -> None:
        """Free what decoding holds on the device: every batch shape's buffers and recorded graph and, when
        compiled, the compiled steps with their CUDA graphs' memory pools (each shape compiles again when
        next used, from inductor's on-disk cache). After running out of memory this also gives the smaller
        batches that follow a fresh allowance of dynamo's recompile limit, which `fullgraph` would
        otherwise turn into an error."""
        recorded = any(batch.graph is not None for batch in self._batches.values())
        self._batches.clear()
        if recorded:
            free_graph_pools()
        if self.step is DecodingStep.COMPILED:
            import torch._dynamo

            torch._dynamo.reset()

    def _buffers(self, rows: int, width: int, encoder_states: torch.Tensor, attention_mask: torch.Tensor) -> _Batch:
        import torch

        key = (rows, width)
        found = self._batches.pop(key, None)
        if found is not None:
            self._batches[key] = found  # now the most recently used
            # A static cache is reset in place (a compiled step or recorded graph holds its addresses); a
            # dynamic one is made anew, as some transformers releases reset it by zeroing, not by emptying it.
            if self.static:
                found.cache.reset()
            else:
                found.cache = self._new_cache(width)
            found.encoder_states.copy_(encoder_states)
            found.attention_mask.copy_(attention_mask)
            found.tokens.fill_(self.rules.pad_id)
            found.tokens[:, 0] = self.rules.decoder_start_id
            found.unfinished.fill_(True)
            found.length.fill_(1)
            return found
        while len(self._batches) >= self.keep_shapes:
            if self._batches.pop(next(iter(self._batches))).graph is not None:
                free_graph_pools()
        device = encoder_states.device
        tokens = torch.full((rows, self.rules.length), self.rules.pad_id, dtype=torch.long, device=device)
        tokens[:, 0] = self.rules.decoder_start_id
        batch = _Batch(
            cache=self._new_cache(width),
            encoder_states=encoder_states.clone(),
            attention_mask=attention_mask.clone(),
            tokens=tokens,
            unfinished=torch.ones(rows, dtype=torch.bool, device=device),
            length=torch.ones((), dtype=torch.long, device=device),
            decoder_mask=torch.ones_like(tokens) if self._pass_decoder_mask else None,
        )
        if self.step is DecodingStep.COMPILED:
            # Fixed addresses: a CUDA graph reads and writes these in place, replay after replay.
            for tensor in (batch.encoder_states, batch.attention_mask, batch.tokens, batch.unfinished, batch.length):
                torch._dynamo.mark_static_address(tensor)
        self._batches[key] = batch
        return batch

    def _new_cache(self, width: int) -> Any:
        encoder_decoder_cache, static_cache, dynamic_cache = self._cache_types
        decoder_config = self.model.config.get_text_config(decoder=True)
        if self.static:  # fixed shapes and addresses for the compiled step or recorded graph
            return encoder_decoder_cache(
                static_cache(config=decoder_config, max_cache_len=self.rules.length),
                static_cache(config=decoder_config, max_cache_len=width),
            )
        # Eager: a cache that grows token by token attends to fewer slots (about 5 % faster on a CPU).
        return encoder_decoder_cache(dynamic_cache(config=decoder_config), dynamic_cache(config=decoder_config))

    def _rule_masks(self, logits: torch.Tensor) -> RuleMasks:
        if self._masks is None:
            self._masks = rule_masks(self.rules, logits.size(-1), logits.device)
            if self.step is DecodingStep.COMPILED:
                import torch

                for mask in vars(self._masks).values():
                    if mask is not None:
                        torch._dynamo.mark_static_address(mask)
        return self._masks

    def _logits(self, batch: _Batch) -> torch.Tensor:
        """The next token's logits (rows x vocabulary, fp32): one decoder step over the KV cache."""
        from transformers.modeling_outputs import BaseModelOutput

        rows = batch.tokens.size(0)
        last = batch.tokens.gather(1, (batch.length - 1).view(1, 1).expand(rows, 1))
        extra: dict[str, Any] = {self._cache_argument: batch.cache}
        if self._pass_position:
            extra["cache_position"] = (batch.length - 1).view(1)
        if batch.decoder_mask is not None:
            extra["decoder_attention_mask"] = batch.decoder_mask
        return self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoder_states),
            attention_mask=batch.attention_mask,
            decoder_input_ids=last,
            use_cache=True,
            return_dict=True,
            **extra,
        ).logits[:, -1].float()

    def _choose(self, batch: _Batch, logits: torch.Tensor, masks: RuleMasks) -> None:
        """Apply the rules, take the argmax, and append it to every row, in place."""
        import torch

        rules, tokens, length = self.rules, batch.tokens, batch.length
        chosen = apply_rules(rules, masks, tokens, length, logits).argmax(dim=-1)
        if rules.eos_ids:
            # Finished rows go on with padding, as in `generate`.
            chosen = torch.where(batch.unfinished, chosen, rules.pad_id)
            batch.unfinished.logical_and_(~torch.isin(chosen, masks.eos_ids))
        tokens.scatter_(1, length.view(1, 1).expand(tokens.size(0), 1), chosen.unsqueeze(1))
        length.add_(1)

    def _step(self, batch: _Batch) -> None:
        """Decode one token for every row, on the device, in place (after the first, whose logits made the
        rule masks)."""
        assert self._masks is not None
        self._choose(batch, self._logits(batch), self._masks)

    def _replay(self, batch: _Batch) -> None:
        """One step as a CUDA graph replay; the first time for these buffers, the step decodes this token for
        real and is recorded (see stl.jobs.ml.cuda_graphs.GraphRecorder)."""
        if batch.graph is not None:
            batch.graph.replay()
            return
        batch.graph = self._recorder.record(lambda: self._step(batch), batch.tokens.device)

    def _device_busy(self, device: torch.device) -> Callable[[], bool]:
        """Whether `device` still has work queued, asked without waiting for it. A CPU has run each
        operation by the time it returns, so it never is."""
        import torch

        if device.type != "cuda":
            return lambda: False
        stream = torch.cuda.current_stream(device)
        return lambda: not stream.query()

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, idle_work: IdleHostWork | None = None
    ) -> torch.Tensor:
        """Token ids (rows x 1 + max_new_tokens, on the host): the decoder start token, then the greedy
        continuation; a row that ends early is padded after its EOS. `idle_work` runs where the loop would
        wait for the device."""
        import torch

        busy = self._device_busy(input_ids.device)
        with torch.inference_mode():
            rows, width = input_ids.shape
            encoder_states = self.model.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True
            ).last_hidden_state
            batch = self._buffers(rows, width, encoder_states, attention_mask)
            check_every = _EOS_CHECK_EVERY if input_ids.device.type == "cuda" else 1
            # The first step fills the cross-attention cache (a different graph), so it runs eagerly.
            logits = self._logits(batch)
            self._choose(batch, logits, self._rule_masks(logits))
            for made in range(1, self.rules.max_new_tokens):
                if made % check_every == 0:
                    if idle_work is not None:
                        idle_work.run_while(busy)
                    if self.rules.eos_ids and not bool(batch.unfinished.any()):
                        break
                if self.step is DecodingStep.COMPILED and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                if self.step is DecodingStep.RECORDED:
                    self._replay(batch)
                else:
                    self._compiled_step(batch)
            if idle_work is not None:
                idle_work.run_while(busy)
            # A copy: the next batch of this shape reuses the buffer.
            return batch.tokens.to("cpu", copy=True)
