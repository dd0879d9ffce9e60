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

Every completed shard records the identities of the attention-store shards it was computed from (root attribute
`shard_inputs`: shard -> {"extraction": identity, "efficient/<variant>": identity} for each variant whose efficient
attention it read; storage_schemas.attention_store). A shard counts as completed (`causal_completed_shards`) only
while those inputs are still complete with the same identities: extraction or efficient shards written again make
it stale, and the causal stage measures it again. Results written before inputs were recorded were computed from
`legacy` inputs (extraction and every efficient variant the results name that the store holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from storage_schemas.attention_store import (
    AttentionStoreError,
    IncompleteInputError,
    _compressors,
    completion_update,
    describe_shards,
    extract_again_advice,
    extraction_identities,
    recorded_identities,
    recorded_inputs,
    removal_update,
    shard_is_current,
    store_layout,
)
from storage_schemas.efficient_store import (
    EXTRACTION_INPUT,
    efficient_array_path,
    efficient_completed_shards,
    efficient_identities,
    efficient_stale_shards,
)
from storage_schemas.selection import selection_of_store

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


def check_results_of_store(results_attributes: dict[str, Any], store_attributes: dict[str, Any], results: str,
                           store: str, n_examples: int, advice: str = "pass the store they came from with --store",
                           check_selection: bool = True) -> None:
    """Refuse (`CausalResultsError`) results whose recorded `settings.store_identity` (model weights, corpus, example
    count and, with `check_selection`, the stored layers and heads) differs from the attention store's; every
    difference is named, then `advice`. Causal and explanation results record the same identity."""
    identity = results_attributes.get("settings", {}).get("store_identity", {})
    found = {
        "weights_digest": store_attributes.get("model", {}).get("weights_digest"),
        "corpus_digest": store_attributes.get("corpus", {}).get("digest"),
        "examples": n_examples,
    }
    differences = [f"{key}: results {identity[key]!r}, store {found[key]!r}" for key in found
                   if key in identity and identity[key] != found[key]]
    if check_selection:
        # results of a store of selected layers / heads record them (flows.causal.causal_plan); of a full store, none
        layout = store_attributes.get("layout", {})
        selection = selection_of_store(store_attributes, layout.get("layers", 0), layout.get("heads", 0),
                                       layout.get("kv_heads", 1))
        stored = None if selection.is_everything else selection.to_attribute()
        if identity.get("selection") != stored:
            differences.append(f"selection: results {identity.get('selection')!r}, store {stored!r}")
    if differences:
        raise CausalResultsError(
            f"{results} were not computed from the attention store {store} ({'; '.join(differences)}): {advice}"
        )


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


def causal_input_identities(store_group: zarr.Group, variants) -> dict[int, dict[str, str | None]]:
    """For every shard of the attention store: the current identities of what the causal stage reads there, input
    name ("extraction", "efficient/<variant>" for each of `variants`) -> identity, None where that shard is not
    complete (or is stale)."""
    layout = store_layout(store_group)
    extracted = extraction_identities(store_group)
    efficient = {variant: efficient_identities(store_group, variant) for variant in variants}
    return {
        shard: {EXTRACTION_INPUT: extracted.get(shard),
                **{efficient_array_path(variant): efficient[variant].get(shard) for variant in variants}}
        for shard in range(layout.n_shards)
    }


def causal_variants(store_group: zarr.Group, store_url: str, variants: Sequence[str] | None,
                    interventions: Sequence[str] | None) -> list[str]:
    """The variants of the causal stage's default interventions: `variants` (--variants), else those the efficient
    stage has finished in every shard of the store; refused (ValueError) when there are none and no --interventions
    are named (the default interventions need efficient attention)."""
    from analysis.variants import VARIANTS

    if variants is None:
        layout = store_layout(store_group)
        variants = [variant for variant in VARIANTS
                    if efficient_array_path(variant) in store_group
                    and len(efficient_completed_shards(store_group, variant)) == layout.n_shards]
    if not variants and interventions is None:
        raise ValueError(
            f"{store_url} has no finished efficient attention: run `effattn efficient --store {store_url}` first (or "
            "name --interventions that need none, e.g. replay,uniform,ablate)"
        )
    return list(variants)


def require_causal_inputs(store_group: zarr.Group, store_url: str, variants) -> None:
    """Refuse (`IncompleteInputError`) to measure over a store whose extraction, or efficient attention of one of
    `variants`, is not complete and current in every shard (CausalResultsError when a variant was never computed),
    naming the shards and the commands that complete them."""
    absent = [variant for variant in variants if efficient_array_path(variant) not in store_group]
    if absent:
        raise CausalResultsError(
            f"{store_url} lacks finished efficient attention for the variants {absent}: run "
            f"`effattn efficient --store {store_url} --variants {','.join(absent)}` first"
        )
    layout = store_layout(store_group)
    identities = causal_input_identities(store_group, variants)
    problems = []
    missing = [shard for shard, inputs in identities.items() if inputs[EXTRACTION_INPUT] is None]
    if missing:
        problems.append(f"extraction {describe_shards(missing, layout)} {'is' if len(missing) == 1 else 'are'} not "
                        f"complete: {extract_again_advice(store_group, store_url)}")
    for variant in variants:
        path = efficient_array_path(variant)
        lacking = [shard for shard, inputs in identities.items() if inputs[path] is None]
        if not lacking:
            continue
        stale = sorted(set(lacking) & set(efficient_stale_shards(store_group, variant)))
        why = (" (computed from extraction shards that were written again since, or are not complete)"
               if stale else "")
        problems.append(f"{path} {describe_shards(lacking, layout)} {'is' if len(lacking) == 1 else 'are'} not "
                        f"computed{why}: run `effattn efficient --store {store_url} --variants {variant}`"
                        + (" after the extraction is complete" if missing else ""))
    if problems:
        raise IncompleteInputError(
            f"{store_url} is not ready for `effattn causal` (unfinished shards read as zeros, so the results would "
            f"be wrong): {'; '.join(problems)}; then run `effattn causal` again"
        )


def _shard_inputs_of(group: zarr.Group, store_group: zarr.Group) -> tuple[dict[int, dict[str, str]], list[str]]:
    """(completed shard -> recorded inputs, the efficient variants a legacy shard is taken to have read)."""
    attributes = group.attrs.asdict()
    named = sorted({str(variant) for variant in group["variant"][:].tolist() if variant})
    legacy_variants = [variant for variant in named if efficient_array_path(variant) in store_group]
    keys = [EXTRACTION_INPUT, *(efficient_array_path(variant) for variant in legacy_variants)]
    inputs = {shard: recorded_inputs(attributes, shard, keys) for shard in recorded_identities(attributes)}
    return inputs, legacy_variants


def _causal_shard_states(group: zarr.Group, store_group: zarr.Group) -> tuple[list[int], list[int]]:
    inputs, legacy_variants = _shard_inputs_of(group, store_group)
    variants = sorted({*legacy_variants, *(name.split("/", 1)[1] for recorded in inputs.values() for name in recorded
                                          if name.startswith("efficient/"))})
    current_identities = causal_input_identities(store_group, variants)
    current, stale = [], []
    for shard, recorded in sorted(inputs.items()):
        valid = shard in current_identities and shard_is_current(recorded, current_identities[shard])
        (current if valid else stale).append(shard)
    return current, stale


def causal_completed_shards(group: zarr.Group, store_group: zarr.Group) -> list[int]:
    """The shards of the results `group` that are measured and still current: computed from the shards of the
    attention store `store_group` as they are now."""
    return _causal_shard_states(group, store_group)[0]


def forget_stale_causal_shards(group: zarr.Group, store_group: zarr.Group) -> list[int]:
    """Record the stale shards of the results as not done (and drop the claims table, which they entered); returns
    them. Only from the driver that holds the results' lock."""
    stale = _causal_shard_states(group, store_group)[1]
    forget_result_shards(group, stale)
    return stale


def forget_result_shards(group: zarr.Group, shards: list[int]) -> None:
    """Record `shards` of a results dataset (causal or explanation) as not done, and drop its claims, which they
    entered. Only from the driver that holds the results' lock."""
    if shards:
        group.attrs.update(removal_update(group.attrs.asdict(), shards))
        if "claims" in group.attrs:
            del group.attrs["claims"]


def mark_causal_shard_completed(group: zarr.Group, shard_index: int, inputs: dict[str, str]) -> None:
    """Record a shard as done, computed from the store's shards of these identities (input name -> identity, as
    `causal_input_identities` gave them before the shard was read); only after its data is written, only from the
    driver."""
    shard_region(group, shard_index)  # an IndexError for a shard that does not exist
    if any(identity is None for identity in inputs.values()):
        raise IncompleteInputError(f"causal shard {shard_index} cannot be recorded as done: its inputs {inputs} "
                                   "were not all complete")
    group.attrs.update(completion_update(group.attrs.asdict(), shard_index, inputs))


def shard_region(group: zarr.Group, shard_index: int) -> slice:
    """The examples of one shard of a results dataset (causal or explanation: both have `example` and the
    attribute `shard_size`); an IndexError for a shard that does not exist."""
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
