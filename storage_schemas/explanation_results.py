"""The explanation results dataset, schema v1: a Zarr v3 group that opens as one xarray Dataset.

    xarray.open_zarr(url, consolidated=False)

Dims: `method` (an attribution method, analysis.explanations), `metric` (comprehensiveness, sufficiency), `k` (the
percent of tokens removed or kept), `reference` (what Kendall τ is measured against), `example` (the examples
explained, `store_example` their index in the attention store), `position`, `layer`. Strings are variable-length
UTF-8 (Zarr v3 `string`).

| array | dims | |
|---|---|---|
| `method`, `method_kind`, `method_source`, `method_aggregation` | method | name and parts |
| `metric` / `k` / `reference` / `layer` | own dim | coordinates |
| `store_example`, `length`, `label` | example | copied from the store |
| `faithfulness` | method, metric, k, example | ERASER comprehensiveness and sufficiency |
| `aopc` | method, metric, example | their mean over k |
| `kendall_tau` | method, reference, example | rank agreement over the removable tokens |
| `attribution` | method, example, position | per-token scores (NaN: not removable, or not measured) |
| `target`, `full_probability`, `empty_probability`, `integrated_gradients_delta`, `removable_tokens` | example | |
| `minimality_tested`, `minimality_minimal`, `minimality_untestable` | example, layer | sampled simplex rows |
| `minimality_support_size` | example, layer | mean support of the judged rows |
| each of AGGREGATES | | written by `write_explanation_aggregates` once every shard is done |

Per-example arrays are chunked by the results' own shards (`shard_size` examples); the stage writes whole shards and
records them in the root attribute `completed_shards` after the data is written. Root attributes: schema name and
version, the attention store's URL and provenance, `settings` (a rerun with other settings is refused),
`completed_shards`, `created`, and after aggregation `claims` (analysis.explanation_claims).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from storage_schemas.attention_store import AttentionStoreError, _compressors

SCHEMA_NAME = "effattn.explanation_results"
SCHEMA_VERSION = 1

# name -> (dims, dtype, fill, description) of the per-example arrays, written shard by shard.
PER_EXAMPLE_ARRAYS: dict[str, tuple[tuple[str, ...], str, Any, str]] = {
    "faithfulness": (("method", "metric", "k", "example"), "float32", float("nan"),
                     "ERASER comprehensiveness / sufficiency of the target probability"),
    "aopc": (("method", "metric", "example"), "float32", float("nan"), "area over the perturbation curve: mean over k"),
    "kendall_tau": (("method", "reference", "example"), "float32", float("nan"),
                    "Kendall tau-b with the reference method over the removable tokens"),
    "attribution": (("method", "example", "position"), "float32", float("nan"),
                    "per-token attribution (NaN where the token may not be removed)"),
    "target": (("example",), "int64", -1, "the class (or next token) the unmodified model predicts"),
    "full_probability": (("example",), "float32", float("nan"), "p(target | x)"),
    "empty_probability": (("example",), "float32", float("nan"), "p(target | every removable token removed)"),
    "integrated_gradients_delta": (("example",), "float32", float("nan"),
                                   "Captum's convergence delta: sum of IG attributions - (f(x) - f(baseline))"),
    "removable_tokens": (("example",), "int32", -1, "tokens that may be removed (not special, not pooled)"),
    "minimality_tested": (("example", "layer"), "int32", -1, "sampled simplex rows judged (-1: not measured)"),
    "minimality_minimal": (("example", "layer"), "int32", -1, "of those, rows whose support is minimal"),
    "minimality_untestable": (("example", "layer"), "int32", -1,
                              "sampled rows whose support does not reproduce the output within the tolerance"),
    "minimality_support_size": (("example", "layer"), "float32", float("nan"), "mean support size of the judged rows"),
}

# name -> (dims, description); float64, written once every shard is done.
AGGREGATES: dict[str, tuple[tuple[str, ...], str]] = {
    "mean_aopc": (("method", "metric"), "mean AOPC over the examples"),
    "mean_kendall_tau": (("method", "reference"), "mean Kendall tau over the examples where it is defined"),
    "minimal_share": (("layer",), "share of the judged simplex rows whose support is minimal"),
}


class ExplanationResultsError(AttentionStoreError):
    """An explanation results dataset that is not valid, or does not match the run using it."""


def _array(group: zarr.Group, name: str, values, shape, dtype, chunks, dims, description, fill_value: Any = 0):
    array = group.create_array(
        name, shape=shape, dtype=str if dtype == "string" else dtype, chunks=chunks, compressors=_compressors(),
        fill_value=fill_value, dimension_names=dims, attributes={"description": description},
    )
    if values is not None:
        array[...] = values


def create_explanation_results(
    url: str,
    methods: Sequence[dict[str, str]],
    metrics: Sequence[str],
    percents: Sequence[float],
    references: Sequence[str],
    examples: dict[str, np.ndarray],
    layers: int,
    positions: int,
    shard_size: int,
    attributes: dict[str, Any],
    storage_options: dict | None = None,
) -> zarr.Group:
    """Create an empty results dataset at `url` (an error if anything exists there).

    methods: [{"name", "kind", "source", "aggregation"}]; examples: {"store_example", "length", "label"} arrays
    [example]; positions: the store's max length; attributes: provenance and `settings`."""
    try:
        group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        raise ExplanationResultsError(
            f"something already exists at {url}: choose a new --results path, or delete it to start over"
        ) from None
    sizes = {"method": len(methods), "metric": len(metrics), "k": len(percents), "reference": len(references),
             "example": len(examples["store_example"]), "position": int(positions), "layer": int(layers)}
    for field, description in (("name", "attribution method"), ("kind", "matrices, model or random"),
                               ("source", "attention or an efficient variant ('' otherwise)"),
                               ("aggregation", "how stored matrices become token scores ('' otherwise)")):
        name = "method" if field == "name" else f"method_{field}"
        _array(group, name, np.asarray([item[field] for item in methods], dtype=object), (sizes["method"],), "string",
               (sizes["method"],), ("method",), description, fill_value="")
    for name, values, description in (("metric", list(metrics), "faithfulness metric"),
                                      ("reference", list(references), "reference of Kendall tau")):
        _array(group, name, np.asarray(values, dtype=object), (len(values),), "string", (len(values),), (name,),
               description, fill_value="")
    _array(group, "k", np.asarray(percents, dtype=np.float64), (sizes["k"],), "float64", (sizes["k"],), ("k",),
           "percent of the removable tokens removed (comprehensiveness) or kept (sufficiency)")
    _array(group, "layer", np.arange(layers, dtype=np.int32), (layers,), "int32", (max(layers, 1),), ("layer",),
           "layer index")
    E = sizes["example"]
    for name, dtype, description in (("store_example", "int64", "index of the example in the attention store"),
                                     ("length", "int32", "real tokens of the example"),
                                     ("label", "int64", "class id, -1 when unknown")):
        _array(group, name, np.asarray(examples[name], dtype=dtype), (E,), dtype, (max(E, 1),), ("example",),
               description)
    _array(group, "example", np.arange(E, dtype=np.int64), (E,), "int64", (max(E, 1),), ("example",),
           "index of the explained example")
    for name, (dims, dtype, fill, description) in PER_EXAMPLE_ARRAYS.items():
        shape = tuple(sizes[dim] for dim in dims)
        chunks = tuple(shard_size if dim == "example" else max(sizes[dim], 1) for dim in dims)
        _array(group, name, None, shape, dtype, chunks, dims, description, fill_value=fill)
    group.attrs.update({**attributes, "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
                        "shard_size": int(shard_size), "completed_shards": []})
    return group


