"""The study preset's task splits (grids/paper.yaml). Split 1 is InstructDial's own leave-task-out split;
splits 2 and 3 are ours: seeded draws of held-out tasks with split 1's mix of task types, since the paper's
other splits are not public. `paper_splits()` is what grids/paper.yaml lists, and a test keeps them equal."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# prakharguptaz/Instructdial, configs/experiments/leave_task_train.json and leave_task_test.json.
LEAVE_TASK_TRAIN = (
    "intent_present", "intent_classification", "act_classification", "act_generation", "advice_generation",
    "advice_present", "count_response_words", "db_based_generation", "deal_present", "edit_generation",
    "emotion_tagging", "emotion_generation", "endswith_controlled_generation", "document_grounded_generation",
    "find_missing_utterance", "find_incoherent_utterance", "graph_based_generation",
    "keyword_controlled_generation", "nli_classification", "answer_generation", "persona_grounded_generation",
    "persuasion_generation", "persuasion_present", "persuasion_strategy", "question_generation",
    "recovery_generation", "nontoxic_feedback_generation", "response_generation",
    "response_generation_with_n_words", "schema_based_generation", "fill_missing_utterance", "summarization",
    "slot_present", "slot_value_generation", "toxic_classification", "target_controlled_generation",
)
LEAVE_TASK_TEST = (
    "relation_classification", "dialfact_classification", "eval_ranking", "answer_selection",
    "beginswith_controlled_generation", "knowledge_grounded_generation",
)
# Which of those list options (classification, scored by accuracy); the rest generate (ROUGE-L).
CLASSIFICATION = frozenset({
    "intent_present", "intent_classification", "act_classification", "advice_present", "deal_present",
    "emotion_tagging", "find_missing_utterance", "find_incoherent_utterance", "nli_classification",
    "persuasion_present", "persuasion_strategy", "slot_present", "toxic_classification",
    "relation_classification", "dialfact_classification", "eval_ranking", "answer_selection",
})
SPLIT_SEEDS = {"split2": 2, "split3": 3}


def held_out_draw(tasks: Sequence[str], like: Sequence[str], classification: frozenset[str], seed: int) -> list[str]:
    """Held-out tasks drawn from `tasks` with the same number of classification and generation tasks as
    `like`, reproducibly from `seed`; in `tasks` order."""
    rng = random.Random(seed)
    drawn: list[str] = []
    for is_classification in (True, False):
        pool = sorted(task for task in tasks if (task in classification) == is_classification)
        wanted = sum(1 for task in like if (task in classification) == is_classification)
        drawn += rng.sample(pool, wanted)
    return [task for task in tasks if task in drawn]


def paper_splits() -> dict[str, dict[str, list[str]]]:
    """{split: {"train": [...], "eval": [...]}} for grids/paper.yaml: split 1 InstructDial's, 2 and 3 drawn."""
    universe = [*LEAVE_TASK_TRAIN, *LEAVE_TASK_TEST]
    splits = {"split1": {"train": list(LEAVE_TASK_TRAIN), "eval": list(LEAVE_TASK_TEST)}}
    for name, seed in SPLIT_SEEDS.items():
        held_out = held_out_draw(universe, LEAVE_TASK_TEST, CLASSIFICATION, seed)
        splits[name] = {"train": [task for task in universe if task not in held_out], "eval": held_out}
    return splits


def type_mix(tasks: Sequence[str], classification: frozenset[str] | Mapping[str, object]) -> tuple[int, int]:
    """(classification, generation) counts of `tasks`."""
    count = sum(1 for task in tasks if task in classification)
    return count, len(tasks) - count
