"""One InstructDial example and how its answers are scored: options, accepted answers, correctness.

Cheap to import (no torch, no datasets): the CLI checks grids with `task_family`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stl.jobs.errors import DataError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

REQUIRED_FIELDS = ("task", "prompt", "input", "output")

# `[OPTIONS] a||||b||||c` runs until the next `[TAG]` (usually `[QUESTION]`) or the end of the input.
OPTIONS_PATTERN = re.compile(r"\[OPTIONS\](.*?)(?=\[[A-Z_]+\]|$)", re.DOTALL)
OPTION_SEPARATOR = "||||"
# InstructDial labels some tasks' options (utils/common.py): "A: first" (get_alphabetwithoptions_string, gold
# "A") and "0: first" (get_integerwithoptions_string, gold "0"); other sources write "(a) first" or "A. first".
OPTION_LABEL_PATTERN = re.compile(
    r"^\s*(?:\(\s*(?P<paren>[A-Za-z]|\d{1,2})\s*\)|(?P<plain>[A-Za-z]|\d{1,2})\s*[:.)])\s*(?P<body>.*)$", re.DOTALL
)
# A gold output that is a bare label, maybe written with its punctuation: "A", "(a)", "2:", "B.".
BARE_LABEL_PATTERN = re.compile(r"^\(?\s*([A-Za-z]|\d{1,2})\s*[).:]?$")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # "Instruction: ...\nInput: ..." (instructions on)
    input: str  # the same example without the instruction (instructions off)
    output: str
    all_outputs: tuple[str, ...]  # every accepted target; never empty
    options: tuple[str, ...] | None  # parsed from "[OPTIONS]" in the input; None for generation


def parse_options(text: str) -> tuple[str, ...] | None:
    """The options listed inline after `[OPTIONS]`, stripped, empty ones dropped; None if there are none."""
    match = OPTIONS_PATTERN.search(text)
    if match is None:
        return None
    options = tuple(option.strip() for option in match.group(1).split(OPTION_SEPARATOR))
    options = tuple(option for option in options if option)
    return options or None


@dataclass(frozen=True)
class LabelledOption:
    text: str  # as listed: "A: first"
    label: str | None  # "a" (normalized); None for an option without a label
    body: str  # "first"


def labelled_options(options: Sequence[str]) -> tuple[LabelledOption, ...]:
    """Each option split into its label and body. Labels count only if the labelled options' labels are
    distinct: a plain option that happens to start like "e. g." does not make a set labelled."""
    parts = []
    for option in options:
        match = OPTION_LABEL_PATTERN.match(option)
        if match and match.group("body").strip():
            label = (match.group("paren") or match.group("plain")).lower()
            parts.append(LabelledOption(option, label, match.group("body").strip()))
        else:
            parts.append(LabelledOption(option, None, option))
    labels = [part.label for part in parts if part.label is not None]
    if len(labels) != len(set(labels)):
        return tuple(LabelledOption(option, None, option) for option in options)
    return tuple(parts)


def accepted_answers(example: Example) -> tuple[str, ...]:
    """Every answer that scores, normalized: the output and each of `all_outputs` (multi-label rows)."""
    return tuple(dict.fromkeys(normalize_answer(answer) for answer in (example.output, *example.all_outputs)))


def _bare_label(answer: str) -> str | None:
    match = BARE_LABEL_PATTERN.match(answer)
    return match.group(1).lower() if match else None


def _names(option: LabelledOption) -> set[str]:
    """The normalized ways a gold output may name this option: its label, its body or the whole text."""
    names = {normalize_answer(option.body), normalize_answer(option.text)}
    if option.label is not None:
        names.add(option.label)
    return names


def _answer_names(answer: str) -> set[str]:
    label = _bare_label(answer)
    return {answer} if label is None else {answer, label}


def correct_options(example: Example) -> frozenset[int]:
    """Positions of the options that any accepted answer names (by label, body or whole text)."""
    if example.options is None:
        return frozenset()
    answers = set().union(*(_answer_names(answer) for answer in accepted_answers(example)))
    return frozenset(i for i, option in enumerate(labelled_options(example.options)) if _names(option) & answers)


def answer_candidates(example: Example) -> tuple[str, ...]:
    """The strings a model should emit for each option, in option order: the form the gold output takes.

    A gold output that is a label ("A", "2") makes the candidates the labels, as the model was trained to
    answer; one that is an option's body ("inform" for "2: inform") makes them the bodies; otherwise the
    options as listed.
    """
    if example.options is None:
        return ()
    options = labelled_options(example.options)
    gold = normalize_answer(example.output)
    gold_label = _bare_label(gold)
    if gold_label is not None and any(option.label == gold_label for option in options):
        return tuple(option.text if option.label is None else _label_as_listed(option) for option in options)
    if any(option.label is not None and normalize_answer(option.body) == gold for option in options):
        return tuple(option.body for option in options)
    return example.options


def _label_as_listed(option: LabelledOption) -> str:
    """The label in the case the option lists it ("A", not "a"): InstructDial's gold is "A"."""
    match = OPTION_LABEL_PATTERN.match(option.text)
    assert match is not None  # a labelled option matched the pattern
    return str(match.group("paren") or match.group("plain"))


def is_correct(example: Example, prediction: str) -> bool:
    """Whether a generated (or chosen) answer names an accepted answer: the option it names, for a row
    with options; exact (normalized) match with any accepted answer otherwise."""
    answer = normalize_answer(prediction)
    if example.options is not None:
        named = _answer_names(answer)
        chosen = {i for i, option in enumerate(labelled_options(example.options)) if _names(option) & named}
        if chosen:
            return bool(chosen & correct_options(example))
    return answer in accepted_answers(example)


def task_family(task: str) -> str:
    """The base task of an InstructDial variant: `persuasion_present-poluteoptions` -> `persuasion_present`
    (create_data_text2text.py names variants `<task>-<variant>`; base task names use underscores)."""
    return task.split("-", 1)[0]


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).lower()


def source_text(example: Example, instructions: bool) -> str:
    return example.prompt if instructions else example.input


def example_from_row(row: Mapping[str, Any], where: str = "row") -> Example:
    missing = [name for name in REQUIRED_FIELDS if not isinstance(row.get(name), str)]
    if missing:
        raise DataError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
    output = row["output"]
    raw_outputs = row.get("all_outputs")
    if isinstance(raw_outputs, str):
        raw_outputs = [raw_outputs]
    all_outputs = tuple(str(text) for text in raw_outputs or () if text is not None) or (output,)
    return Example(
        task=row["task"],
        prompt=row["prompt"],
        input=row["input"],
        output=output,
        all_outputs=all_outputs,
        # No fallback to `candidates`/`classes_in_options`: a row that does not show its options to the
        # model is not rank-classified (the InstructDial README's rule: [OPTIONS] makes classification).
        options=parse_options(row["input"]),
    )
