"""One training step, four ways of running it on one model: which is fastest here?

This measures options for stl's training loop (jobs/ml/train.py), not stl itself. Every variant runs the same
step as stl's: bf16 autocast on a CUDA GPU (fp32 on a CPU), summed cross-entropy over the target tokens,
backward, gradient clipping at 1.0 and fused AdamW, on fixed shapes (one length bucket), with no host sync
inside the timed steps:
  eager            the model as it is (stl's default)
  compile          torch.compile(model), inductor's default mode (stl's `train.compile: true`)
  reduce-overhead  torch.compile(model, mode="reduce-overhead"): the forward and backward replayed as CUDA
                   graphs, so the host launches one graph instead of each kernel (CUDA only)
  max-autotune     torch.compile(model, mode="max-autotune-no-cudagraphs"): inductor tries several matmul
                   and fused-kernel configurations (a long first compile)
Same random weights and batch per variant. Samples/s per variant over `--steps` steps after `--warmup-steps`
(which hold the compile), interleaved rounds after one discarded warm-up round, ratios against `eager`, and
the last step's loss per variant (they should agree up to compiled kernels' rounding).
On a CPU it only checks the plumbing: `--device cpu --size tiny --variants eager,compile`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ratio, Report, header, interleave, warmed_up_variants  # noqa: E402
from ml import PAD, SIZES, VOCAB, model_config, quiet_transformers, sync  # noqa: E402

BENCH = "train-variants"
MODES = {"eager": None, "compile": "default", "reduce-overhead": "reduce-overhead",
         "max-autotune": "max-autotune-no-cudagraphs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing check)")
    parser.add_argument("--size", default="bart-base", choices=SIZES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed first steps per round (default 5)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="eager,compile,reduce-overhead", help="comma-separated subset of "
                        + ", ".join(MODES))
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; use {', '.join(MODES)}")

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSeq2SeqLM

    quiet_transformers()
    header(f"{BENCH}: training-step variants ({args.size}, {args.device})", args.device)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    vocab = VOCAB[args.size]
    base = AutoModelForSeq2SeqLM.from_config(model_config(args.size, vocab))
    sources = torch.randint(3, vocab, (args.batch_size, args.source_len))
    targets = torch.randint(3, vocab, (args.batch_size, args.target_len))
    batch = {
        "input_ids": sources.to(args.device),
        "attention_mask": torch.ones_like(sources).to(args.device),
        "decoder_input_ids": torch.cat([torch.full((args.batch_size, 1), PAD), targets[:, :-1]], 1).to(args.device),
    }
    labels = targets.to(args.device)
    losses: dict[str, float] = {}

    def runner(name: str) -> Any:
        model = AutoModelForSeq2SeqLM.from_config(model_config(args.size, vocab))
        model.load_state_dict(base.state_dict())
        model.train().to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=cuda or None)
        mode = MODES[name]
        forward = model if mode is None else torch.compile(model, mode=mode, dynamic=False)

        def step() -> torch.Tensor:
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()  # each call starts a new step for CUDA graphs
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = forward(**batch, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   reduction="sum") / labels.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        def run() -> float:
            for _ in range(args.warmup_steps):
                step()
            sync(args.device)
            started = time.perf_counter()
            loss = step()
            for _ in range(args.steps - 1):
                loss = step()
            sync(args.device)
            seconds = time.perf_counter() - started
            losses[name] = float(loss.item())
            return args.steps * args.batch_size / seconds

        return run

    fns = warmed_up_variants(names, runner, args.size)
    results = interleave(fns, rounds=args.rounds)
    ratios = [Ratio(name, "eager", f"{name} / eager") for name in results if name != "eager" and "eager" in results]
    Report(f"{BENCH}: {args.size}, batch {args.batch_size}, {args.source_len}->{args.target_len} tokens",
           results, unit="samples/s", higher_is_better=True, ratios=ratios, bench=f"{BENCH}:{args.size}",
           notes=["last step's loss: " + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items())]).print()
    if len(fns) < len(names):
        raise SystemExit(f"variants that failed: {sorted(set(names) - set(fns))}")


if __name__ == "__main__":
    main()
