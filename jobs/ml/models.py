"""Building, loading and saving models and tokenizers, and turning text into token ids for them.

Names: `tiny:bart`, `tiny:t5`, `tiny:gpt2` build a small randomly initialised model offline with a byte
tokenizer (for tests and demos); anything else is a Hugging Face hub id or a local directory.
No torch/transformers import at module level: the CLI imports `check_model_name` and must stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stl.jobs.durable import MIN_NEED_BYTES, fsync_directory, fsync_tree, remove, saving
from stl.jobs.errors import ModelError, missing_on_worker
from stl.jobs.ml.hub import model_load_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from contextlib import AbstractContextManager

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_PREFIX = "tiny:"
TINY_ARCHS = ("bart", "t5", "gpt2")
STL_MODEL_FILE = "stl_model.json"
MAX_NAME_LENGTH = 300
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")  # how a grid writes a model that is a local folder
# A hub id ("facebook/bart-base", "gpt2"); local paths are recognised separately.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
HUB_NAME_MAX = 96  # the hub's own rules, besides the pattern: see hub_id_problem
# The tiny models' width: big enough to learn keyword rules, small enough for CPU tests.
TINY_WIDTH = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_MAX_POSITIONS = 2048
# BART's default init (std 0.02, chosen for a width of 768 and more) leaves a model this narrow ignoring its
# encoder: after 1000 steps it still gives one answer to every input. width ** -0.5, as T5 scales its own
# init, lets it learn a keyword rule in about a hundred steps.
TINY_BART_INIT_STD = TINY_WIDTH**-0.5


def is_local_path(name: str) -> bool:
    """Whether a model name is written as a path (a bare name that exists locally counts as one elsewhere)."""
    return name.startswith(LOCAL_PATH_PREFIXES)


def local_model_problem(path: Path) -> str | None:
    """Why the folder at `path` cannot be a model, or None. Looked at before a run is queued."""
    if not path.exists():
        return f"model folder not found: {path}; paths are relative to the grid file"
    if not path.is_dir():
        return f"{path} is a file; point it at a model folder (one written by save_pretrained, with config.json)"
    if not (path / "config.json").is_file():
        return f"{path} holds no config.json; point it at a model folder written by save_pretrained"
    return None


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for a path, a folder that cannot be read, ~nosuchuser
        return False


def check_model_name(name: str) -> str | None:
    """An error message if `name` cannot name a model, else None. Never touches the network."""
    if not name or not name.strip():
        return "model name is empty"
    if name != name.strip() or any(ch.isspace() or not ch.isprintable() for ch in name):
        return f"model name {name!r} contains whitespace or control characters"
    if len(name) > MAX_NAME_LENGTH:
        return f"model name is {len(name)} characters long; at most {MAX_NAME_LENGTH}"
    if name.startswith(TINY_PREFIX):
        arch = name[len(TINY_PREFIX) :]
        if arch not in TINY_ARCHS:
            return f"unknown tiny model {name!r}; use one of " + ", ".join(TINY_PREFIX + a for a in TINY_ARCHS)
        return None
    if is_local_path(name) or _exists(name):
        return None
    if HUB_ID_PATTERN.match(name):
        return hub_id_problem(name)
    return f"model name {name!r} is neither a hub id (owner/name), a local path, nor tiny:<arch>"


def hub_id_problem(name: str) -> str | None:
    """Why an owner/name the pattern allows is still no hub id (the hub refuses it before any lookup), or None."""
    why = None
    if "--" in name or ".." in name:
        why = "it holds '--' or '..'"
    elif any(part.endswith(("-", ".")) for part in name.split("/")):
        why = "a part of it ends with '-' or '.'"
    elif name.endswith(".git"):
        why = "it ends with '.git'"
    elif len(name.rsplit("/", 1)[-1]) > HUB_NAME_MAX:
        why = f"its name is longer than {HUB_NAME_MAX} characters"
    return f"model name {name!r} is not a valid hub id: {why}" if why else None


def is_seq2seq(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings allow (None: relative positions, no limit)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def bf16_autocast_supported(device: torch.device) -> bool:
    """True on a CUDA device with native bf16 (Ampere and later); emulated bf16 (T4, V100) is slower than fp32."""
    import torch

    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation and never counted emulation
        return bool(torch.cuda.is_bf16_supported())


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of bf16 autocast contexts where the device computes bf16 natively, else of no-op contexts."""
    import torch

    if bf16_autocast_supported(device):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def base_model_name(model: PreTrainedModel) -> str:
    """The name the model was first built from, kept across save/load."""
    return str(getattr(model.config, "stl_base_model", None) or model.config.name_or_path)


