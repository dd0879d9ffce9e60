"""One model per worker process: tasks ask for a model by small descriptors and get the loaded one."""

from __future__ import annotations

import functools

from analysis.models import LoadedModel, load_model


@functools.lru_cache(maxsize=1)
def cached_model(
    name_or_path: str, num_labels: int, device: str, seed: int, task: str = "classification"
) -> LoadedModel:
    """The model for these descriptors, loaded once per process (the last one asked for is kept)."""
    return load_model(name_or_path, num_labels=num_labels, device=device, seed=seed, task=task)
