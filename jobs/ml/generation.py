"""Greedy answers for eval stages, batch by batch, with a KV cache.

An encoder-decoder decodes in stl's own loop (jobs/ml/decoding.py: the tokens of transformers' `generate`,
without its per-token host work) where the model's generation config allows it; anything else decodes with
`generate`, and the stage log says why. How the loop's step runs is chosen here:
- `eval.compile` on CUDA: the step compiled by torch.compile over a static KV cache, sources padded to length
  buckets and batches to full rows, so that each shape compiles once;
- otherwise on CUDA: the eager step recorded as a CUDA graph once per batch shape (no compile);
- otherwise (a CPU): the eager step over transformers' dynamic cache.
Should the compiled or recorded step fail other than by running out of memory, the stage goes on with the
eager loop, and should that fail, with `generate`: the same tokens, only slower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from stl.jobs.ml.acceleration import (
    bucketed_length,
    caused_by_out_of_memory,
    compile_pays_on,
    cuda_graph_skips,
    length_buckets,
    prepare_compile,
)
from stl.jobs.ml.decoding import DecodingStep, GreedyDecoder, greedy_rules
from stl.jobs.ml.models import pad_sequences

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from stl.jobs.ml.eval_batches import EvalBatches
    from stl.jobs.ml.evaluate import EvalModel, EvalRun
    from stl.jobs.ml.examples import Example
    from stl.jobs.ml.prefetch import IdleHostWork
    from stl.jobs.specs import EvalConfig


def records_decoding_graphs(device: torch.device) -> bool:
    """Whether eval stages on `device` record their decoding step as CUDA graphs (without eval.compile)."""
    return device.type == "cuda"


class Generator:
    def __init__(self, loaded: EvalModel, cfg: EvalRun, settings: EvalConfig, batches: EvalBatches) -> None:
        self.loaded, self.cfg, self.settings, self.batches = loaded, cfg, settings, batches
        self.model, self.device, self.seq2seq = loaded.model, loaded.device, loaded.seq2seq
        self.source_buckets = self._static_decoding_buckets() if settings.compile else None
        self.decoder: GreedyDecoder | None = None  # stl's decoding loop, set up by the first generate()
        self.prepared = False
        self.graphs_confirmed = False

    def release(self) -> None:
        """Free what stl's decoding loop holds on the device (after running out of memory, at the end)."""
        if self.decoder is not None:
            self.decoder.release()

    def generate(
        self,
        examples: Sequence[Example],
        positions: Sequence[int],
        sources: Sequence[list[int]],
        *,
        on_answer: Callable[[int, str], None] | None = None,
        idle_work: IdleHostWork | None = None,
    ) -> list[str]:
        """Greedy continuation of the source of each example at `positions` (in that order), decoded without
        special tokens; `sources` are every example's ids, by position. `on_answer(position, answer)` hears
        each one as its batch ends; `idle_work` runs while stl's decoding loop waits for the GPU."""
        import torch

        found: dict[int, str] = {}
        if not self.prepared:
            self.decoder, self.prepared = self._greedy_decoder(), True

        def generate(batch: list[int]) -> None:
            texts = self._decoded_batch([sources[i] for i in batch], idle_work)
            for i, text in zip(batch, texts, strict=True):
                found[i] = text.strip()
                if on_answer is not None:
                    on_answer(i, found[i])

        with torch.inference_mode():
            self.batches.run(examples, positions, generate)
        if self.decoder is not None and self.decoder.step is not DecodingStep.COMPILED:
            self.decoder.release()  # the memory goes back to classification; a compiled step keeps its shapes
        return [found[i] for i in positions]

    def _decoded_batch(self, sources: list[list[int]], idle_work: IdleHostWork | None) -> list[str]:
        """The answers to one batch of sources, as text."""
        rows = len(sources)
        loaded = self.loaded
        width, static = None, {}
        buckets = self._padding_buckets()
        if buckets is not None:
            # Fixed shapes for the compiled step or recorded graph: a bucket's width, and a full batch
            # (copies of the last source fill it; their outputs are dropped below).
            width = bucketed_length(max(len(s) for s in sources), buckets)
            sources = sources + [sources[-1]] * (self.batches.rows - len(sources))
        if self.source_buckets is not None:
            static = {"cache_implementation": "static"}  # for generate, where stl's loop is not used
        # Causal LMs continue from the right end, so they are padded on the left.
        left = not self.seq2seq
        input_ids = pad_sequences(sources, loaded.pad_id, left=left, width=width).to(self.device)
        mask = pad_sequences([[1] * len(s) for s in sources], 0, left=left, width=width).to(self.device)
        generated = self._decode(input_ids, mask, width, idle_work) if self.decoder is not None else None
        if generated is None:
            generated = cast("Any", self.model).generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=loaded.target_limit,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=loaded.pad_id,
                **static,
            )
        generated = generated[:rows]
        if not self.seq2seq:
            generated = generated[:, input_ids.size(1) :]
        return loaded.tokenizer.batch_decode(generated, skip_special_tokens=True)

    # --- setting up stl's decoding loop ---

    def _static_decoding_buckets(self) -> tuple[int, ...] | None:
        """Set up `eval.compile`: the padded source lengths of static decoding, or None where it is skipped.

        The decoding step is compiled (CUDA graphs) over a static KV cache, so its shapes must repeat:
        sources are padded to length buckets and every batch to `batch_size` rows, and each bucket
        compiles once (tens of seconds, then from the cache under STL_HOME/cache).
        """
        if not compile_pays_on(self.device):
            self.cfg.log(f"eval.compile skipped: torch.compile only pays on CUDA, and this stage runs on {self.device}")
            return None
        if not getattr(self.model, "_can_compile_fullgraph", False):
            # transformers marks the architectures whose decoding step compiles; others may fail mid-stage.
            self.cfg.log(
                f"eval.compile skipped: transformers does not mark {type(self.model).__name__} as compilable; "
                "decoding with the dynamic KV cache"
            )
            return None
        buckets = length_buckets(self.loaded.source_limit)
        where = prepare_compile(self.cfg.cache_dir, shapes=2 * len(buckets))  # room for dynamic recompiles
        self.cfg.log(
            f"generation decodes with a static KV cache compiled by torch.compile: sources padded to "
            f"{'/'.join(map(str, buckets))} tokens, batches to {self.settings.batch_size} rows; caches in {where}"
        )
        return buckets

    def _greedy_decoder(self) -> GreedyDecoder | None:
        """stl's own decoding loop (jobs/ml/decoding.py) where it reproduces `generate`, else None (then
        `generate` decodes, and the log says why)."""
        if not self.seq2seq:
            return None
        rules = greedy_rules(self.model, max_new_tokens=self.loaded.target_limit, pad_id=self.loaded.pad_id)
        if isinstance(rules, str):
            self.cfg.log(f"generation runs transformers' generate, not stl's decoding loop: {rules}")
            return None
        # Batches come sorted by length, so a shape's batches follow one another; the second shape kept
        # covers a batch whose tokens sort it into the bucket before.
        if self.source_buckets is not None:
            step, keep_shapes = DecodingStep.COMPILED, len(self.source_buckets)
        elif records_decoding_graphs(self.device):
            # On a GPU the eager step is recorded as a CUDA graph per batch shape: no compile, and one launch
            # per token instead of hundreds (the step's host work, not the GPU, set eager decoding's pace).
            step, keep_shapes = DecodingStep.RECORDED, 2
        else:
            step, keep_shapes = DecodingStep.EAGER, 1
        try:
            decoder = GreedyDecoder(
                self.model, rules, step=step, compile_options={"mode": "reduce-overhead"}, keep_shapes=keep_shapes
            )
        except (ImportError, TypeError, AttributeError) as e:  # a transformers release without these caches
            self.cfg.log(f"generation runs transformers' generate, not stl's decoding loop: {e}")
            return None
        self.cfg.log(
            "generation decodes greedily in stl's own loop (the tokens of transformers' generate, without its "
            "per-token host work)"
            + (", its step compiled by torch.compile (CUDA graphs)" if step is DecodingStep.COMPILED else "")
            + (
                f", its step recorded as a CUDA graph once per batch shape: sources padded to "
                f"{'/'.join(map(str, length_buckets(self.loaded.source_limit)))} tokens, batches to "
                f"{self.batches.rows} rows" if step is DecodingStep.RECORDED else ""
            )
        )
        return decoder

    def _padding_buckets(self) -> tuple[int, ...] | None:
        """The source lengths each generation batch is padded to (its rows to a full batch too), or None
        to pad to the batch's longest source only. A compiled step and a recorded CUDA graph are reused
        only on the shape they were made for: a few fixed shapes make them repeat. Each recording runs the
        step on the host once more, eagerly, while padding costs the encoder a few tokens per source, a
        large cheap matrix product on a GPU."""
        if self.source_buckets is not None:
            return self.source_buckets
        if self.decoder is not None and self.decoder.step is DecodingStep.RECORDED:
            return length_buckets(self.loaded.source_limit)
        return None

    # --- decoding, and falling back ---

    def _decode(
        self, input_ids: torch.Tensor, mask: torch.Tensor, width: int | None, idle_work: IdleHostWork | None = None
    ) -> torch.Tensor | None:
        """stl's decoding loop on one batch, or None where the stage has just given it up for `generate`.

        Should the loop fail other than by running out of memory, the stage logs why and goes on with
        the next way down: a compiled step is replaced by the eager loop, the eager loop by transformers'
        `generate`. Both give the same tokens; only the speed is lost."""
        assert self.decoder is not None
        skips = cuda_graph_skips()
        try:
            generated = self.decoder.decode(input_ids, mask, idle_work=idle_work)
        except Exception as e:
            if caused_by_out_of_memory(e):
                raise
            failed, rules = self.decoder, self.decoder.rules
            failed.release()
            if failed.step is not DecodingStep.EAGER:
                what = "the compiled decoding step"
                if failed.step is DecodingStep.RECORDED:
                    what = "recording the decoding step as a CUDA graph"
                self.cfg.log(f"{what} failed ({_root_reason(e)}); decoding eagerly for the rest of the stage")
                self.decoder = GreedyDecoder(self.model, rules)
                return self._decode(input_ids, mask, width, idle_work)
            self.cfg.log(f"stl's decoding loop failed ({_root_reason(e)}); "
                         "decoding with transformers' generate for the rest of the stage")
            self.decoder = None
            return None
        # Only where the step after the first ran (with one new token it never does).
        if self.decoder.step is not DecodingStep.EAGER and self.decoder.rules.max_new_tokens > 1:
            self._log_cuda_graphs(width, skips)
        return generated

    def _log_cuda_graphs(self, width: int | None, skips_before: int) -> None:
        """Say once that the decoding step replays CUDA graphs (recorded or compiled), and whenever a
        new bucket's compiled graph falls back to plain compiled kernels (inductor counts that when it
        compiles)."""
        if cuda_graph_skips() > skips_before:
            self.cfg.log(
                f"the decoding step for {width}-token sources runs without CUDA graphs (compiled kernels only); "
                "set TORCH_LOGS=cudagraphs to see why"
            )
        elif not self.graphs_confirmed:
            self.cfg.log("CUDA graphs in use: each decoded token replays the recorded decoding step")
        self.graphs_confirmed = True


def _root_reason(error: BaseException) -> str:
    """The innermost cause as `Type: first line` (torch.compile wraps what its backend raised)."""
    root = error
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    return f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:300]}"
