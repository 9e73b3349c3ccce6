#!/usr/bin/env bash
# First, packing: bench_slots.py (16 stages at --slots 1,2,4; GPU_SLOTS=0 skips it, GPU_SLOTS=only runs it alone).
# Then a check of stl's own stage code on the GPU (bench/gpu_check.py: CUDA graphs, resume, eval, NVML);
# then the GPU benchmarks, most wanted first, so that a cut-off run still leaves them:
#   stl's training loop vs Seq2SeqTrainer (bf16) at t5-small and bart-base sizes (random weights from config,
#   synthetic tokens, no network), stl's arms eager and `train.compile: reduce-overhead` (CUDA graphs)
#   (GPU_COMPILE=0 leaves only the eager arm; GPU_EXTRA_ARMS=1 adds `train.compile: true` at both sizes and,
#   at bart-base, each arm without the batch-prefetch thread; GPU_TRAIN=0 skips gpu_check and training);
#   stl's evaluation vs Seq2SeqTrainer.predict(predict_with_generate=True), eager and with eval.compile, and
#   rank classification vs Trainer.predict over option pairs, then generation again at bart-base on sources
#   of varied lengths (--varied-lengths, about 35 s), and ROUGE-L scoring on the host's CPU
#   (bench_rouge.py) (GPU_EVAL=0 skips these); a whole eval stage
#   per fresh process, eager vs eval.compile (bench_eval_stage.py), on a GPU only with GPU_EVAL_STAGE=1
#   (2 minutes);
#   then, on CUDA, HF generate two ways against stl's decoding loop eager, recorded as CUDA graphs and
#   compiled, and three ways of
#   running a training step outside stl (bench_generate_variants.py, bench_train_variants.py; only with
#   GPU_VARIANTS=1, or alone with GPU_VARIANTS=only).
# Run on a machine with an NVIDIA GPU from the repository root:   bench/gpu.sh
# Budget: 6 min 35 s on one H200 on 2026-11-27 (gpu_check 89 s, training 94 and 75 s, eval 57 and 56 s at
# 2 rounds, bench_rouge 13 s); eval now runs 3 rounds, about 40 s more, and the varied-length bart-base
# generation about 35 s; about 4.5 minutes with GPU_EVAL=0, and 150 s with GPU_TRAIN=0 GPU_EVAL_COMPILE=off
# (H200, 2026-11-27, sixth session). Each script
# has its own time limit (COMPILE_LIMIT_S, TRAIN_LIMIT_S, LIMIT_S), and results.jsonl grows script by
# script, so a run cut off from outside keeps what finished.
# Writes three files to $BENCH_OUT/gpu-<date>/ (default $OUT if set, else bench/results): summary.txt (one
# line per figure, and the notes), results.jsonl (the RESULT records) and all.log (every script's output).
#
# Check it on a CPU machine with the same scripts and small shapes (about 3 minutes on 2 cores):
#   BENCH_DEVICE=cpu bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEVICE=${BENCH_DEVICE:-cuda}
STAMP=$(date -u +%F)
OUTDIR=${BENCH_OUT:-${OUT:-bench/results}}/gpu-$STAMP
mkdir -p "$OUTDIR"
SUMMARY=$OUTDIR/summary.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "$DEVICE" == cuda* ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')"
  # As in a worker's work horse, where it is unset (= parallel): stl's MTL stages tokenize every batch, with
  # the tokenizer's own threads on a GPU host's cores (Trainer's data is tokenized before its timer starts).
  export TOKENIZERS_PARALLELISM=true
  LIMIT_S=${LIMIT_S:-110}
  # gpu_check: cold compiles of a CUDA-graph stage (tiny:t5), its gradient check, and eval.compile's buckets;
  # a cold compile took 35-50 s on the H200 (tiny:t5 stage, T5-small).
  COMPILE_LIMIT_S=${COMPILE_LIMIT_S:-240}
  TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-240}  # two cold compiles (compile, CUDA graphs) and 2 rounds of 4-5 arms
  DTYPE=bf16
  TRAIN_BART=(--size bart-base --batch-size 32 --source-len 256 --target-len 32 --warmup-steps 10 --steps 30)
  TRAIN_T5=(--size t5-small --batch-size 64 --source-len 256 --target-len 32 --warmup-steps 10 --steps 30)
  # stl's generation eager and with eval.compile (a static KV cache in CUDA graphs), each against Trainer.
  # 3 rounds: on the lent H200 the Trainer arm alone moved 169-308 examples/s between rounds (G16).
  # GPU_EVAL_COMPILE=off leaves out the eval.compile arm (it compiles again each round, about 40 s in all).
  EVAL=(--examples 512 --batch-size 64 --source-len 256 --max-new-tokens 32 --rounds 3 --compile "${GPU_EVAL_COMPILE:-both}")
  EVAL_STAGE=(--size t5-small --examples 512 --batch-size 64 --source-len 256 --max-new-tokens 32 --rounds 2)
  BART_ARMS=(--compile off --cuda-graphs)
  T5_ARMS=(--compile off --cuda-graphs)
  if [[ "${GPU_EXTRA_ARMS:-0}" != 0 ]]; then
    BART_ARMS=(--compile both --cuda-graphs --prefetch both)
    T5_ARMS=(--compile both --cuda-graphs)
  fi
