"""What a stage's status check answers (a leaf: the pipeline's checks and the results datasets' own use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageCheck:
    """Whether a stage's output is complete for this run's inputs, and why (or why not), in words."""

    complete: bool
    reason: str
    conflicting: bool = False  # the output exists but was made with other settings: it must not be overwritten
