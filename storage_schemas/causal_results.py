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
attention it read; storage_schemas.shard_records). A shard counts as completed (`causal_completed_shards`) only
while those inputs are still complete with the same identities: extraction or efficient shards written again make
it stale, and the causal stage measures it again. Results written before inputs were recorded were computed from
`legacy` inputs (extraction and every efficient variant the results name that the store holds).

The dataset is declared by `CAUSAL_RESULTS` (storage_schemas.results_dataset implements it); this module adds what
only the causal results do: their inputs, the default variants and the shape of a causal shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import zarr

from storage_schemas import results_dataset
from storage_schemas.attention_store import store_layout
from storage_schemas.efficient_store import (
    EXTRACTION_INPUT,
    efficient_array_path,
    efficient_completed_shards,
    store_input_identities,
    store_input_problems,
)
from storage_schemas.errors import CausalResultsError, IncompleteInputError
from storage_schemas.results_dataset import NAN, ResultArray, ResultsSchema, forget_shards, text_coordinate
from storage_schemas.shard_records import InputsNow

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


def _causal_inputs_now(group: zarr.Group, store_group: zarr.Group):
    """For each recorded shard: its legacy inputs (extraction and every variant the results name that the store
    holds) and the identities now of every input a shard recorded (a causal shard reads the store shard of the
    same index)."""
    attributes = group.attrs.asdict()
    named = sorted({str(variant) for variant in group["variant"][:].tolist() if variant})
    legacy_variants = [variant for variant in named if efficient_array_path(variant) in store_group]
    legacy_keys = [EXTRACTION_INPUT, *(efficient_array_path(variant) for variant in legacy_variants)]
    recorded = {name for inputs in (attributes.get("shard_inputs") or {}).values() for name in inputs}
    variants = sorted(
        {*legacy_variants, *(name.split("/", 1)[1] for name in recorded if name.startswith("efficient/"))}
    )
    identities = store_input_identities(store_group, variants)

    def inputs_now(shard: int) -> InputsNow:
        return (legacy_keys, identities[shard]) if shard in identities else None

    return inputs_now


CAUSAL_RESULTS = ResultsSchema(
    kind="causal",
    name=SCHEMA_NAME,
    version=SCHEMA_VERSION,
    command="effattn causal",
    version_advice=": run `effattn causal` again into a new --results path",
    error=CausalResultsError,
    coordinates={
        "intervention": text_coordinate("intervention", "intervention name"),
        "intervention_kind": text_coordinate("intervention", "kind of intervention"),
        "variant": text_coordinate("intervention", "efficient-attention variant, or ''"),
        "removed_directions": ResultArray(
            ("intervention",), "int32", "minimality probe: weakest directions of col(T) removed (0 otherwise)"
        ),
        "target": text_coordinate("target", "where the intervention was injected"),
        "target_scope": text_coordinate("target", "all, layer or head"),
        "target_layer": ResultArray(("target",), "int32", "layer replaced (-1: every layer)"),
        "target_head": ResultArray(("target",), "int32", "head replaced (-1: every head of the scope)"),
        "example": ResultArray(("example",), "int64", "index of the example in the attention store"),
        "source_index": ResultArray(("example",), "int64", "row of the example in the corpus"),
        "length": ResultArray(("example",), "int32", "real tokens of the example"),
        "label": ResultArray(("example",), "int64", "class id, -1 when unknown"),
    },
    metric_array=ResultArray(PER_EXAMPLE_DIMENSIONS, "float32", "", fill=NAN),  # each of analysis.causal.METRICS
    per_example={
        "original_correct": ResultArray(
            ("example",),
            "float32",
            "the unmodified model's prediction is right (share of positions for next-token; NaN without label)",
            fill=NAN,
        ),
        "injected_change_ratio": ResultArray(
            ("intervention", "example"),
            "float32",
            "||injected - A||_F / ||A||_F over every layer and head of the example",
            fill=NAN,
        ),
    },
    aggregates={
        name: ResultArray(AGGREGATE_DIMENSIONS, "float64", description, fill=NAN)
        for name, description in AGGREGATES.items()
    },
    required=("intervention", "target", "example"),
    current_inputs=_causal_inputs_now,
)


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
    coordinates = {
        **{
            name: [item[field] for item in interventions]
            for name, field in (
                ("intervention", "name"),
                ("intervention_kind", "kind"),
                ("variant", "variant"),
                ("removed_directions", "removed_directions"),
            )
        },
        **{
            name: [item[field] for item in targets]
            for name, field in (
                ("target", "name"),
                ("target_scope", "scope"),
                ("target_layer", "layer"),
                ("target_head", "head"),
            )
        },
        "example": np.arange(len(examples["length"])),
        **{name: examples[name] for name in ("source_index", "length", "label")},
    }
    return CAUSAL_RESULTS.create(
        url, coordinates, shard_size, attributes, metrics=metrics, storage_options=storage_options
    )


open_causal_results = CAUSAL_RESULTS.open
check_same_settings = CAUSAL_RESULTS.check_same_settings
shard_region = CAUSAL_RESULTS.shard_region  # the same for the explanation results
causal_completed_shards = CAUSAL_RESULTS.completed_shards
forget_stale_causal_shards = CAUSAL_RESULTS.forget_stale_shards
forget_result_shards = forget_shards
mark_causal_shard_completed = CAUSAL_RESULTS.mark_shard_completed
write_aggregates = CAUSAL_RESULTS.write_aggregates
causal_status = CAUSAL_RESULTS.status
causal_input_identities = store_input_identities
# refuse causal (or explanation) results of another store with a CausalResultsError
check_results_of_store = partial(results_dataset.check_results_of_store, error=CausalResultsError)


def causal_variants(
    store_group: zarr.Group, store_url: str, variants: Sequence[str] | None, interventions: Sequence[str] | None
) -> list[str]:
    """The variants of the causal stage's default interventions: `variants` (--variants), else those the efficient
    stage has finished in every shard of the store; refused (ValueError) when there are none and no --interventions
    are named (the default interventions need efficient attention)."""
    from analysis.variants import VARIANTS

    if variants is None:
        layout = store_layout(store_group)
        variants = [
            variant
            for variant in VARIANTS
            if efficient_array_path(variant) in store_group
            and len(efficient_completed_shards(store_group, variant)) == layout.n_shards
        ]
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
    problems = store_input_problems(store_group, store_url, range(store_layout(store_group).n_shards), variants)
    if problems:
        raise IncompleteInputError(
            f"{store_url} is not ready for `effattn causal` (unfinished shards read as zeros, so the results would "
            f"be wrong): {'; '.join(problems)}; then run `effattn causal` again"
        )


def write_causal_shard(
    group: zarr.Group,
    shard_index: int,
    metrics: dict[str, np.ndarray],
    injected_change_ratio: np.ndarray,
    original_correct: np.ndarray,
) -> None:
    """Write one whole shard, durably: metrics {name: [intervention, target, shard examples]},
    injected_change_ratio [intervention, shard examples], original_correct [shard examples]."""
    CAUSAL_RESULTS.shard_region(group, shard_index)  # an IndexError for a shard that does not exist
    missing = sorted(set(group.attrs["metrics"]) - set(metrics))
    if missing:
        raise ValueError(f"shard {shard_index}: metrics {missing} are missing")
    CAUSAL_RESULTS.write_shard(
        group,
        shard_index,
        {
            **{name: metrics[name] for name in group.attrs["metrics"]},
            "injected_change_ratio": injected_change_ratio,
            "original_correct": original_correct,
        },
    )