else
  # The same code paths with shapes a CPU finishes quickly: a correctness check, not figures to quote.
  LIMIT_S=${LIMIT_S:-300}
  DTYPE=fp32
  # stl never compiles on a CPU; --compile-on-cpu makes it, at the tiny size, to check the plumbing (the
  # CUDA-graph arm then runs inductor without graphs, and says so).
  COMPILE_LIMIT_S=${COMPILE_LIMIT_S:-300}
  TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-400}
  TRAIN_BART=(--size tiny --batch-size 2 --source-len 16 --target-len 4 --warmup-steps 1 --steps 2)
  TRAIN_T5=("${TRAIN_BART[@]}")
  EVAL=(--examples 4 --batch-size 2 --source-len 16 --max-new-tokens 4 --rounds 1 --compile both)
  EVAL_STAGE=(--size tiny --examples 4 --batch-size 2 --source-len 16 --max-new-tokens 4 --rounds 1)
  BART_ARMS=(--compile both --cuda-graphs --prefetch both --compile-on-cpu)
  T5_ARMS=(--compile off)  # one compiled run checks the plumbing; the tests compile tiny:t5
fi

{
  echo "# stl GPU benchmarks, $STAMP (UTC), device $DEVICE, dtype $DTYPE"
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import machine_description as m; print('# machine:', m('$DEVICE'))"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "# $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
} > "$SUMMARY"

status=0
run() {  # run LIMIT NAME ARGS...: one script; its output appended to all.log, its figures to the summary
  local limit=$1 name=$2; shift 2
  echo "== $name: $*"
  local started=$SECONDS
  local log=$OUTDIR/$name.log  # moved into all.log afterwards: the device tool returns at most 8 files
  if PYTHONUNBUFFERED=1 timeout "$limit" "$PY" "$@" > "$log" 2>&1; then
    echo "   ok ($((SECONDS - started)) s)"
  else
    echo "   FAILED or timed out ($((SECONDS - started)) s); its output is in $OUTDIR/all.log"
    tail -5 "$log" | sed 's/^/   | /'
    echo "FAILED $name (its output is in all.log)" >> "$SUMMARY"
    status=1
  fi
  # One line per figure, from the machine-readable RESULT lines (they name wall vs CPU-time), then the notes.
  grep '^RESULT ' "$log" | sed 's/^RESULT //' | tee -a "$OUTDIR/results.jsonl" | "$PY" -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    figure = f'{r[\"ratio\"]:.3f} x' if 'ratio' in r else f'{r[\"value\"]:.4g} {r[\"unit\"]}'
    print(f'{r[\"bench\"]}: {r[\"label\"]} = {figure}')" >> "$SUMMARY" || true
  grep -E '^ *note:' "$log" | sed "s/^ */$name: /" >> "$SUMMARY" || true
  { echo "===== $name: $*"; cat "$log"; echo; } >> "$OUTDIR/all.log"
  rm -f "$log"
}

: > "$OUTDIR/results.jsonl"; : > "$OUTDIR/all.log"
COMMON=(--device "$DEVICE" --dtype "$DTYPE" --data synthetic)
VARIANTS=${GPU_VARIANTS:-0}
if [[ "${GPU_COMPILE:-1}" == 0 ]]; then BART_ARMS=(--compile off); T5_ARMS=(--compile off); fi
SLOTS=${GPU_SLOTS:-1}
# Packing (issue 25): 16 stages (8 MTL of t5-small size, 8 evals) at `--slots 1,2,4`, GPU busy share, MPS or
# time-slicing; about 8 minutes on a GPU. GPU_SLOTS=0 skips it, GPU_SLOTS=only runs it alone.
if [[ "$SLOTS" != 0 ]]; then
  if [[ "$DEVICE" == cuda* ]]; then
    run "${SLOTS_LIMIT_S:-560}" slots bench/bench_slots.py --device cuda --steps 200 --tolerance 0.05
  else
    run "${SLOTS_LIMIT_S:-900}" slots bench/bench_slots.py --device cpu --slots 1,2
  fi