def open_explanation_results(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """Open a results dataset; `ExplanationResultsError` says what is wrong and what to do."""
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)
    except FileNotFoundError:
        raise ExplanationResultsError(
            f"there are no explanation results at {url}: create them with `effattn explain --store STORE --results "
            f"{url}`"
        ) from None
    attributes = group.attrs.asdict()
    if "schema" not in attributes and "method" in group:
        raise ExplanationResultsError(
            f"{url} was never completely created (its creation stopped before the attributes were written): delete "
            "it and run `effattn explain` again"
        )
    if attributes.get("schema") != SCHEMA_NAME:
        raise ExplanationResultsError(
            f"{url} is not an effattn explanation results dataset (its 'schema' attribute is "
            f"{attributes.get('schema')!r}, expected {SCHEMA_NAME!r}): point --results at a dataset written by "
            "`effattn explain`"
        )
    if attributes.get("schema_version") != SCHEMA_VERSION:
        raise ExplanationResultsError(
            f"{url} has explanation results schema version {attributes.get('schema_version')!r}, but this effattn "
            f"reads version {SCHEMA_VERSION}: run `effattn explain` again into a new --results path"
        )
    missing = [name for name in (*PER_EXAMPLE_ARRAYS, "method", "example") if name not in group]
    if missing:
        raise ExplanationResultsError(f"{url} lacks the arrays {missing}: it was not completely created; delete it "
                                      "and run `effattn explain` again")
    return group


