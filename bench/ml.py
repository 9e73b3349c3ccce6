"""Models, tokenizers and data for the ML benchmarks (train, eval, gap). Offline: random weights from config.

Sizes (random weights, built from a transformers config; no download):
  tiny       stl's own tiny:bart (d_model 64, 2+2 layers) - what the tests and the demo use
  small      BART, d_model 256, 4+4 layers, 4 heads, FFN 1024 (the CPU default)
  bart-base  BART, d_model 768, 6+6 layers, 12 heads, FFN 3072, vocabulary 50,265
  t5-small   T5, d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocabulary 32,128
Data:
  synthetic  word-level tokens ("w123 w4567 ...") with a tokenizer of the size's vocabulary; every source
             is exactly --source-len tokens and every target --target-len tokens, so both sides of a
             comparison do identical work (the target copies the start of the source: a learnable task)
  demo       stl's demo dataset (grids/demo-data) with ByT5's byte tokenizer (variable lengths)
A model directory is written with stl's own `stl.jobs.ml.models.save_model`, so stl loads it as a parent
stage's model (`init_from`) and Hugging Face loads the identical weights with `from_pretrained`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common import DEMO_DATA

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from pathlib import Path

SIZES = ("tiny", "small", "bart-base", "t5-small")
VOCAB = {"tiny": 8192, "small": 8192, "bart-base": 50265, "t5-small": 32128}
PAD, EOS, UNK = 0, 1, 2
SYNTHETIC_TASKS = ("copy_a", "copy_b")
GENERATION_TASK = "copy_a"
CLASSIFICATION_TASK = "choose"
DEMO_TRAIN = ("sentiment_classification", "intent_classification", "act_classification",
              "response_generation", "question_generation", "answer_generation")
DEMO_GENERATION = "summarization"
DEMO_CLASSIFICATION = "emotion_classification"


@dataclass(frozen=True)
class Setup:
    model_dir: Path
    data: Path
    train_tasks: tuple[str, ...]
    generation_task: str
    classification_task: str
    size: str
    data_kind: str
    parameters: int


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every model benchmark shares: where it runs, how big, in what precision, on what data."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", default="small", choices=SIZES, help="model size (default small)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                        help="fp32 (CPU) or bf16 (GPU); default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "demo"], help="default synthetic")


# The eval stage's log lines on how it decoded (jobs/ml/generation.py): its own loop or `generate`, and under
# eval.compile whether CUDA graphs replayed or the compiled step failed.
DECODING_LINES = ("generation decodes greedily", "generation runs transformers'", "CUDA graphs in use: each decoded",
                  "the decoding step for", "the compiled decoding step failed",
                  "recording the decoding step as a CUDA graph failed")


def stl_decoder(model: Any, max_new_tokens: int, *, compiled: bool, cuda_graphs: bool = False) -> Any:
    """stl's decoding loop (jobs/ml/decoding.py) for `model`: its step compiled as `eval.compile` compiles it,
    or recorded as a CUDA graph as an eval stage on a GPU records it, or eager."""
    from stl.jobs.ml.decoding import DecodingStep, GreedyDecoder, greedy_rules

    rules = greedy_rules(model, max_new_tokens=max_new_tokens, pad_id=PAD)
    if isinstance(rules, str):
        raise SystemExit(f"stl's loop can't decode this model: {rules}")
    if compiled:
        from stl.jobs.ml.acceleration import prepare_compile

        prepare_compile(None, shapes=2)
    step = DecodingStep.COMPILED if compiled else DecodingStep.RECORDED if cuda_graphs else DecodingStep.EAGER
    return GreedyDecoder(model, rules, step=step, compile_options={"mode": "reduce-overhead"})


def quiet_transformers() -> None:
    """No progress bars ("Loading weights", "Writing model shards") in benchmark output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def word_tokenizer(vocab: int) -> Any:
    """A fast word-level tokenizer over the words w3..w{vocab-1} (pad 0, eos 1, unk 2); appends EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def model_config(size: str, vocab: int) -> Any:
    from transformers import BartConfig, T5Config

    if size == "t5-small":
        config = T5Config(vocab_size=vocab, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                          num_heads=8, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
        config.decoder_start_token_id = PAD
        return config
    width, layers, heads, ffn = {"tiny": (64, 2, 4, 256), "small": (256, 4, 4, 1024),
                                 "bart-base": (768, 6, 12, 3072)}[size]
    return BartConfig(vocab_size=vocab, d_model=width, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                      decoder_ffn_dim=ffn, max_position_embeddings=1024, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=None, decoder_start_token_id=PAD, forced_eos_token_id=None,
                      forced_bos_token_id=None)


def _words(rng: random.Random, n: int, vocab: int) -> list[str]:
    return [f"w{rng.randrange(3, vocab)}" for _ in range(n)]


def _row(task: str, text: str, output: str) -> dict[str, Any]:
    return {"task": task, "prompt": text, "input": text, "output": output, "all_outputs": [output]}


def write_synthetic(path: Path, *, rows_per_task: int, source_len: int, target_len: int, vocab: int,
                    seed: int = 0, options: int = 3, option_len: int = 4, varied_lengths: bool = False) -> Path:
    """JSONL in stl's format: copy tasks (target = the first target_len-1 words of the source) and one
    rank-classification task listing `options` options of `option_len` words after [OPTIONS].
    `varied_lengths`: the copy tasks' sources are from a quarter of `source_len` tokens to all of it, as a
    real task's are, instead of all `source_len`."""
    rng = random.Random(seed)
    lines = []
    shortest = max(target_len, source_len // 4)
    for task in SYNTHETIC_TASKS:
        for _ in range(rows_per_task):
            length = rng.randint(shortest, source_len) if varied_lengths else source_len
            words = _words(rng, length - 1, vocab)  # + EOS = `length` tokens
            lines.append(_row(task, " ".join(words), " ".join(words[: target_len - 1])))
    for _ in range(rows_per_task):
        # The source (incl. "[OPTIONS] ..." and EOS) is cut to source_len tokens by both sides alike.
        words = _words(rng, source_len - 1, vocab)
        choices = [" ".join(_words(rng, option_len, vocab)) for _ in range(options)]
        text = " ".join(words) + " [OPTIONS] " + " |||| ".join(choices)
        lines.append(_row(CLASSIFICATION_TASK, text, rng.choice(choices)))
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def prepare(directory: Path, *, size: str, data: str, source_len: int, target_len: int, rows_per_task: int,
            seed: int = 0, full_generation: bool = True, max_new_tokens: int | None = None,
            varied_lengths: bool = False) -> Setup:
    """Write the model directory (random weights) and the data; return where they are."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from stl.jobs.ml.models import byte_tokenizer, save_model

    quiet_transformers()
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; use one of {', '.join(SIZES)}")
    directory.mkdir(parents=True, exist_ok=True)
    if data == "synthetic":
        vocab = VOCAB[size]
        tokenizer = word_tokenizer(vocab)
        path = write_synthetic(directory / "synthetic.jsonl", rows_per_task=rows_per_task, source_len=source_len,
                               target_len=target_len, vocab=vocab, seed=seed, varied_lengths=varied_lengths)
        train_tasks, gen_task, cls_task = SYNTHETIC_TASKS, GENERATION_TASK, CLASSIFICATION_TASK
    elif data == "demo":
        tokenizer = byte_tokenizer()
        vocab = len(tokenizer)
        path = DEMO_DATA
        train_tasks, gen_task, cls_task = DEMO_TRAIN, DEMO_GENERATION, DEMO_CLASSIFICATION
    else:
        raise SystemExit(f"unknown data {data!r}; use synthetic or demo")
    torch.manual_seed(seed)
    config = model_config(size, vocab)
    config.stl_base_model = f"bench:{size}"
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.config.name_or_path = f"bench:{size}"
    use_bench_token_ids(model)
    if full_generation and max_new_tokens:
        # Both sides then decode exactly max_new_tokens per example: equal, deterministic work.
        model.generation_config.min_new_tokens = max_new_tokens
    model_dir = directory / f"model-{size}"
    save_model(model, tokenizer, model_dir)
    return Setup(model_dir=model_dir, data=path, train_tasks=tuple(train_tasks), generation_task=gen_task,
                 classification_task=cls_task, size=size, data_kind=data,
                 parameters=sum(p.numel() for p in model.parameters()))


def use_bench_token_ids(model: Any) -> None:
    """Generate with the benchmarks' special ids: pad (also the decoder start) and EOS."""
    generation = model.generation_config
    generation.pad_token_id, generation.eos_token_id, generation.decoder_start_token_id = PAD, EOS, PAD


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def hf_features(tokenizer: Any, sources: Sequence[str], targets: Sequence[str] | None, source_limit: int,
                target_limit: int) -> list[dict[str, list[int]]]:
    """Token ids exactly as stl makes them (stl.jobs.ml.models.encode_sources/encode_targets), as HF features."""
    from stl.jobs.ml.models import encode_sources, encode_targets

    ids = encode_sources(tokenizer, list(sources), source_limit, seq2seq=True)
    rows: list[dict[str, list[int]]] = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in ids]
    if targets is not None:
        labels = encode_targets(tokenizer, list(targets), target_limit, seq2seq=True)
        for row, label in zip(rows, labels, strict=True):
            row["labels"] = label
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def check_device_dtype(device: str, dtype: str) -> None:
    """stl picks its precision itself: fp32 on CPU; on a CUDA GPU with native bf16, bf16 autocast for training
    and bf16 weights for evaluation."""
    if device == "cpu" and dtype != "fp32":
        raise SystemExit("on CPU stl trains and evaluates in fp32 (no autocast); use --dtype fp32")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU")
        if dtype != "bf16" and torch.cuda.is_bf16_supported():
            raise SystemExit("on this GPU stl always trains and evaluates in bf16; "
                             "use --dtype bf16 for a like-for-like run")
