"""Evaluation throughput: stl's eval stage (jobs/ml/evaluate.py `evaluate`) vs Hugging Face, examples/s.

generation  stl: batched greedy decoding + ROUGE-L of a generation task, vs
            `Seq2SeqTrainer.predict(predict_with_generate=True)` on the same token ids, followed by the same
            decoding and ROUGE-L (stl.jobs.ml.evaluate.rouge_l), so both sides do the same work. With
            --compile on (or both) stl's arm is (also) run with `eval.compile: true`: a static KV cache
            that transformers compiles into CUDA graphs (on a CPU stl skips it and decodes as usual);
            its rounds share one inductor cache, so the warm-up round compiles cold.
rank        stl: rank classification of a task with options (the encoder runs once per example; its
            options go through the decoder in batches), vs the usual Hugging Face way: `Trainer.predict`
            over (source, option) pairs with `preprocess_logits_for_metrics` summing each pair's token
            log-likelihoods, then the best option per example.
Same model (identical random weights from one directory), same examples, batch size, lengths and
max_new_tokens. Only the scoring is timed (stl: between its "evaluating" log line, written once the model
is loaded, and its per-task result line; HF: tokenizing, the predict call, decoding and scoring). The model's
generation config sets min_new_tokens = max_new_tokens, so both sides decode every token (equal work).
One warm-up round is run and discarded. Predictions are compared as a correctness check (they should
agree: same model, greedy decoding).
Precision: fp32 on CPU; on CUDA stl's bf16 weights (jobs/ml/evaluate.py casts them, on GPUs with native bf16)
vs Trainer's bf16_full_eval=True, which does the same.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ratio, Report, header, interleave, median, print_absolute, set_torch_threads  # noqa: E402
from ml import (  # noqa: E402
    DECODING_LINES,
    Setup,
    add_model_arguments,
    check_device_dtype,
    hf_features,
    load_tokenizer,
    prepare,
    quiet_transformers,
    sync,
)

BENCH = "eval"


class Runner:
    def __init__(self, setup: Setup, args: argparse.Namespace, workdir: Path) -> None:
        from stl.jobs.ml.sources import read_examples

        self.setup, self.args, self.workdir = setup, args, workdir
        self.examples = {}
        for task in (setup.generation_task, setup.classification_task):
            found = [e for e in read_examples(str(setup.data), [task])][: args.examples]
            self.examples[task] = found
        self.predictions: dict[str, list[list[str]]] = {
            "stl-gen": [], "stl-gen-compiled": [], "hf-gen": [], "stl-rank": [], "hf-rank": []}
        self.values: dict[str, list[float]] = {name: [] for name in self.predictions}
        self.counter = 0
        self.cpu_rates: dict[str, list[float]] = {}
        # Seconds per round: generating, ROUGE-L after it, and (stl on a GPU) ROUGE-L while it decoded.
        self.parts: dict[str, list[tuple[float, float, float]]] = {}
        self.decoding: dict[str, list[str]] = {}  # stl's log lines on how it decoded, last round per arm
        # stl's own limits (jobs/ml/model_inputs.py evaluation_length_limits): BART's positions cap them, T5 has none.
        self.source_limit = args.source_len
        self.target_limit = args.max_new_tokens

    # --- stl ---

    def _stl(self, task: str, key: str, *, compile: bool = False) -> float:
        from stl.jobs.ml.evaluate import EvalRun, evaluate
        from stl.jobs.specs import EvalConfig, StageKind, StageSpec

        args = self.args
        spec = StageSpec(kind=StageKind.eval, model="tiny:bart", seed=args.seed, instructions=True,
                         data=str(self.setup.data), tasks=(task,),
                         eval=EvalConfig(max_examples=args.examples, batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, max_source_length=args.source_len,
                                         samples=min(args.examples, 100), compile=compile))
        marks: list[tuple[float, float]] = []
        decoding: list[str] = []
        self.decoding[key] = decoding

        def log(line: str) -> None:
            parts = re.fullmatch(rf"{re.escape(task)}: generated \d+ answers in ([\d.]+) s .*ROUGE-L in ([\d.]+) s"
                                 r"(?: after them and ([\d.]+) s while the GPU decoded)?", line)
            if parts:  # evaluate()'s own split of the time: decoding (scoring alongside on a GPU), then scoring
                self.parts.setdefault(key, []).append((float(parts[1]), float(parts[2]), float(parts[3] or 0.0)))
            elif line.startswith(DECODING_LINES):
                decoding.append(line)
            elif line.startswith("evaluating ") or line.startswith(f"{task}: "):
                sync(args.device)
                marks.append((time.perf_counter(), time.process_time()))

        # The compiled arm's rounds share inductor's cache, as a worker's stages do under STL_HOME/cache:
        # the warm-up round compiles cold, later rounds pay what a later eval stage pays.
        cache_dir = self.workdir / "stl-cache" if compile else None
        metrics = evaluate(EvalRun(spec=spec, model_dir=self.setup.model_dir, device=args.device,
                                   should_stop=lambda: None, log=log, cache_dir=cache_dir),
                           on_step=lambda _report: None)
        (result,) = metrics
        assert result.n == len(self.examples[task]), (result.n, len(self.examples[task]))
        self.predictions[key].append([sample["prediction"] for sample in result.samples])
        self.values[key].append(result.value)
        return self._rate(key, len(self.examples[task]), marks[0], marks[-1])

    def _rate(self, key: str, examples: int, start: tuple[float, float], end: tuple[float, float]) -> float:
        """Examples per wall second (returned) and per CPU second of this process (kept in cpu_rates)."""
        self.cpu_rates.setdefault(key, []).append(examples / (end[1] - start[1]))
        return examples / (end[0] - start[0])

    def stl_generation(self) -> float:
        return self._stl(self.setup.generation_task, "stl-gen")

    def stl_generation_compiled(self) -> float:
        return self._stl(self.setup.generation_task, "stl-gen-compiled", compile=True)

    def stl_rank(self) -> float:
        return self._stl(self.setup.classification_task, "stl-rank")

    # --- Hugging Face ---

    def _trainer(self, *, generate: bool, preprocess: Any = None) -> Any:
        import torch
        from transformers import (
            AutoModelForSeq2SeqLM,
            DataCollatorForSeq2Seq,
            DataCollatorWithPadding,
            Seq2SeqTrainer,
            Seq2SeqTrainingArguments,
        )
        from transformers.trainer_callback import PrinterCallback

        args = self.args
        tokenizer = load_tokenizer(self.setup.model_dir)
        torch.manual_seed(args.seed)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.setup.model_dir)
        self.counter += 1
        training_args = Seq2SeqTrainingArguments(
            output_dir=str(self.workdir / f"hf-{self.counter}"), report_to=[],
            per_device_eval_batch_size=args.batch_size, predict_with_generate=generate, dataloader_num_workers=0,
            disable_tqdm=True, use_cpu=args.device == "cpu", bf16_full_eval=args.dtype == "bf16", seed=args.seed,
        )
        # Without labels (generation) a plain padding collator; with labels the seq2seq one (decoder inputs).
        collator = (DataCollatorWithPadding(tokenizer) if generate
                    else DataCollatorForSeq2Seq(tokenizer, model=model, padding=True))
        trainer = Seq2SeqTrainer(model=model, args=training_args, data_collator=collator,
                                 preprocess_logits_for_metrics=preprocess)
        trainer.remove_callback(PrinterCallback)
        return trainer, tokenizer

    def hf_generation(self) -> float:
        import numpy as np

        from stl.jobs.ml.evaluate import _references, make_rouge_scorer, rouge_l
        from stl.jobs.ml.examples import source_text

        args = self.args
        examples = self.examples[self.setup.generation_task]
        trainer, tokenizer = self._trainer(generate=True)
        scorer = make_rouge_scorer()
        started = (time.perf_counter(), time.process_time())  # tokenizing counts on both sides
        features = hf_features(tokenizer, [source_text(e, True) for e in examples], None, self.source_limit,
                               self.target_limit)
        output = trainer.predict(features, max_new_tokens=args.max_new_tokens, num_beams=1,  # type: ignore[arg-type]
                                 do_sample=False)
        tokens = np.where(output.predictions < 0, tokenizer.pad_token_id, output.predictions)
        texts = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        generated = time.perf_counter()
        values = [rouge_l(text, _references(e), scorer) for text, e in zip(texts, examples, strict=True)]
        ended = (time.perf_counter(), time.process_time())
        self.parts.setdefault("hf-gen", []).append((generated - started[0], ended[0] - generated, 0.0))
        self.predictions["hf-gen"].append(texts[:100])
        self.values["hf-gen"].append(sum(values) / len(values))
        return self._rate("hf-gen", len(examples), started, ended)

    def hf_rank(self) -> float:
        import torch

        from stl.jobs.ml.examples import answer_candidates, normalize_answer, source_text

        examples = self.examples[self.setup.classification_task]
        candidates = [answer_candidates(e) for e in examples]
        owners = [i for i, options in enumerate(candidates) for _ in options]
        sources = [source_text(examples[i], True) for i in owners]
        options = [option for opts in candidates for option in opts]

        def log_likelihoods(logits: Any, labels: Any) -> Any:
            logits = logits[0] if isinstance(logits, tuple) else logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            known = labels != -100
            picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return (picked * known).sum(dim=-1)

        trainer, tokenizer = self._trainer(generate=False, preprocess=log_likelihoods)
        started = (time.perf_counter(), time.process_time())
        features = hf_features(tokenizer, sources, options, self.source_limit, self.target_limit)
        output = trainer.predict(features)  # type: ignore[arg-type]
        scores = [float(s) for s in output.predictions]
        best: dict[int, tuple[float, int]] = {}
        for position, (owner, score) in enumerate(zip(owners, scores, strict=True)):
            if owner not in best or score > best[owner][0]:
                best[owner] = (score, position)
        predictions = [options[best[i][1]] for i in range(len(examples))]
        correct = [normalize_answer(p) == normalize_answer(e.output)
                   for p, e in zip(predictions, examples, strict=True)]
        ended = (time.perf_counter(), time.process_time())
        self.predictions["hf-rank"].append(predictions[:100])
        self.values["hf-rank"].append(sum(correct) / len(correct))
        return self._rate("hf-rank", len(examples), started, ended)

    def split(self, key: str) -> str:
        """Where stl's generation time went in the last round, as evaluate() logged it."""
        if not self.parts.get(key):
            return ""
        generating, scoring, while_decoding = self.parts[key][-1]
        hf = f", HF's {self.parts['hf-gen'][-1][0]:.2f} s and {self.parts['hf-gen'][-1][1]:.2f} s" \
            if self.parts.get("hf-gen") else ""
        how = f"; stl's log: {' | '.join(self.decoding[key])}" if self.decoding.get(key) else ""
        alongside = f" ({while_decoding:.2f} s of it scoring earlier batches)" if while_decoding else ""
        return f"; generating, then ROUGE-L: stl's {generating:.2f} s{alongside} and {scoring:.2f} s{hf}{how}"

    def value(self, key: str) -> float:
        return median(self.values[key]) if self.values[key] else float("nan")

    def distinct(self, key: str) -> int:
        """Distinct predictions in the last round: agreement means little when every answer is the same."""
        return len(set(self.predictions[key][-1])) if self.predictions[key] else 0

    def agreement(self, a: str, b: str) -> float:
        if not self.predictions[a] or not self.predictions[b]:
            return float("nan")
        left, right = self.predictions[a][-1], self.predictions[b][-1]
        n = min(len(left), len(right))
        return sum(x == y for x, y in zip(left[:n], right[:n], strict=True)) / max(n, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--examples", type=int, default=64, help="examples per task (default 64; demo has 48)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--source-len", type=int, default=128, help="source tokens (default 128)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--only", choices=["generation", "rank"], help="run only one of the two comparisons")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="stl's generation arm with eval.compile off (default), on (a static KV cache "
                             "compiled into CUDA graphs; CUDA only, a CPU runs it eager), or both")
    parser.add_argument("--varied-lengths", action="store_true",
                        help="generation sources of a quarter of --source-len tokens to all of it, as real tasks "
                             "have (stl sorts them by length and, with CUDA graphs, pads to length buckets; "
                             "Trainer pads each batch to its longest), instead of all --source-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default 1 on CPU (steadier on a shared machine), "
                             "torch's default on CUDA; 0 = torch's default")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    check_device_dtype(args.device, args.dtype)
    set_torch_threads(args.threads if args.threads is not None else (1 if args.device == "cpu" else 0))
    quiet_transformers()

    header(f"bench_eval: stl evaluate vs Seq2SeqTrainer.predict ({args.size}, {args.device}, {args.dtype})",
           args.device)
    with tempfile.TemporaryDirectory(prefix="stl-bench-eval-") as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir, size=args.size, data=args.data, source_len=args.source_len,
                        target_len=args.max_new_tokens, rows_per_task=args.examples, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, varied_lengths=args.varied_lengths)
        runner = Runner(setup, args, workdir)
        print(f"model: {args.size} ({setup.parameters / 1e6:.1f} M parameters, random weights); data {args.data}; "
              f"{len(runner.examples[setup.generation_task])} generation + "
              f"{len(runner.examples[setup.classification_task])} classification examples, batch {args.batch_size}, "
              f"source {'up to ' if args.varied_lengths else ''}{args.source_len} tokens, "
              f"{args.max_new_tokens} new tokens; {args.rounds} interleaved rounds")
        fns: dict[str, Any] = {}
        if args.only in (None, "generation"):
            if args.compile in ("off", "both"):
                fns["stl generation"] = runner.stl_generation
            if args.compile in ("on", "both"):
                fns["stl generation, compiled"] = runner.stl_generation_compiled
            fns["HF predict_with_generate"] = runner.hf_generation
        if args.only in (None, "rank"):
            fns["stl rank classification"] = runner.stl_rank
            fns["HF predict, option pairs"] = runner.hf_rank
        # One discarded round first: the first calls in a process pay one-off costs (kernel set-up, caches).
        results = interleave(fns, rounds=args.rounds, warmup=1)
    data = f"{args.data}-varied" if args.varied_lengths else args.data
    tag = f"{BENCH}:{args.size}:{args.device}:{data}"
    what = f"({args.size}, {args.device}, {args.dtype}, data {data})"
    keys = {"stl generation": "stl-gen", "stl generation, compiled": "stl-gen-compiled",
            "HF predict_with_generate": "hf-gen",
            "stl rank classification": "stl-rank", "HF predict, option pairs": "hf-rank"}
    # The last `rounds` values: the discarded warm-up round's come first.
    cpu = {name: runner.cpu_rates[key][-args.rounds:] for name, key in keys.items() if key in runner.cpu_rates}
    comparisons = [
        ("generation", "stl generation", "HF predict_with_generate",
         "stl generation examples/s / Trainer.predict_with_generate examples/s",
         f"ROUGE-L: stl {runner.value('stl-gen'):.4f}, HF {runner.value('hf-gen'):.4f}; "
         f"identical predictions on {runner.agreement('stl-gen', 'hf-gen'):.0%} of the compared examples "
         f"({runner.distinct('stl-gen')} distinct){runner.split('stl-gen')}"),
        ("generation-compiled", "stl generation, compiled", "HF predict_with_generate",
         "stl generation (eval.compile) examples/s / Trainer.predict_with_generate examples/s",
         f"ROUGE-L: stl compiled {runner.value('stl-gen-compiled'):.4f}, HF {runner.value('hf-gen'):.4f}; "
         f"identical predictions on {runner.agreement('stl-gen-compiled', 'hf-gen'):.0%} of the compared "
         f"examples ({runner.distinct('stl-gen-compiled')} distinct){runner.split('stl-gen-compiled')}"),
        ("rank", "stl rank classification", "HF predict, option pairs",
         "stl rank classification examples/s / Trainer.predict over option pairs examples/s",
         f"accuracy: stl {runner.value('stl-rank'):.4f}, HF {runner.value('hf-rank'):.4f}; "
         f"same choice on {runner.agreement('stl-rank', 'hf-rank'):.0%} of the compared examples"),
    ]
    for part, a, b, label, note in comparisons:
        if a not in results:
            continue
        if args.device == "cpu":
            # Headline on a CPU: examples per CPU-second of the single-threaded process (robust to other load).
            Report(f"{part}, examples per CPU-second {what} [headline on CPU]", {k: cpu[k] for k in (a, b)},
                   unit="examples/cpu-s", higher_is_better=True, bench=f"{tag}:{part}:cpu-time",
                   ratios=[Ratio(a, b, label)]).print()
        Report(f"{part}, examples per wall-second {what}", {k: results[k] for k in (a, b)}, unit="examples/s",
               higher_is_better=True, bench=f"{tag}:{part}:wall", ratios=[Ratio(a, b, label)],
               notes=[note + " (last round)"]).print()
        print_absolute(f"{tag}:{part}", f"{a} examples/s (wall)", median(results[a]), "examples/s")


if __name__ == "__main__":
    main()
