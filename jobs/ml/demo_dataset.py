"""stl's own demo dataset: a small synthetic InstructDial-format JSONL file that trains in minutes on a CPU."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from stl.jobs.errors import UsageError, path_error
from stl.jobs.ml.data import seeded
from stl.jobs.ml.examples import OPTION_SEPARATOR

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping, Sequence
    from pathlib import Path

DEMO_DATASET = "stl-demo"
DEMO_FILE = "demo_text2text.jsonl"
DEMO_TRAIN_TASKS = (
    "sentiment_classification",
    "intent_classification",
    "act_classification",
    "response_generation",
    "question_generation",
    "answer_generation",
)
DEMO_EVAL_TASKS = ("emotion_classification", "summarization")
DEMO_ROWS_PER_TASK = 48

_NAMES = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo", "iris", "jonas")
_CITIES = ("paris", "lima", "oslo", "tokyo", "cairo", "rome", "delhi", "quito")
_FOODS = ("pizza", "sushi", "tacos", "curry", "pasta", "salad")
_TIMES = ("7 am", "9 am", "noon", "3 pm", "5 pm", "8 pm")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")

# What in-domain MTL can transfer (`make demo` shows it). The held-out emotion task is labelled by the cues that
# label the sentiment training task ({m}: words and the stop after them), with the same labels, in other sentences
# and asked another way; a model that never saw sentiment has nothing to prefer one label by. The held-out summary
# names the speaker and the request's slot, as the response training task's reply does.
_CUES = {
    "positive": ("yay !", "i love it !", "so happy !"),
    "negative": ("ugh .", "i hate it .", "so sad ."),
}
_SENTIMENT_LINES = dict.fromkeys(_CUES, ("{m} the {x} in {c}", "{m} {c} on {d}", "{m} dinner with {n}",
                                         "{m} at {t} with {n}"))
_SENTIMENT_WORDINGS = (
    ("Classify the sentiment.", "Sentiment?"),
    ("Is the turn positive or negative?", "Tone?"),
    ("Tell the mood of the turn.", "Mood?"),
    ("How does the speaker sound?", "Positive or negative?"),
)
_EMOTION_LINES = dict.fromkeys(_CUES, ("{m} the show at {t}", "{m} {n} called"))
_INTENTS = {
    "flight": ("book a flight to {c} .", "i need a plane to {c} ."),
    "weather": ("is it sunny in {c} ?", "will it rain in {c} ?"),
    "food": ("i want {x} .", "can i order {x} ?"),
    "alarm": ("wake me at {t} .", "set an alarm for {t} ."),
}
_ACTS = {
    "greeting": ("hello {n} !", "hi {n} , good morning !"),
    "question": ("do you like {x} ?", "when do we leave ?"),
    "thanks": ("thank you for the {x} .", "thanks {n} ."),
    "inform": ("the train leaves at {t} .", "the shop opens on {d} ."),
}
_REPLIES = {
    "flight": "ok {n} , flight to {c} booked .",
    "weather": "{n} , it is sunny in {c} .",
    "food": "ok {n} , {x} is coming .",
    "alarm": "ok {n} , alarm at {t} .",
}
_SUMMARIES = {
    "flight": "{n} wants a flight to {c} .",
    "weather": "{n} asks if it is sunny in {c} .",
    "food": "{n} wants {x} .",
    "alarm": "{n} wants an alarm at {t} .",
}
_FACTS = (
    ("the train leaves at {t} .", "when does the train leave ?", "{t}"),
    ("{n} flies to {c} .", "where does {n} fly ?", "{c}"),
    ("{n} ordered {x} .", "what did {n} order ?", "{x}"),
    ("the party is on {d} .", "when is the party ?", "{d}"),
)


def _row(task: str, instruction: str, text: str, output: str, labels: Sequence[str] = ()) -> dict[str, Any]:
    if labels:
        text = f"{text} [OPTIONS] {OPTION_SEPARATOR.join(labels)}"
    return {
        "prompt": f"Instruction: {instruction}\nInput: {text}",
        "input": text,
        "output": output,
        "all_outputs": [output],
        "task": task,
        "dataset": DEMO_DATASET,
        "candidates": list(labels),
        "classes_in_options": list(labels),
    }


def _slots(rng: random.Random, cues: Sequence[str] = ("",)) -> dict[str, str]:
    return {
        "n": rng.choice(_NAMES),
        "c": rng.choice(_CITIES),
        "x": rng.choice(_FOODS),
        "t": rng.choice(_TIMES),
        "d": rng.choice(_DAYS),
        "m": rng.choice(cues),
    }


def _classification_rows(
    task: str, wordings: Sequence[tuple[str, str]], lines: Mapping[str, Sequence[str]], rng: random.Random
) -> list[dict[str, Any]]:
    """Balanced labels; each row asks in one of `wordings` (instruction, question), as InstructDial words a task
    in several ways."""
    labels = sorted(lines)
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        label = labels[i % len(labels)]
        said = rng.choice(lines[label]).format(**_slots(rng, _CUES.get(label, ("",))))
        instruction, question = rng.choice(wordings)
        rows.append(_row(task, instruction, f"[CONTEXT] {said} [QUESTION] {question}", label, labels))
    return rows


def _request_rows(
    task: str, instruction: str, question: str, outputs: Mapping[str, str], rng: random.Random
) -> list[dict[str, Any]]:
    """Someone asks for something; the output names them and the request's slot (a reply or a summary)."""
    intents = sorted(outputs)
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        intent = intents[i % len(intents)]
        slots = _slots(rng)
        request = rng.choice(_INTENTS[intent]).format(**slots)
        text = f"[CONTEXT] {slots['n']} : {request} [QUESTION] {question}"
        rows.append(_row(task, instruction, text, outputs[intent].format(**slots)))
    return rows


