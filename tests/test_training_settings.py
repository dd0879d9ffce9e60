"""analysis/training_settings.py: how a head is trained, the one declaration of its defaults (read by the CLI)."""

from __future__ import annotations

import pytest

from analysis.training import head_cache_key
from analysis.training_settings import TrainingSettings
from flows.settings import ExtractSettings, PipelineSettings, TrainSettings

# head_cache_key("sha256:base", "sha256:corpus", settings of a default `effattn train` run), as computed before the
# defaults were declared once: a changed key would train every cached head again.
DEFAULT_TRAIN_KEY = "5faf8ce82e661d061e6ae66d7c7add1f2a821d106799db2930b1bc9a3411f83d"


def test_settings_defaults_and_validation():
    settings = TrainingSettings()
    assert settings.as_dict() == dict(
        epochs=1,
        batch_size=32,
        learning_rate=5e-5,
        max_length=128,
        weight_decay=0.01,
        warmup_fraction=0.1,
        held_out_fraction=0.2,
        seed=0,
        max_train_examples=None,
    )
    assert TrainingSettings.from_dict(settings.as_dict()) == settings
    with pytest.raises(ValueError, match="TrainingSettings.epochs must be an integer >= 1, got 0"):
        TrainingSettings(epochs=0)
    with pytest.raises(ValueError, match="held_out_fraction must be strictly between 0 and 1"):
        TrainingSettings(held_out_fraction=1.0)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        TrainingSettings(learning_rate=0)
    with pytest.raises(ValueError, match=r"unknown training settings \['epoch'\]"):
        TrainingSettings.from_dict({"epoch": 3})


def test_the_command_line_trains_as_a_python_caller_does():
    command = TrainSettings(corpus="rt-sentiment")
    assert command.training() == TrainingSettings()  # the same defaults, so the same cache key
    assert head_cache_key("sha256:base", "sha256:corpus", command.training()) == DEFAULT_TRAIN_KEY
    assert ExtractSettings(corpus="c", model="m", store="s").epochs == PipelineSettings().epochs == 1
    chosen = TrainSettings(
        corpus="c", epochs=3, seed=2, batch_size=8, learning_rate=1e-3, max_length=64, max_train_examples=50
    ).training()
    assert chosen == TrainingSettings(
        epochs=3, seed=2, batch_size=8, learning_rate=1e-3, max_length=64, max_train_examples=50
    )