def load_model_and_tokenizer(
    name: str,
    *,
    device: str,
    seed: int,
    init_from: Path | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (on `device`, in train mode off) and its tokenizer.

    `init_from` is a directory written by `save_model` (a parent stage's model); its weights replace
    the base model's. The seed is set before anything is built so random initialisation is reproducible.
    """
    import torch

    torch.manual_seed(seed)
    if init_from is not None:
        model, tokenizer = _load_saved(init_from, device=device, dtype=dtype)
    elif name.startswith(TINY_PREFIX):
        model, tokenizer = _build_tiny(name, device=device, dtype=dtype)
    else:
        model, tokenizer = _load_pretrained(name, device=device, dtype=dtype)
        model.config.stl_base_model = name
    _make_pad_token_coherent(model, tokenizer)
    model.eval()
    return model, tokenizer


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """ByT5's byte-level tokenizer: needs no files (pad 0, eos 1, unk 2, 384 ids).

    Built afresh each call: it costs microseconds, and callers may change its settings.
    """
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def _build_tiny(name: str, *, device: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, Any]:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        BartConfig,
        GPT2Config,
        T5Config,
    )

    message = check_model_name(name)
    if message:
        raise ModelError(message)
    arch = name[len(TINY_PREFIX) :]
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config: Any
    if arch == "bart":
        config = BartConfig(
            vocab_size=vocab,
            d_model=TINY_WIDTH,
            encoder_layers=TINY_LAYERS,
            decoder_layers=TINY_LAYERS,
            encoder_attention_heads=TINY_HEADS,
            decoder_attention_heads=TINY_HEADS,
            encoder_ffn_dim=TINY_WIDTH * 4,
            decoder_ffn_dim=TINY_WIDTH * 4,
            init_std=TINY_BART_INIT_STD,
            max_position_embeddings=TINY_MAX_POSITIONS,
            pad_token_id=pad,
            eos_token_id=eos,
            bos_token_id=None,  # byte tokenizer has no BOS; decoding starts from pad, as in T5
            decoder_start_token_id=pad,
            forced_eos_token_id=None,
        )
    elif arch == "t5":
        config = T5Config(
            vocab_size=vocab,
            d_model=TINY_WIDTH,
            d_kv=TINY_WIDTH // TINY_HEADS,
            d_ff=TINY_WIDTH * 4,
            num_layers=TINY_LAYERS,
            num_decoder_layers=TINY_LAYERS,
            num_heads=TINY_HEADS,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        config.decoder_start_token_id = pad
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=TINY_MAX_POSITIONS,
            n_embd=TINY_WIDTH,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    config.stl_base_model = name
    factory = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    # Built on the CPU and then moved, so a seed gives the same weights on every device (CPU and CUDA
    # generators differ); tiny models take milliseconds to copy.
    model = factory.from_config(config)
    model.config.name_or_path = name
    model.to(device=device, dtype=dtype)
    return model, tokenizer


def _load_pretrained(
    name_or_path: str | Path, *, device: str, dtype: torch.dtype | None
) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if isinstance(name_or_path, str) and is_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ModelError(missing_on_worker("model folder", Path(name_or_path)))
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        factory = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        # Loaded into host memory, then moved (below): `device_map` would skip that copy but needs
        # `accelerate`, one more dependency for a second or two on the small models stl trains.
        model = factory.from_pretrained(name_or_path, config=config, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as e:  # hub/network/format errors come in many types; all mean "cannot load"
        hub_id = isinstance(name_or_path, str) and not is_local_path(name_or_path) and not _exists(name_or_path)
        raise model_load_error(str(name_or_path), e, hub_id=hub_id) from e
    # Outside the try: a full GPU is not a wrong id or path. (transformers' wrapper of `to` confuses mypy.)
    model.to(device)  # type: ignore[call-arg, arg-type]
    return model, tokenizer


def _load_saved(directory: Path, *, device: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, Any]:
    if not (directory / STL_MODEL_FILE).is_file():
        raise ModelError(f"{directory} holds no model saved by stl (no {STL_MODEL_FILE}); rerun its stage")
    return _load_pretrained(directory, device=device, dtype=dtype)


def _make_pad_token_coherent(model: PreTrainedModel, tokenizer: Any) -> None:
    # Causal LMs such as gpt2 ship without a pad token; padding positions are masked out anyway.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        if generation.pad_token_id is None:
            generation.pad_token_id = model.config.pad_token_id
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id
        if is_seq2seq(model) and generation.decoder_start_token_id is None:
            generation.decoder_start_token_id = model.config.decoder_start_token_id


def save_model(model: PreTrainedModel, tokenizer: Any, directory: Path, *,
               before_replace: Callable[[], None] | None = None) -> None:
    """Write weights (safetensors), config, tokenizer files and stl_model.json; replaces `directory`.

    Written aside and fsync'd before it replaces `directory`; a failed save leaves nothing aside, and one
    that a full or read-only disk explains raises the disk's error (stl.jobs.durable.saving). `before_replace`
    runs just before that, and may refuse it by raising (a stale work horse: stl.jobs.queue.fence)."""
    temporary = directory.with_name(f".{directory.name}.tmp")
    remove(temporary)
    needed = sum(p.numel() * p.element_size() for p in model.parameters()) + MIN_NEED_BYTES
    with saving(directory, temporary, needed=needed):
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        info = {
            "base_model": base_model_name(model),
            "model_type": model.config.model_type,
            "seq2seq": is_seq2seq(model),
        }
        (temporary / STL_MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(temporary)
        replace_directory(temporary, directory, before_replace=before_replace)


def replace_directory(source: Path, target: Path, *, before_replace: Callable[[], None] | None = None) -> None:
    """Move `source` to `target`, replacing it. A crash leaves either the old or the new one in place:
    at worst `target` is missing and `<target>.old` holds the previous version.
    `before_replace` may refuse the move by raising (a stale work horse: queue/fence.py); `source` is then deleted.
    """
    if before_replace is not None:
        try:
            before_replace()
        except BaseException:
            shutil.rmtree(source, ignore_errors=True)
            raise
    previous = target.with_name(f"{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(source, target)
    fsync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


# --- text to token ids ----------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how `tokenizer` maps text to ids, for keying cached token ids.

    The path it was loaded from is left out on purpose: a parent stage's saved copy of a base model's
    tokenizer encodes text exactly as the original, so its stages share cached ids.
    """
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    description = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "size": len(tokenizer),
        # Library upgrades may change tokenization; they only cost one cache miss.
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    digest.update(json.dumps(description, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its JSON holds vocab, merges, normalizer and post-processor
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        sentencepiece = getattr(tokenizer, "sp_model", None)
        if sentencepiece is not None and hasattr(sentencepiece, "serialized_model_proto"):
            digest.update(sentencepiece.serialized_model_proto())
    return digest.hexdigest()


def _keep_head_and_tail(ids: list[int], max_length: int) -> list[int]:
    # InstructDial puts the instruction first and the question/options last; dropping the middle of the
    # dialogue context loses least when a source is too long.
    if len(ids) <= max_length:
        return ids
    head = max_length // 4
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def encode_sources(tokenizer: Any, texts: Sequence[str], max_length: int, *, seq2seq: bool) -> list[list[int]]:
    """Encoder inputs (seq2seq, with the tokenizer's special tokens) or causal-LM prompts ending in EOS,
    which separates the prompt from the answer. At most `max_length` ids, cut in the middle."""
    if seq2seq:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [_keep_head_and_tail(list(ids), max_length) for ids in encoded]
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    separator = tokenizer.eos_token_id
    return [_keep_head_and_tail(list(ids), max(max_length - 1, 1)) + [separator] for ids in encoded]


def encode_targets(tokenizer: Any, texts: Sequence[str], max_length: int, *, seq2seq: bool) -> list[list[int]]:
    """Target ids ending in EOS, at most `max_length` (cut at the end, EOS kept)."""
    eos = tokenizer.eos_token_id
    if seq2seq:
        encoded = tokenizer(text_target=list(texts), add_special_tokens=True)["input_ids"]
    else:
        encoded = [list(ids) + [eos] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    targets = []
    for ids in encoded:
        ids = list(ids)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos]
        targets.append(ids)
    return targets


def pad_sequences(
    sequences: Iterable[Sequence[int]], pad_value: int, *, left: bool = False, width: int | None = None
) -> torch.Tensor:
    """Rows padded to the longest one, or to `width` (a fixed length bucket) when given."""
    import numpy as np
    import torch

    rows = [row if isinstance(row, list) else list(row) for row in sequences]
    longest = max(len(row) for row in rows)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"cannot pad rows of length {longest} to width {width}")
    # Filled row by row in numpy: about 3x faster than torch.tensor over nested lists, and this runs for
    # every training batch (on an MTL stage's prefetch thread, holding the GIL the step's thread also wants).
    padded = np.full((len(rows), width), pad_value, dtype=np.int64)
    for index, row in enumerate(rows):
        if left:
            padded[index, width - len(row) :] = row
        else:
            padded[index, : len(row)] = row
    try:
        return torch.from_numpy(padded)
    except RuntimeError:  # torch < 2.3 built against NumPy 1 has no bridge to NumPy 2 ("Numpy is not available")
        return torch.tensor(padded.tolist(), dtype=torch.long)