def load_explanation_dataset(url: str, storage_options: dict | None = None):
    """The whole results as an in-memory xarray Dataset (small: per-example numbers), after validation."""
    import xarray as xr

    open_explanation_results(url, storage_options=storage_options)
    return xr.open_zarr(url, consolidated=False, storage_options=storage_options).load()


def check_same_explanation_settings(group: zarr.Group, url: str, settings: dict[str, Any]) -> None:
    """Refuse to resume a results dataset made with other settings, naming every difference."""
    stored = group.attrs.get("settings", {})
    differences = [
        f"{key}: stored {stored.get(key)!r}, requested {settings.get(key)!r}"
        for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)
    ]
    if differences:
        raise ExplanationResultsError(
            f"{url} holds explanation results of another run ({'; '.join(differences)}): use the same settings to "
            "resume it, or choose a new --results path"
        )


def explanation_shard_count(group: zarr.Group) -> int:
    return -(-group["example"].shape[0] // int(group.attrs["shard_size"]))


def explanation_completed_shards(group: zarr.Group) -> list[int]:
    return sorted(group.attrs.get("completed_shards", []))


def mark_explanation_shard_completed(group: zarr.Group, shard_index: int) -> None:
    """Record a shard as done; only after its data is written, only from the driver."""
    explanation_shard_region(group, shard_index)
    done = set(group.attrs.get("completed_shards", []))
    done.add(int(shard_index))
    group.attrs["completed_shards"] = sorted(done)


def explanation_shard_region(group: zarr.Group, shard_index: int) -> slice:
    examples = group["example"].shape[0]
    size = int(group.attrs["shard_size"])
    n_shards = explanation_shard_count(group)
    if not 0 <= shard_index < n_shards:
        raise IndexError(f"shard {shard_index} does not exist: the results have shards 0..{n_shards - 1}")
    return slice(shard_index * size, min((shard_index + 1) * size, examples))


def write_explanation_shard(group: zarr.Group, shard_index: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one whole shard: every array of PER_EXAMPLE_ARRAYS, shaped as stored with `example` cut to the
    shard's examples."""
    region = explanation_shard_region(group, shard_index)
    missing = sorted(set(PER_EXAMPLE_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"shard {shard_index}: arrays {missing} are missing")
    for name, (dims, dtype, _, _) in PER_EXAMPLE_ARRAYS.items():
        axis = dims.index("example")
        expected = tuple(region.stop - region.start if i == axis else n for i, n in enumerate(group[name].shape))
        values = np.asarray(arrays[name])
        if values.shape != expected:
            raise ValueError(f"shard {shard_index}: {name} has shape {values.shape}, expected {expected}")
        index = tuple(region if i == axis else slice(None) for i in range(len(dims)))
        group[name][index] = values.astype(dtype)


def write_explanation_aggregates(group: zarr.Group, aggregates: dict[str, np.ndarray]) -> None:
    """Write (or overwrite) every array of AGGREGATES."""
    for name, (dims, description) in AGGREGATES.items():
        values = np.asarray(aggregates[name], dtype=np.float64)
        shape = tuple(group[dim].shape[0] for dim in dims)
        if values.shape != shape:
            raise ValueError(f"aggregate {name} has shape {values.shape}, expected {shape}")
        if name in group:
            group[name][...] = values
        else:
            _array(group, name, values, shape, "float64", tuple(max(n, 1) for n in shape), dims, description,
                   fill_value=float("nan"))


def explanation_results_path(causal_results: str) -> str:
    """Where the pipeline puts the explanation results of a run: next to its causal results,
    `<name>.results.zarr` -> `<name>.explanations.zarr`."""
    base = causal_results.rstrip("/")
    base = base[: -len(".results.zarr")] if base.endswith(".results.zarr") else base
    return f"{base}.explanations.zarr"


def explanation_status(url: str, settings: dict[str, Any]):
    """The pipeline's check (storage_schemas.pipeline_runs.StageCheck): complete when the results at `url` were
    made with `settings`, every shard is done and the claims are written; conflicting when made with others."""
    import json

    from storage_schemas.pipeline_runs import StageCheck

    try:
        group = open_explanation_results(url, mode="r")
    except ExplanationResultsError as error:
        return StageCheck(False, str(error))
    attributes = group.attrs.asdict()
    if attributes.get("settings") != json.loads(json.dumps(settings)):
        return StageCheck(False, f"{url} holds explanation results of other settings", conflicting=True)
    shards, done = explanation_shard_count(group), len(explanation_completed_shards(group))
    if done < shards or "claims" not in attributes:
        return StageCheck(False, f"{done} of {shards} shards of {url} are done")
    return StageCheck(True, f"{url} is complete ({shards} shards, claims written)")
