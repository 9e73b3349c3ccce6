"""Rows written the way InstructDial's generators write them (prakharguptaz/Instructdial, utils/common.py and
settings.py), so the tests read options in the real formats rather than in ones the parser was written for."""

from __future__ import annotations

from string import ascii_uppercase
from typing import Any

OPTION_TOKEN = "[OPTIONS]"
OPTION_SEPARATOR = "||||"
QUESTION_SEP = "[QUESTION]"


def get_options_string(classes: list[str]) -> str:
    return f"{OPTION_TOKEN} " + OPTION_SEPARATOR.join(classes)


def get_alphabetwithoptions_string(candidates: list[str]) -> str:
    lettered = zip(ascii_uppercase, candidates, strict=False)  # as InstructDial's: at most 26 options
    return f"{OPTION_TOKEN} " + OPTION_SEPARATOR.join(f"{option}: {c}" for option, c in lettered)


def get_integerwithoptions_string(candidates: list[str]) -> str:
    return f"{OPTION_TOKEN} " + OPTION_SEPARATOR.join(f"{i}: {c}" for i, c in enumerate(candidates))


def row(task: str, context: str, options: str, output: str, all_outputs: list[str] | None = None) -> dict[str, Any]:
    """One text-to-text row as scripts/text2textfiles writes it: options, then the question prompt."""
    text = f"[CONTEXT] {context} [ENDOFDIALOGUE] {options} {QUESTION_SEP} Which option is right?"
    result: dict[str, Any] = {"task": task, "prompt": f"Instruction: choose an option.\nInput: {text}",
                              "input": text, "output": output}
    if all_outputs is not None:
        result["all_outputs"] = all_outputs
    return result


def answer_selection_row(task: str, context: str, candidates: list[str], answer_index: int) -> dict[str, Any]:
    """answer_selection / eval_ranking / dialfact_classification: lettered options, the letter as gold."""
    return row(task, context, get_alphabetwithoptions_string(candidates), ascii_uppercase[answer_index])