def _fact_rows(task: str, instruction: str, rng: random.Random, *, answer: bool) -> list[dict[str, Any]]:
    """A fact in the dialogue: write the question it answers, or answer its question."""
    rows = []
    for i in range(DEMO_ROWS_PER_TASK):
        fact, question, reply = _FACTS[(i + int(answer)) % len(_FACTS)]
        slots = _slots(rng)
        asked = question.format(**slots)
        text = f"[CONTEXT] {fact.format(**slots)} [QUESTION] {asked if answer else 'Ask about it.'}"
        rows.append(_row(task, instruction, text, (reply if answer else question).format(**slots)))
    return rows


def _demo_rows() -> list[dict[str, Any]]:
    rng = seeded("demo-dataset", 1)
    tasks = [
        _classification_rows("sentiment_classification", _SENTIMENT_WORDINGS, _SENTIMENT_LINES, rng),
        _classification_rows("emotion_classification", [("Say how the speaker feels.", "Feeling?")],
                             _EMOTION_LINES, rng),
        _classification_rows("intent_classification", [("Find the intent.", "Intent?")], _INTENTS, rng),
        _classification_rows("act_classification", [("Find the dialogue act.", "Act?")], _ACTS, rng),
        _request_rows("response_generation", "Reply to the user.", "Reply.", _REPLIES, rng),
        _fact_rows("question_generation", "Ask what the last turn answers.", rng, answer=False),
        _fact_rows("answer_generation", "Answer in a few words.", rng, answer=True),
        _request_rows("summarization", "Summarize the dialogue.", "Summary?", _SUMMARIES, rng),
    ]
    # One row of each task in turn: each task keeps its order, so its first rows (the ones evaluated) hold every
    # label equally often, and an answer that ignores the input scores exactly chance.
    return [row for rows in zip(*tasks, strict=True) for row in rows]

_DEMO_README = """# stl demo dataset (synthetic)

Synthetic dialogue data generated by stl (`jobs/ml/data.py: write_demo_dataset`) from templates, so the
pipeline can be exercised with no downloads. It is NOT InstructDial and says nothing about the
paper's results.

Same JSONL format and field names as InstructDial's text2text files (prompt, input, output, all_outputs,
task, dataset, candidates, classes_in_options); classification inputs list their options inline as
`[OPTIONS] a||||b`. Labels follow cue words in the dialogue, so tiny models can learn them, and the held-out
tasks share what the training tasks teach: emotion has sentiment's cues and labels in other sentences, and a
summary names the speaker and the request's slot as a response does.

Tasks for multi-task training: {train}
Held-out tasks for zero-shot / few-shot evaluation: {held_out}
"""


def write_demo_dataset(directory: Path) -> Path:
    """Write the demo JSONL (byte-identical every time) and its README; return the JSONL path."""
    path = directory / DEMO_FILE
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in _demo_rows()]
    readme = _DEMO_README.format(train=", ".join(DEMO_TRAIN_TASKS), held_out=", ".join(DEMO_EVAL_TASKS))
    # Never over someone's own files (`stl data demo .` in a project): only over an earlier demo set.
    marks = {path: f'"dataset": "{DEMO_DATASET}"'.encode(), directory / "README.md": _DEMO_README[:30].encode()}
    for target, mark in marks.items():
        try:
            head = target.read_bytes()[:4096] if target.is_file() else None
        except OSError:
            head = b""
        if head is not None and mark not in head:
            raise UsageError(f"{target} exists and is not stl's demo data; write the demo dataset into another "
                             "folder (e.g. a new one: stl data demo demo-data)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, "".join(line + "\n" for line in lines))
        _write_atomically(directory / "README.md", readme)
    except OSError as e:
        raise path_error("write the demo dataset into", directory, e) from e
    return path


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: a full disk leaves the old file, not a torn one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8", newline="\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
