"""How a classification head is trained (analysis.training): the one declaration of these options and their defaults.

`effattn train` (flows.settings.TrainSettings) and the extraction's automatic fine-tuning read their defaults here,
and this module imports no torch so that the command line can (it parses before torch is imported). Every field is
part of the trained head's cache key (analysis.training.head_cache_key).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TrainingSettings:
    """How a head is trained. Every field is part of the cache key.

    epochs: passes over the train split. batch_size: examples per optimiser step. learning_rate: peak AdamW
    learning rate (after warmup). max_length: tokens per example, longer texts are truncated (the final [SEP]
    kept). weight_decay: AdamW decay, not applied to biases and LayerNorm weights. warmup_fraction: share of
    the steps with a linearly rising learning rate; it then decays linearly to 0. held_out_fraction, seed: the
    split (see analysis.splits) and every other random choice. max_train_examples: train on a seeded sample of
    at most this many train-split examples (None: all of them); the held-out split is unaffected.
    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    held_out_fraction: float = 0.2
    seed: int = 0
    max_train_examples: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainingSettings.{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("max_length", self.max_length, minimum=2)
        if self.max_train_examples is not None:
            positive_int("max_train_examples", self.max_train_examples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainingSettings.seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"TrainingSettings.learning_rate must be positive, got {self.learning_rate!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainingSettings.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 <= self.warmup_fraction < 1):
            raise ValueError(f"TrainingSettings.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if not (isinstance(self.held_out_fraction, (int, float)) and 0 < self.held_out_fraction < 1):
            raise ValueError(
                f"TrainingSettings.held_out_fraction must be strictly between 0 and 1, got {self.held_out_fraction!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingSettings:
        """Settings from a dict (e.g. a model card's "settings"); unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of the option `name` (flows/settings.py reads the command line's defaults here)."""
        return cls.__dataclass_fields__[name].default
