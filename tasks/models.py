"""One model per worker process: tasks ask for a model by small descriptors and get the loaded one."""

from __future__ import annotations

import functools

from analysis.models import LoadedModel, load_model
from storage_schemas.causal_results import CausalResultsError
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


def load_store_model(store_attributes: dict, model_override: str | None, device: str) -> LoadedModel:
    """The model that wrote the attention store whose root attributes are `store_attributes` (its `model` and
    `tokenizer` records), or `model_override` in its place, on `device`, loaded once per process (`cached_model`).
    Refused (CausalResultsError) unless its tokenizer and weights digest are the store's: measurements on other
    weights would be silently wrong."""
    model = store_attributes["model"]
    task_name = store_attributes["extraction"]["task"]
    loaded = cached_model(
        model_override or model["name"], int(model["num_labels"] or 1), device, int(model["head_seed"]), task_name
    )
    tokenizer = store_attributes["tokenizer"]
    if (type(loaded.tokenizer).__name__, len(loaded.tokenizer)) != (tokenizer["class"], tokenizer["vocab_size"]):
        raise CausalResultsError(
            f"the tokenizer of {model_override or model['name']} ({type(loaded.tokenizer).__name__}, "
            f"{len(loaded.tokenizer)} tokens) is not the one that wrote the store ({tokenizer['class']}, "
            f"{tokenizer['vocab_size']} tokens): pass --model with the model that wrote the store"
        )
    if loaded.weights_digest != model["weights_digest"]:
        raise CausalResultsError(
            f"the model {model_override or model['name']} has weights digest {loaded.weights_digest[:16]}…, but the "
            f"store was extracted with {model['weights_digest'][:16]}… ({model['name']}): pass --model with the "
            "model that wrote the store"
        )
    return loaded
