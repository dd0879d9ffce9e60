"""The explanation results dataset, schema v2 (v1, before testability was recorded, is refused with how to redo it): a Zarr v3 group that opens as one xarray Dataset.

    xarray.open_zarr(url, consolidated=False)

Dims: `method` (an attribution method, analysis.explanations), `metric` (comprehensiveness, sufficiency), `k` (the
percent of tokens removed or kept), `reference` (what Kendall τ is measured against), `example` (the examples
explained, `store_example` their index in the attention store), `position`, `layer`. Strings are variable-length
UTF-8 (Zarr v3 `string`).

| array | dims | |
|---|---|---|
| `explainer`, `explainer_kind`, `explainer_source`, `explainer_aggregation` | explainer | name and parts |
| `metric` / `k` / `reference` / `layer` | own dim | coordinates |
| `store_example`, `length`, `label` | example | copied from the store |
| `faithfulness` | method, metric, k, example | ERASER comprehensiveness and sufficiency |
| `aopc` | method, metric, example | their mean over k |
| `kendall_tau` | method, reference, example | rank agreement over the removable tokens |
| `attribution` | method, example, position | per-token scores (NaN: not removable, or not measured) |
| `target`, `full_probability`, `empty_probability`, `integrated_gradients_delta`, `removable_tokens` | example | |
| `minimality_tested`, `minimality_minimal`, `minimality_untestable` | example, layer | sampled simplex rows |
| `minimality_support_size` | example, layer | mean support of the judged rows |
| `testable` | method, example | 1: the method's efficient matrices differ from A in the layers it reads (E ≠ A), 0: they do not, -1: the method reads no efficient variant |
| `largest_difference` | method, example | the largest |E − A| over the blocks with a null space in those layers |
| each of AGGREGATES | | written by `write_explanation_aggregates` once every shard is done |

Per-example arrays are chunked by the results' own shards (`shard_size` examples); the stage writes whole shards and
records them in the root attribute `completed_shards` after the data is written. Root attributes: schema name and
version, the attention store's URL and provenance, `settings` (a rerun with other settings is refused),
`completed_shards`, `shard_identities`, `shard_inputs`, `created`, and after aggregation `claims`, `ranking` and
`comparisons` (analysis.explanation_claims: the claims rows, every explainer's AOPC and Kendall τ with bootstrap
intervals, and each efficient method against its raw twin over the testable examples).

Every completed shard records the identities of the attention-store shards its examples were read from (root
attribute `shard_inputs`: shard -> {"extraction[k]": identity, "efficient/<variant>[k]": identity} for every store
shard k holding one of its examples and every variant whose matrices its methods read; see
storage_schemas.attention_store). A shard counts as completed (`explanation_completed_shards`) only while those
inputs are still complete with the same identities: store shards written again make it stale, and the explanation
stage computes it again. Results written before inputs were recorded were computed from `legacy` inputs
(extraction and every variant the methods read that the store holds), as the causal results are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from analysis.variants import VARIANTS
from storage_schemas.attention_store import (
    AttentionStoreError,
    IncompleteInputError,
    _compressors,
    completion_update,
    describe_shards,
    extract_again_advice,
    open_attention_store,
    recorded_identities,
    recorded_inputs,
    shard_is_current,
    store_layout,
)
from storage_schemas.causal_results import causal_input_identities, forget_result_shards, shard_region
from storage_schemas.efficient_store import EXTRACTION_INPUT, efficient_array_path, efficient_stale_shards

SCHEMA_NAME = "effattn.explanation_results"
SCHEMA_VERSION = 2

# name -> (dims, dtype, fill, description) of the per-example arrays, written shard by shard.
PER_EXAMPLE_ARRAYS: dict[str, tuple[tuple[str, ...], str, Any, str]] = {
    "faithfulness": (("explainer", "metric", "k", "example"), "float32", float("nan"),
                     "ERASER comprehensiveness / sufficiency of the target probability"),
    "aopc": (("explainer", "metric", "example"), "float32", float("nan"), "area over the perturbation curve: mean over k"),
    "kendall_tau": (("explainer", "reference", "example"), "float32", float("nan"),
                    "Kendall tau-b with the reference method over the removable tokens"),
    "attribution": (("explainer", "example", "position"), "float32", float("nan"),
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
    "testable": (("explainer", "example"), "int8", -1,
                 "1: the method's efficient matrices differ from A in the layers it reads, 0: they equal A there, "
                 "-1: the method reads no efficient variant"),
    "largest_difference": (("explainer", "example"), "float32", float("nan"),
                           "largest |E - A| over the blocks with a null space in the layers the method reads"),
}

# name -> (dims, description); float64, written once every shard is done.
AGGREGATES: dict[str, tuple[tuple[str, ...], str]] = {
    "mean_aopc": (("explainer", "metric"), "mean AOPC over the examples where the explainer is testable"),
    "mean_kendall_tau": (("explainer", "reference"),
                         "mean Kendall tau over the examples where the explainer is testable and tau is defined"),
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
    sizes = {"explainer": len(methods), "metric": len(metrics), "k": len(percents), "reference": len(references),
             "example": len(examples["store_example"]), "position": int(positions), "layer": int(layers)}
    for field, description in (("name", "attribution method"), ("kind", "matrices, model or random"),
                               ("source", "attention or an efficient variant ('' otherwise)"),
                               ("aggregation", "how stored matrices become token scores ('' otherwise)")):
        name = "explainer" if field == "name" else f"explainer_{field}"
        _array(group, name, np.asarray([item[field] for item in methods], dtype=object), (sizes["explainer"],), "string",
               (sizes["explainer"],), ("explainer",), description, fill_value="")
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
    if "schema" not in attributes and "explainer" in group:
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
            f"reads version {SCHEMA_VERSION} (version 2 records which examples can tell efficient attention from "
            "A): delete it, or choose a new --results path, and run `effattn explain` again (explanations are "
            "recomputed from the attention store)"
        )
    missing = [name for name in (*PER_EXAMPLE_ARRAYS, "explainer", "example") if name not in group]
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


def explanation_variants(group: zarr.Group) -> list[str]:
    """The efficient variants whose stored matrices the results' methods read (their `explainer_source`), in VARIANTS
    order."""
    sources = set(group["explainer_source"][:].tolist())
    return [variant for variant in VARIANTS if variant in sources]


def store_shards_holding(store_group: zarr.Group, store_examples) -> list[int]:
    """The attention-store shards that hold the examples `store_examples` (store indices)."""
    size = store_layout(store_group).shard_size
    return sorted({int(example) // size for example in store_examples})


def _input_names(store_shards, variants) -> list[tuple[int, str, str]]:
    """(store shard, store input name, name recorded in `shard_inputs`) for every input read from `store_shards`."""
    names = [EXTRACTION_INPUT, *(efficient_array_path(variant) for variant in variants)]
    return [(shard, name, f"{name}[{shard}]") for shard in store_shards for name in names]


def _identities_of(current: dict[int, dict[str, str | None]], store_shards, variants) -> dict[str, str | None]:
    return {recorded: current.get(shard, {}).get(name) for shard, name, recorded in _input_names(store_shards,
                                                                                                  variants)}


def explanation_input_identities(store_group: zarr.Group, store_examples, variants) -> dict[str, str | None]:
    """The current identities of what explaining `store_examples` reads: for every store shard k holding one of them,
    `extraction[k]` and `efficient/<variant>[k]` for each of `variants` -> identity (None: that shard is not
    complete, or is stale)."""
    return _identities_of(causal_input_identities(store_group, variants),
                          store_shards_holding(store_group, store_examples), variants)


def explanation_shard_inputs(group: zarr.Group, store_group: zarr.Group, shard_index: int) -> dict[str, str | None]:
    """`explanation_input_identities` of the examples of one shard of the results `group`."""
    region = explanation_shard_region(group, shard_index)
    return explanation_input_identities(store_group, group["store_example"][region], explanation_variants(group))


def require_explanation_inputs(store_group: zarr.Group, store_url: str, store_examples, variants) -> None:
    """Refuse (`IncompleteInputError`) to explain `store_examples` while a store shard holding one of them is not
    extracted, or lacks current efficient attention of one of `variants`, naming the shards and the commands that
    complete them."""
    layout = store_layout(store_group)
    shards = store_shards_holding(store_group, store_examples)
    current = causal_input_identities(store_group, variants)
    problems = []
    missing = [shard for shard in shards if current[shard][EXTRACTION_INPUT] is None]
    if missing:
        problems.append(f"extraction {describe_shards(missing, layout)} {'is' if len(missing) == 1 else 'are'} not "
                        f"complete: {extract_again_advice(store_group, store_url)}")
    for variant in variants:
        path = efficient_array_path(variant)
        lacking = [shard for shard in shards if current[shard][path] is None]
        if not lacking:
            continue
        stale = set(lacking) & set(efficient_stale_shards(store_group, variant))
        why = " (computed from extraction shards that were written again since, or are not complete)" if stale else ""
        problems.append(f"{path} {describe_shards(lacking, layout)} {'is' if len(lacking) == 1 else 'are'} not "
                        f"computed{why}: run `effattn efficient --store {store_url} --variants {variant}`"
                        + (" after the extraction is complete" if missing else ""))
    if problems:
        raise IncompleteInputError(
            f"{store_url} is not ready for `effattn explain` (the examples to explain lie in unfinished shards, "
            f"which read as zeros, so the results would be wrong): {'; '.join(problems)}; then run `effattn explain` "
            "again"
        )


def require_stored_variants(store_group: zarr.Group, store_url: str) -> list[str]:
    """The efficient variants the store holds (`efficient/<variant>`), in VARIANTS order: what `effattn explain`
    compares with raw attention by default. None is refused (IncompleteInputError) with the command that computes
    them."""
    variants = [variant for variant in VARIANTS if efficient_array_path(variant) in store_group]
    if not variants:
        raise IncompleteInputError(
            f"{store_url} holds no efficient attention, and `effattn explain` compares efficient attention with raw "
            f"attention: run `effattn efficient --store {store_url}` first (or name --methods without efficient "
            "variants)")
    return variants


def _explanation_shard_states(group: zarr.Group, store_group: zarr.Group) -> tuple[list[int], list[int]]:
    """(current, stale) recorded shards of the results: stale ones were computed from store shards that are not
    complete now, or were written again since."""
    attributes = group.attrs.asdict()
    variants = explanation_variants(group)
    legacy_variants = [variant for variant in variants if efficient_array_path(variant) in store_group]
    current = causal_input_identities(store_group, variants)
    store_examples = group["store_example"][:]
    n_shards = explanation_shard_count(group)
    fresh, stale = [], []
    for shard in sorted(recorded_identities(attributes)):
        if not 0 <= shard < n_shards:
            stale.append(shard)
            continue
        store_shards = store_shards_holding(store_group, store_examples[explanation_shard_region(group, shard)])
        legacy_keys = [recorded for _, _, recorded in _input_names(store_shards, legacy_variants)]
        recorded = recorded_inputs(attributes, shard, legacy_keys)
        now = _identities_of(current, store_shards, variants)
        (fresh if shard_is_current(recorded, now) else stale).append(shard)
    return fresh, stale


def explanation_completed_shards(group: zarr.Group, store_group: zarr.Group) -> list[int]:
    """The shards of the results `group` that are computed and still current: computed from the shards of the
    attention store `store_group` as they are now."""
    return _explanation_shard_states(group, store_group)[0]


def forget_stale_explanation_shards(group: zarr.Group, store_group: zarr.Group) -> list[int]:
    """Record the stale shards of the results as not done (and drop the claims, which they entered); returns them.
    Only from the driver that holds the results' lock."""
    stale = _explanation_shard_states(group, store_group)[1]
    forget_result_shards(group, stale)
    return stale


