"""The causal results dataset, schema v1: a Zarr v3 group that opens as one xarray Dataset.

    xarray.open_zarr(url, consolidated=False)

Dims: `intervention` (what was injected), `target` (where: all layers, one layer, or one head), `example` (the
attention store's examples, in its order). Every array has `dimension_names`; strings are variable-length
UTF-8 (Zarr v3 `string`).

| array | dims | |
|---|---|---|
| `intervention` | intervention | name, e.g. `efficient:stochastic`, `minimality:effective:k=4` |
| `intervention_kind`, `variant`, `removed_directions` | intervention | its parts (variant "" when none) |
| `target` | target | `all`, `layer 3`, `layer 3 head 7` |
| `target_scope`, `target_layer`, `target_head` | target | scope all / layer / head; -1 where not applicable |
| `example` | example | index of the example in the attention store |
| `source_index`, `length`, `label` | example | copied from the store |
| `original_correct` | example | the unmodified model's prediction is right (NaN without label) |
| each of analysis.causal.METRICS | intervention, target, example | float32, NaN where not measured |
| `injected_change_ratio` | intervention, example | ||injected - A|| / ||A|| over all layers and heads |
| each of AGGREGATES | intervention, target | written by `write_aggregates` once every shard is done |

Per-example arrays are chunked by the store's shards (every chunk holds all interventions and targets of one
shard of examples); the causal stage writes whole shards and records them in the root attribute
`completed_shards` after the data is written. Root attributes: schema name and version, the attention store's
URL and provenance (model, tokenizer, corpus, extraction, package versions), the run's `settings` (a rerun with
other settings is refused), `completed_shards`, `created`, and after aggregation `claims` (the claims table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from storage_schemas.attention_store import AttentionStoreError, _compressors

SCHEMA_NAME = "effattn.causal_results"
SCHEMA_VERSION = 1

PER_EXAMPLE_DIMENSIONS = ("intervention", "target", "example")
AGGREGATE_DIMENSIONS = ("intervention", "target")

# name -> description: aggregates over the measured examples of each (intervention, target).
AGGREGATES: dict[str, str] = {
    "agreement_rate": "mean of `agreement`: the share of predictions kept",
    "flip_rate": "mean of `flipped`: the share of examples with at least one changed prediction",
    "largest_logit_change": "max of `max_abs_logit_change` over the examples",
    "mean_kl_divergence": "mean of `kl_divergence` (nats)",
    "accuracy": "mean of `correct` over the labelled examples",
    "largest_stored_logit_difference": "max of `stored_logit_difference` over the examples",
    "examples_measured": "number of examples measured (0: not run for this target)",
}


class CausalResultsError(AttentionStoreError):
    """A results dataset that is not valid, or does not match the run using it."""


def _array(group: zarr.Group, name: str, values: np.ndarray | None, shape, dtype, chunks, dims, description,
           fill_value: Any = 0) -> None:
    array = group.create_array(
        name, shape=shape, dtype=str if dtype == "string" else dtype, chunks=chunks, compressors=_compressors(),
        fill_value=fill_value, dimension_names=dims, attributes={"description": description},
    )
    if values is not None:
        array[...] = values


def create_causal_results(
    url: str,
    interventions: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    examples: dict[str, np.ndarray],
    shard_size: int,
    metrics: dict[str, str],
    attributes: dict[str, Any],
    storage_options: dict | None = None,
) -> zarr.Group:
    """Create an empty results dataset at `url` (an error if anything exists there).

    interventions: [{"name", "kind", "variant", "removed_directions"}]; targets: [{"name", "scope", "layer",
    "head"}]; examples: {"source_index", "length", "label"} arrays [example]; metrics: per-example metric name ->
    description; attributes: provenance and `settings`.
    """
    try:
        group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        raise CausalResultsError(
            f"something already exists at {url}: choose a new --results path, or delete it to start over"
        ) from None
    I, T, E = len(interventions), len(targets), len(examples["length"])
    coordinates = {
        "intervention": ("string", [item["name"] for item in interventions], "intervention name"),
        "intervention_kind": ("string", [item["kind"] for item in interventions], "kind of intervention"),
        "variant": ("string", [item["variant"] for item in interventions], "efficient-attention variant, or ''"),
        "removed_directions": ("int32", [item["removed_directions"] for item in interventions],
                               "minimality probe: weakest directions of col(T) removed (0 otherwise)"),
    }
    for name, (dtype, values, description) in coordinates.items():
        _array(group, name, np.asarray(values, dtype=object if dtype == "string" else dtype), (I,), dtype, (I,),
               ("intervention",), description, fill_value="" if dtype == "string" else 0)
    target_coordinates = {
        "target": ("string", [item["name"] for item in targets], "where the intervention was injected"),
        "target_scope": ("string", [item["scope"] for item in targets], "all, layer or head"),
        "target_layer": ("int32", [item["layer"] for item in targets], "layer replaced (-1: every layer)"),
        "target_head": ("int32", [item["head"] for item in targets], "head replaced (-1: every head of the scope)"),
    }
    for name, (dtype, values, description) in target_coordinates.items():
        _array(group, name, np.asarray(values, dtype=object if dtype == "string" else dtype), (T,), dtype, (T,),
               ("target",), description, fill_value="" if dtype == "string" else 0)
    example_arrays = {
        "example": (np.arange(E, dtype=np.int64), "int64", "index of the example in the attention store"),
        "source_index": (examples["source_index"], "int64", "row of the example in the corpus"),
        "length": (examples["length"], "int32", "real tokens of the example"),
        "label": (examples["label"], "int64", "class id, -1 when unknown"),
    }
    for name, (values, dtype, description) in example_arrays.items():
        _array(group, name, np.asarray(values, dtype=dtype), (E,), dtype, (E,), ("example",), description)
    _array(group, "original_correct", None, (E,), "float32", (shard_size,), ("example",),
           "the unmodified model's prediction is right (share of positions for next-token; NaN without label)",
           fill_value=float("nan"))
    for name, description in metrics.items():
        _array(group, name, None, (I, T, E), "float32", (I, T, shard_size), PER_EXAMPLE_DIMENSIONS, description,
               fill_value=float("nan"))
    _array(group, "injected_change_ratio", None, (I, E), "float32", (I, shard_size), ("intervention", "example"),
           "||injected - A||_F / ||A||_F over every layer and head of the example", fill_value=float("nan"))
    group.attrs.update({**attributes, "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
                        "shard_size": int(shard_size), "metrics": list(metrics), "completed_shards": []})
    return group


def open_causal_results(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """Open a results dataset; `CausalResultsError` says what is wrong and what to do."""
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)
    except FileNotFoundError:
        raise CausalResultsError(
            f"there are no causal results at {url}: create them with `effattn causal --store STORE --results {url}`"
        ) from None
    attributes = group.attrs.asdict()
    if "schema" not in attributes and "intervention" in group:
        raise CausalResultsError(
            f"{url} was never completely created (its creation stopped before the attributes were written): delete "
            "it and run `effattn causal` again"
        )
    if attributes.get("schema") != SCHEMA_NAME:
        raise CausalResultsError(
            f"{url} is not an effattn causal results dataset (its 'schema' attribute is {attributes.get('schema')!r},"
            f" expected {SCHEMA_NAME!r}): point --results at a dataset written by `effattn causal`"
        )
    if attributes.get("schema_version") != SCHEMA_VERSION:
        raise CausalResultsError(
            f"{url} has causal results schema version {attributes.get('schema_version')!r}, but this effattn reads "
            f"version {SCHEMA_VERSION}: run `effattn causal` again into a new --results path"
        )
    missing = [name for name in (*attributes.get("metrics", []), "intervention", "target", "example")
               if name not in group]
    if missing:
        raise CausalResultsError(f"{url} lacks the arrays {missing}: it was not completely created; delete it and "
                                 "run `effattn causal` again")
    return group


def check_same_settings(group: zarr.Group, url: str, settings: dict[str, Any]) -> None:
    """Refuse to resume a results dataset made with other settings, naming every difference."""
    stored = group.attrs.get("settings", {})
    differences = [
        f"{key}: stored {stored.get(key)!r}, requested {settings.get(key)!r}"
        for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)
    ]
    if differences:
        raise CausalResultsError(
            f"{url} holds causal results of another run ({'; '.join(differences)}): use the same settings to "
            "resume it, or choose a new --results path"
        )


def causal_completed_shards(group: zarr.Group) -> list[int]:
    return sorted(group.attrs.get("completed_shards", []))


def mark_causal_shard_completed(group: zarr.Group, shard_index: int) -> None:
    """Record a shard as done; only after its data is written, only from the driver."""
    done = set(group.attrs.get("completed_shards", []))
    done.add(int(shard_index))
    group.attrs["completed_shards"] = sorted(done)


def shard_region(group: zarr.Group, shard_index: int) -> slice:
    examples = group["example"].shape[0]
    size = int(group.attrs["shard_size"])
    n_shards = -(-examples // size)
    if not 0 <= shard_index < n_shards:
        raise IndexError(f"shard {shard_index} does not exist: the results have shards 0..{n_shards - 1}")
    return slice(shard_index * size, min((shard_index + 1) * size, examples))


def write_causal_shard(
    group: zarr.Group,
    shard_index: int,
    metrics: dict[str, np.ndarray],
    injected_change_ratio: np.ndarray,
    original_correct: np.ndarray,
) -> None:
    """Write one whole shard: metrics {name: [intervention, target, shard examples]}, injected_change_ratio
    [intervention, shard examples], original_correct [shard examples]."""
    region = shard_region(group, shard_index)
    missing = sorted(set(group.attrs["metrics"]) - set(metrics))
    if missing:
        raise ValueError(f"shard {shard_index}: metrics {missing} are missing")
    for name in group.attrs["metrics"]:
        expected = (*group[name].shape[:2], region.stop - region.start)
        if metrics[name].shape != expected:
            raise ValueError(f"shard {shard_index}: {name} has shape {metrics[name].shape}, expected {expected}")
        group[name][:, :, region] = metrics[name].astype(np.float32)
    group["injected_change_ratio"][:, region] = injected_change_ratio.astype(np.float32)
    group["original_correct"][region] = original_correct.astype(np.float32)


def write_aggregates(group: zarr.Group, aggregates: dict[str, np.ndarray]) -> None:
    """Write (or overwrite) every array of AGGREGATES: [intervention, target] float64."""
    shape = group["agreement"].shape[:2]
    for name, description in AGGREGATES.items():
        values = np.asarray(aggregates[name], dtype=np.float64)
        if values.shape != shape:
            raise ValueError(f"aggregate {name} has shape {values.shape}, expected {shape}")
        if name in group:
            group[name][...] = values
        else:
            _array(group, name, values, shape, "float64", shape, AGGREGATE_DIMENSIONS, description,
                   fill_value=float("nan"))
