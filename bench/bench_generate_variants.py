"""Greedy generation, several ways on one model: Hugging Face `generate` called three ways, and stl's loop.

This measures options for stl's eval stage (jobs/ml/generation.py):
  autocast   fp32 weights under bf16 autocast, dynamic KV cache (stl's eval before it cast weights to bf16)
  bf16       bf16 weights, dynamic KV cache (Trainer's bf16_full_eval)
  static     bf16 weights, `cache_implementation="static"`: a fixed-size KV cache, which lets transformers
             compile the decoding step (CUDA graphs); the first call compiles, in the warm-up round
  loop       stl's own decoding loop (jobs/ml/decoding.py), bf16 weights, dynamic KV cache, eager: what stl's
             eval runs for an encoder-decoder on a CPU
  loop-graphs  the same over a static KV cache, its eager step recorded as a CUDA graph per batch shape
             and replayed per token: what stl's eval runs on a GPU without eval.compile (CUDA only)
  loop-compiled  the same with its step compiled by torch.compile, mode reduce-overhead (CUDA graphs): stl's
             `eval.compile`; on a CPU inductor compiles it without graphs
Same random weights, same random source ids (every row `--source-len` tokens), batch size and
max_new_tokens (min_new_tokens equal to it, so every variant decodes every token). Examples/s per variant,
interleaved rounds after one discarded warm-up, ratios against `bf16`, and the share of generated tokens
that equal bf16's (a check that the variants decode the same thing; autocast may differ by rounding).
On a CPU everything runs fp32 (no autocast or bf16 there); `--device cpu --size tiny` checks the plumbing,
and `--variants bf16,loop` measures what the loop saves on a CPU's host work.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ratio, Report, header, interleave, warmed_up_variants  # noqa: E402
from ml import SIZES, VOCAB, model_config, quiet_transformers, stl_decoder, sync, use_bench_token_ids  # noqa: E402

BENCH = "generate-variants"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing check)")
    parser.add_argument("--size", default="bart-base", choices=SIZES)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="autocast,bf16,static,loop,loop-graphs,loop-compiled",
                        help="comma-separated subset")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSeq2SeqLM

    quiet_transformers()
    header(f"{BENCH}: HF generate variants ({args.size}, {args.device})", args.device)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    vocab = VOCAB[args.size]
    base = AutoModelForSeq2SeqLM.from_config(model_config(args.size, vocab)).eval()
    sources = torch.randint(3, vocab, (args.examples, args.source_len))
    mask = torch.ones_like(sources)

    def variant(name: str) -> tuple[Any, Any, dict[str, Any]]:
        """(model, context factory, extra generate kwargs) of one variant."""
        model = AutoModelForSeq2SeqLM.from_config(model_config(args.size, vocab))
        model.load_state_dict(base.state_dict())
        model.eval().to(args.device)
        use_bench_token_ids(model)
        model.generation_config.min_new_tokens = args.max_new_tokens
        context: Any = contextlib.nullcontext
        if cuda and name == "autocast":
            context = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        elif cuda:
            model.to(dtype=torch.bfloat16)
        extra = {"cache_implementation": "static"} if name == "static" else {}
        return model, context, extra

    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    known = {"autocast", "bf16", "static", "loop", "loop-graphs", "loop-compiled"}
    if set(names) - known:
        raise SystemExit(f"unknown variants {sorted(set(names) - known)}; use {', '.join(sorted(known))}")
    if "loop-graphs" in names and not cuda:
        raise SystemExit("the loop-graphs variant records CUDA graphs: it needs --device cuda")
    outputs: dict[str, Any] = {}

    def runner(name: str) -> Any:
        model, context, extra = variant(name)
        loop = stl_decoder(model, args.max_new_tokens, compiled=name == "loop-compiled",
                           cuda_graphs=name == "loop-graphs") if name.startswith("loop") else None

        def run() -> float:
            pieces = []
            sync(args.device)
            started = time.perf_counter()
            with torch.inference_mode():
                for first in range(0, args.examples, args.batch_size):
                    batch = slice(first, first + args.batch_size)
                    if loop is not None:  # returns host ids
                        pieces.append(loop.decode(sources[batch].to(args.device), mask[batch].to(args.device)))
                        continue
                    with context():
                        generated = model.generate(input_ids=sources[batch].to(args.device),
                                                   attention_mask=mask[batch].to(args.device),
                                                   max_new_tokens=args.max_new_tokens, do_sample=False,
                                                   num_beams=1, use_cache=True, **extra)
                    pieces.append(generated.cpu())  # a host copy per batch, as decoding text needs
            sync(args.device)
            outputs[name] = torch.cat(pieces)
            return args.examples / (time.perf_counter() - started)

        return run

    fns = warmed_up_variants(names, runner, args.size)
    results = interleave(fns, rounds=args.rounds)
    ratios = [Ratio(name, "bf16", f"{name} / bf16") for name in results if name != "bf16" and "bf16" in results]
    Report(f"{BENCH}: {args.size}, batch {args.batch_size}, {args.source_len}->{args.max_new_tokens} tokens",
           results, unit="examples/s", higher_is_better=True, ratios=ratios, bench=f"{BENCH}:{args.size}").print()
    if "bf16" in outputs:
        reference = outputs["bf16"]
        for name, tokens in outputs.items():
            if name != "bf16" and tokens.shape == reference.shape:
                same = (tokens == reference).float().mean().item()
                print(f"   note: {args.size}: {name} generated the same token as bf16 at {same:.1%} of positions")
    if len(fns) < len(names):
        raise SystemExit(f"variants that failed: {sorted(set(names) - set(fns))}")


if __name__ == "__main__":
    main()