def mark_explanation_shard_completed(group: zarr.Group, shard_index: int, inputs: dict[str, str]) -> None:
    """Record a shard as done, computed from the store's shards of these identities (as `explanation_shard_inputs`
    gave them before the shard's examples were read); only after its data is written, only from the driver."""
    explanation_shard_region(group, shard_index)  # an IndexError for a shard that does not exist
    if not inputs or any(identity is None for identity in inputs.values()):
        raise IncompleteInputError(f"explanation shard {shard_index} cannot be recorded as done: its inputs "
                                   f"{inputs} were not all complete")
    group.attrs.update(completion_update(group.attrs.asdict(), shard_index, inputs))


def explanation_shard_region(group: zarr.Group, shard_index: int) -> slice:
    return shard_region(group, shard_index)


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


def explanation_status(url: str, settings: dict[str, Any], store: str):
    """The pipeline's check (storage_schemas.pipeline_runs.StageCheck): complete when the results at `url` were
    made with `settings`, every shard is done and still current for the attention store at `store` (computed from
    its shards as they are now), and the claims are written; conflicting when made with other settings."""
    import json

    from storage_schemas.pipeline_runs import StageCheck

    try:
        group = open_explanation_results(url, mode="r")
    except ExplanationResultsError as error:
        return StageCheck(False, str(error))
    attributes = group.attrs.asdict()
    if attributes.get("settings") != json.loads(json.dumps(settings)):
        return StageCheck(False, f"{url} holds explanation results of other settings", conflicting=True)
    try:
        done = len(explanation_completed_shards(group, open_attention_store(store, mode="r")))
    except AttentionStoreError as error:
        return StageCheck(False, str(error))
    shards = explanation_shard_count(group)
    if done < shards or "claims" not in attributes:
        return StageCheck(False, f"{done} of {shards} shards of {url} are done")
    return StageCheck(True, f"{url} is complete ({shards} shards, claims written)")
