"""Small builders shared by tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pathlib import Path


def grid_dict(data: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny, fast grid on the demo dataset; keyword arguments replace top-level keys."""
    grid: dict[str, Any] = {
        "name": "test-grid",
        "data": str(data),
        "tasks": {"train": ["sentiment_classification", "response_generation"],
                  "eval": ["emotion_classification", "summarization"]},
        "grid": {"model": ["tiny:bart"], "mtl": ["none", "in-domain"], "instructions": [True],
                 "shots": [0, 4], "seed": [0]},
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1.0e-3, "max_source_length": 96,
                  "max_target_length": 16, "checkpoint_every": 2},
        "eval": {"max_examples": 6, "batch_size": 6, "max_new_tokens": 8, "max_source_length": 96},
    }
    grid.update(overrides)
    return grid


def write_grid(directory: Path, data: Path, filename: str = "grid.yaml", **overrides: Any) -> Path:
    path = directory / filename
    path.write_text(yaml.safe_dump(grid_dict(data, **overrides), sort_keys=False))
    return path