fi
if [[ "$SLOTS" == only ]]; then VARIANTS=none; fi
if [[ "$VARIANTS" != only && "$VARIANTS" != none ]]; then
  if [[ "${GPU_TRAIN:-1}" != 0 ]]; then
    run "$COMPILE_LIMIT_S" stages bench/gpu_check.py --device "$DEVICE"  # stl's own CUDA paths, CUDA graphs included
    # Each stl arm against Trainer, 2 interleaved rounds; the CUDA-graph arm's cold compile runs untimed first.
    run "$TRAIN_LIMIT_S" train-t5-small bench/bench_train.py "${COMMON[@]}" "${TRAIN_T5[@]}" --rounds 2 "${T5_ARMS[@]}"
    run "$TRAIN_LIMIT_S" train-bart-base bench/bench_train.py "${COMMON[@]}" "${TRAIN_BART[@]}" --rounds 2 \
      "${BART_ARMS[@]}"
  fi
  if [[ "${GPU_EVAL:-1}" != 0 ]]; then
    run "$LIMIT_S" eval-bart-base bench/bench_eval.py "${COMMON[@]}" --size bart-base "${EVAL[@]}"
    run "$LIMIT_S" eval-t5-small  bench/bench_eval.py "${COMMON[@]}" --size t5-small  "${EVAL[@]}"
    # Sources of varied lengths, as in a real task: stl sorts them and pads to length buckets (one recorded
    # graph per bucket), Trainer pads each batch to its longest.
    run "$LIMIT_S" eval-bart-base-varied bench/bench_eval.py "${COMMON[@]}" --size bart-base "${EVAL[@]}" \
      --compile off --only generation --varied-lengths
    # The eval figures include ROUGE-L on this host's CPU: how fast it scores (about 10 s).
    run "$LIMIT_S" rouge bench/bench_rouge.py --rounds 3
  fi
  if [[ "${GPU_EVAL_STAGE:-0}" != 0 || "$DEVICE" != cuda* ]]; then
    # A whole eval stage per fresh process (as the worker's work horse), eager vs eval.compile on a warm cache.
    run "$COMPILE_LIMIT_S" eval-stage-t5-small bench/bench_eval_stage.py "${COMMON[@]}" "${EVAL_STAGE[@]}"
  fi
fi
# Only with GPU_VARIANTS=1 (about 6 minutes more) or GPU_VARIANTS=only (these alone, as a call of their own),
# as they inform rather than measure stl: HF generate with bf16 weights vs a static, compiled KV cache vs
# stl's decoding loop eager, as CUDA graphs and compiled (G7 measured autocast), and a training step eager vs compiled vs
# CUDA graphs (on a CPU, check them with bench_generate_variants.py / bench_train_variants.py --device cpu
# --size tiny).
if [[ "$DEVICE" == cuda* && "$VARIANTS" != 0 && "$VARIANTS" != none ]]; then
  for size in bart-base t5-small; do  # two cold compiles each (HF's static step, stl's loop)
    run "$COMPILE_LIMIT_S" "generate-variants-$size" bench/bench_generate_variants.py --device "$DEVICE" \
      --size "$size" --examples 512 --batch-size 64 --source-len 256 --max-new-tokens 32 --rounds 2 \
      --variants bf16,static,loop,loop-graphs,loop-compiled
  done
  # Training steps eager vs compiled vs CUDA graphs (reduce-overhead), the shapes of G1 and G2.
  run "$COMPILE_LIMIT_S" train-variants-bart-base bench/bench_train_variants.py --device "$DEVICE" --size bart-base \
    --batch-size 32 --source-len 256 --target-len 32 --rounds 2
  run "$COMPILE_LIMIT_S" train-variants-t5-small bench/bench_train_variants.py --device "$DEVICE" --size t5-small \
    --batch-size 64 --source-len 256 --target-len 32 --rounds 2
fi

echo
cat "$SUMMARY"
echo "(summary.txt, results.jsonl and all.log in $OUTDIR)"
exit $status
