"""The explanation results dataset, schema v2 (v1, before testability was recorded, is refused with how to redo it):
a Zarr v3 group that opens as one xarray Dataset.

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
| `testable` | method, example | 1: its efficient matrices differ from A (E ≠ A) in the layers it reads, 0: they do |
|            |                 | not, -1: the method reads no efficient variant |
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
storage_schemas.shard_records). A shard counts as completed (`explanation_completed_shards`) only while those
inputs are still complete with the same identities: store shards written again make it stale, and the explanation
stage computes it again. Results written before inputs were recorded were computed from `legacy` inputs
(extraction and every variant the methods read that the store holds), as the causal results are.

The dataset is declared by `EXPLANATION_RESULTS` (storage_schemas.results_dataset implements it); this module adds
what only the explanation results do: their inputs (the store shards holding a shard's examples) and its
coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from analysis.variants import VARIANTS
from storage_schemas.attention_store import store_layout
from storage_schemas.efficient_store import (
    EXTRACTION_INPUT,
    efficient_array_path,
    store_input_identities,
    store_input_problems,
)
from storage_schemas.errors import ExplanationResultsError, IncompleteInputError
from storage_schemas.results_dataset import NAN, ResultArray, ResultsSchema, text_coordinate
from storage_schemas.shard_records import InputsNow

SCHEMA_NAME = "effattn.explanation_results"
SCHEMA_VERSION = 2

# name -> (dims, dtype, fill, description) of the per-example arrays, written shard by shard.
PER_EXAMPLE_ARRAYS: dict[str, tuple[tuple[str, ...], str, Any, str]] = {
    "faithfulness": (
        ("explainer", "metric", "k", "example"),
        "float32",
        float("nan"),
        "ERASER comprehensiveness / sufficiency of the target probability",
    ),
    "aopc": (
        ("explainer", "metric", "example"),
        "float32",
        float("nan"),
        "area over the perturbation curve: mean over k",
    ),
    "kendall_tau": (
        ("explainer", "reference", "example"),
        "float32",
        float("nan"),
        "Kendall tau-b with the reference method over the removable tokens",
    ),
    "attribution": (
        ("explainer", "example", "position"),
        "float32",
        float("nan"),
        "per-token attribution (NaN where the token may not be removed)",
    ),
    "target": (("example",), "int64", -1, "the class (or next token) the unmodified model predicts"),
    "full_probability": (("example",), "float32", float("nan"), "p(target | x)"),
    "empty_probability": (("example",), "float32", float("nan"), "p(target | every removable token removed)"),
    "integrated_gradients_delta": (
        ("example",),
        "float32",
        float("nan"),
        "Captum's convergence delta: sum of IG attributions - (f(x) - f(baseline))",
    ),
    "removable_tokens": (("example",), "int32", -1, "tokens that may be removed (not special, not pooled)"),
    "minimality_tested": (("example", "layer"), "int32", -1, "sampled simplex rows judged (-1: not measured)"),
    "minimality_minimal": (("example", "layer"), "int32", -1, "of those, rows whose support is minimal"),
    "minimality_untestable": (
        ("example", "layer"),
        "int32",
        -1,
        "sampled rows whose support does not reproduce the output within the tolerance",
    ),
    "minimality_support_size": (("example", "layer"), "float32", float("nan"), "mean support size of the judged rows"),
    "testable": (
        ("explainer", "example"),
        "int8",
        -1,
        "1: the method's efficient matrices differ from A in the layers it reads, 0: they equal A there, "
        "-1: the method reads no efficient variant",
    ),
    "largest_difference": (
        ("explainer", "example"),
        "float32",
        float("nan"),
        "largest |E - A| over the blocks with a null space in the layers the method reads",
    ),
}

# name -> (dims, description); float64, written once every shard is done.
AGGREGATES: dict[str, tuple[tuple[str, ...], str]] = {
    "mean_aopc": (("explainer", "metric"), "mean AOPC over the examples where the explainer is testable"),
    "mean_kendall_tau": (
        ("explainer", "reference"),
        "mean Kendall tau over the examples where the explainer is testable and tau is defined",
    ),
    "minimal_share": (("layer",), "share of the judged simplex rows whose support is minimal"),
}


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
    return {
        recorded: current.get(shard, {}).get(name) for shard, name, recorded in _input_names(store_shards, variants)
    }


def _explanation_inputs_now(group: zarr.Group, store_group: zarr.Group):
    """For each recorded shard: its legacy inputs (extraction and every variant the methods read that the store
    holds, of the store shards holding its examples) and the identities of those inputs now."""
    variants = explanation_variants(group)
    legacy_variants = [variant for variant in variants if efficient_array_path(variant) in store_group]
    current = store_input_identities(store_group, variants)
    store_examples = group["store_example"][:]

    def inputs_now(shard: int) -> InputsNow:
        store_shards = store_shards_holding(store_group, store_examples[EXPLANATION_RESULTS.shard_region(group, shard)])
        legacy_keys = [recorded for _, _, recorded in _input_names(store_shards, legacy_variants)]
        return legacy_keys, _identities_of(current, store_shards, variants)

    return inputs_now


EXPLANATION_RESULTS = ResultsSchema(
    kind="explanation",
    name=SCHEMA_NAME,
    version=SCHEMA_VERSION,
    command="effattn explain",
    version_advice=(
        " (version 2 records which examples can tell efficient attention from A): delete it, or choose "
        "a new --results path, and run `effattn explain` again (explanations are recomputed from the "
        "attention store)"
    ),
    error=ExplanationResultsError,
    coordinates={
        "explainer": text_coordinate("explainer", "attribution method"),
        "explainer_kind": text_coordinate("explainer", "matrices, model or random"),
        "explainer_source": text_coordinate("explainer", "attention or an efficient variant ('' otherwise)"),
        "explainer_aggregation": text_coordinate("explainer", "how stored matrices become token scores ('' otherwise)"),
        "metric": text_coordinate("metric", "faithfulness metric"),
        "reference": text_coordinate("reference", "reference of Kendall tau"),
        "k": ResultArray(
            ("k",), "float64", "percent of the removable tokens removed (comprehensiveness) or kept (sufficiency)"
        ),
        "layer": ResultArray(("layer",), "int32", "layer index"),
        "store_example": ResultArray(("example",), "int64", "index of the example in the attention store"),
        "length": ResultArray(("example",), "int32", "real tokens of the example"),
        "label": ResultArray(("example",), "int64", "class id, -1 when unknown"),
        "example": ResultArray(("example",), "int64", "index of the explained example"),
    },
    per_example={
        name: ResultArray(dims, dtype, description, fill)
        for name, (dims, dtype, fill, description) in PER_EXAMPLE_ARRAYS.items()
    },
    aggregates={
        name: ResultArray(dims, "float64", description, fill=NAN) for name, (dims, description) in AGGREGATES.items()
    },
    required=(*PER_EXAMPLE_ARRAYS, "explainer", "example"),
    current_inputs=_explanation_inputs_now,
)


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
    coordinates = {
        **{
            name: [item[field] for item in methods]
            for name, field in (
                ("explainer", "name"),
                ("explainer_kind", "kind"),
                ("explainer_source", "source"),
                ("explainer_aggregation", "aggregation"),
            )
        },
        "metric": list(metrics),
        "reference": list(references),
        "k": list(percents),
        "layer": np.arange(layers),
        **{name: examples[name] for name in ("store_example", "length", "label")},
        "example": np.arange(len(examples["store_example"])),
    }
    return EXPLANATION_RESULTS.create(
        url, coordinates, shard_size, attributes, sizes={"position": int(positions)}, storage_options=storage_options
    )


open_explanation_results = EXPLANATION_RESULTS.open
load_explanation_dataset = EXPLANATION_RESULTS.load
check_same_explanation_settings = EXPLANATION_RESULTS.check_same_settings
explanation_shard_count = EXPLANATION_RESULTS.shard_count
explanation_shard_region = EXPLANATION_RESULTS.shard_region
explanation_completed_shards = EXPLANATION_RESULTS.completed_shards
forget_stale_explanation_shards = EXPLANATION_RESULTS.forget_stale_shards
mark_explanation_shard_completed = EXPLANATION_RESULTS.mark_shard_completed
write_explanation_shard = EXPLANATION_RESULTS.write_shard
write_explanation_aggregates = EXPLANATION_RESULTS.write_aggregates
explanation_status = EXPLANATION_RESULTS.status


def explanation_input_identities(store_group: zarr.Group, store_examples, variants) -> dict[str, str | None]:
    """The current identities of what explaining `store_examples` reads: for every store shard k holding one of them,
    `extraction[k]` and `efficient/<variant>[k]` for each of `variants` -> identity (None: that shard is not
    complete, or is stale)."""
    return _identities_of(
        store_input_identities(store_group, variants), store_shards_holding(store_group, store_examples), variants
    )


def explanation_shard_inputs(group: zarr.Group, store_group: zarr.Group, shard_index: int) -> dict[str, str | None]:
    """`explanation_input_identities` of the examples of one shard of the results `group`."""
    region = explanation_shard_region(group, shard_index)
    return explanation_input_identities(store_group, group["store_example"][region], explanation_variants(group))


def require_explanation_inputs(store_group: zarr.Group, store_url: str, store_examples, variants) -> None:
    """Refuse (`IncompleteInputError`) to explain `store_examples` while a store shard holding one of them is not
    extracted, or lacks current efficient attention of one of `variants`, naming the shards and the commands that
    complete them."""
    problems = store_input_problems(store_group, store_url, store_shards_holding(store_group, store_examples), variants)
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
            "variants)"
        )
    return variants


def explanation_results_path(causal_results: str) -> str:
    """Where the pipeline puts the explanation results of a run: next to its causal results,
    `<name>.results.zarr` -> `<name>.explanations.zarr`."""
    base = causal_results.rstrip("/")
    base = base[: -len(".results.zarr")] if base.endswith(".results.zarr") else base
    return f"{base}.explanations.zarr"
