"""Where the host's time goes in one batch of greedy decoding with a static, compiled KV cache.

A diagnostic for stl's `eval.compile` decoding (jobs/ml/generation.py), not a benchmark: it prints no ratio.
It builds a random-weight model of the named size (bf16 on CUDA) and decodes one batch by `--way`:
  generate  Hugging Face `generate` with `cache_implementation="static"` (transformers compiles its step)
  loop      stl's own loop (jobs/ml/decoding.py) with its step compiled, mode reduce-overhead, as
            `eval.compile` runs it
  graphs    stl's own loop with its eager step recorded as a CUDA graph, as an eval stage on a GPU
            runs it without `eval.compile` (CUDA only)
Two untimed warm-up calls compile, then it times calls of one batch, and runs one more under cProfile
and prints the functions that took the most host time (self time, then cumulative). cProfile slows
Python-heavy code more than GPU waits, so read the shares, not the absolute times. The question it
answers: how much of a decoding step is the compiled model call, and how much is the loop around it
(preparing inputs, logits processors, stopping criteria, host syncs).
On a CPU (`--device cpu --size tiny`) it checks the plumbing only: there is no CUDA graph there.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header  # noqa: E402
from ml import SIZES, VOCAB, model_config, quiet_transformers, stl_decoder, sync, use_bench_token_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing check)")
    parser.add_argument("--size", default="bart-base", choices=SIZES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=5, help="timed calls (default 5)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument("--way", default="generate", choices=["generate", "loop", "graphs"])
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSeq2SeqLM

    quiet_transformers()
    way = {"generate": "HF generate", "loop": "stl's decoding loop, compiled",
           "graphs": "stl's decoding loop, CUDA graph of the eager step"}[args.way]
    header(f"profile_generate: {way}, static KV cache ({args.size}, {args.device})", args.device)
    torch.manual_seed(0)
    vocab = VOCAB[args.size]
    model = AutoModelForSeq2SeqLM.from_config(model_config(args.size, vocab)).eval().to(args.device)
    if args.device.startswith("cuda"):
        model.to(dtype=torch.bfloat16)
    use_bench_token_ids(model)
    model.generation_config.min_new_tokens = args.max_new_tokens
    sources = torch.randint(3, vocab, (args.batch_size, args.source_len), device=args.device)
    mask = torch.ones_like(sources)

    loop = None
    if args.way != "generate":
        loop = stl_decoder(model, args.max_new_tokens, compiled=args.way == "loop", cuda_graphs=args.way == "graphs")

    def call() -> None:
        if loop is not None:
            with torch.inference_mode():
                loop.decode(sources, mask)
            sync(args.device)
            return
        with torch.inference_mode():
            model.generate(input_ids=sources, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                           do_sample=False, num_beams=1, use_cache=True, cache_implementation="static")
        sync(args.device)

    for attempt in range(2):  # the first compiles
        started = time.perf_counter()
        call()
        print(f"warm-up call {attempt + 1}: {time.perf_counter() - started:.2f} s")
    times = []
    for _ in range(args.calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    steps = args.max_new_tokens
    print(f"one batch of {args.batch_size}: median {median * 1000:.1f} ms over {args.calls} calls, "
          f"{median / steps * 1000:.2f} ms per generated token, {args.batch_size / median:.0f} examples/s")
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
        print(f"\n== cProfile of one call, by {order}")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    main()
