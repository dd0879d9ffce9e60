"""One model per worker process: tasks ask for a model by small descriptors and get the loaded one."""

from __future__ import annotations

import functools

from analysis.models import LoadedModel, load_model
from storage_schemas.pipeline_runs import local_input_fingerprint


def cached_model(
    name_or_path: str, num_labels: int, device: str, seed: int, task: str = "classification"
) -> LoadedModel:
    """The model for these descriptors, loaded once per process (the last one asked for is kept), and loaded again
    when a model folder's files changed since (names, sizes, modification times): a worker kept across runs never
    serves the old weights of a folder retrained or replaced in place."""
    return load_model_once(name_or_path, local_input_fingerprint(name_or_path), num_labels, device, seed, task)


@functools.lru_cache(maxsize=1)
def load_model_once(
    name_or_path: str, fingerprint: str | None, num_labels: int, device: str, seed: int, task: str
) -> LoadedModel:
    """load_model, cached on the descriptors and the folder's `fingerprint` (None for a bundled model's name)."""
    return load_model(name_or_path, num_labels=num_labels, device=device, seed=seed, task=task)
