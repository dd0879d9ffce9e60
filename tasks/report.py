"""The report stage's work: read what the report shows from a causal results dataset and its attention store
(local paths or fsspec URLs), then draw and write it (analysis.report_html).

Only small parts of the stores are read: the aggregates [intervention, target], the per-matrix diagnostics
[example, layer, head] of each variant, and for the few examples drawn one [L, L] block each of attention and
efficient attention (one chunk each).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from prefect import task
from prefect.cache_policies import NO_CACHE

from analysis.report_figures import choose_examples, choose_head, load_local_tokenizer, token_labels
from analysis.report_html import ExampleView, ReportInputs, write_report
from analysis.variants import VARIANTS
from storage_schemas.attention_store import (
    AttentionStoreNotFoundError,
    open_attention_store,
    read_texts,
    store_layout,
)
from storage_schemas.causal_results import (
    AGGREGATES,
    CausalResultsError,
    check_results_of_store,
    open_causal_results,
)
from storage_schemas.efficient_store import diagnostic_array_path, efficient_array_path
from storage_schemas.explanation_results import load_explanation_dataset
from storage_schemas.selection import selection_of_group
from tasks.stages import retry_on_io_error

REPORT_DIAGNOSTICS = ("null_dim", "null_norm_ratio", "row_sum_error", "negative_mass", "rank")
AGGREGATE_COORDINATES = ("intervention_kind", "variant", "removed_directions")
TARGET_COORDINATES = ("target_scope", "target_layer", "target_head")


def _strings(array) -> list[str]:
    return [str(value) for value in np.asarray(array[...]).tolist()]


def read_aggregates(group) -> xr.Dataset:
    """The aggregates of a complete results group as a Dataset [intervention, target] with its coordinates."""
    missing = [name for name in AGGREGATES if name not in group]
    if missing:
        raise CausalResultsError(
            "the causal results have no aggregates yet (the run did not finish): run the same `effattn causal` "
            "command again to complete them, then make the report"
        )
    coordinates: dict[str, Any] = {
        "intervention": _strings(group["intervention"]),
        "target": _strings(group["target"]),
    }
    for name in AGGREGATE_COORDINATES:
        values = group[name][...]
        coordinates[name] = (
            "intervention",
            _strings(group[name]) if np.asarray(values).dtype.kind in "OTU" else np.asarray(values),
        )
    coordinates["target_scope"] = ("target", _strings(group["target_scope"]))
    coordinates["target_layer"] = ("target", np.asarray(group["target_layer"][...]))
    coordinates["target_head"] = ("target", np.asarray(group["target_head"][...]))
    data = {name: (("intervention", "target"), np.asarray(group[name][...], dtype=np.float64)) for name in AGGREGATES}
    return xr.Dataset(data, coords=coordinates)


def load_report_inputs(
    results: str, store: str | None = None, examples: int = 3, explanations: str | None = None
) -> ReportInputs:
    """Read everything the report shows. `store` defaults to the results' `attention_store` attribute; `examples`
    is how many examples are drawn as heatmaps; `explanations`: explanation results to show too (effattn explain)."""
    group = open_causal_results(results, mode="r")
    attributes = group.attrs.asdict()
    aggregates = read_aggregates(group)
    if store is None:
        store = attributes.get("attention_store")
        if not store:
            raise CausalResultsError(f"{results} does not record its attention store: pass it with --store")
        try:
            store_group = open_attention_store(store, mode="r")
        except AttentionStoreNotFoundError:
            raise CausalResultsError(
                f"the attention store recorded in {results} ({store}) is not there (a relative path is read from "
                "the current folder): pass its location with --store"
            ) from None
    else:
        store_group = open_attention_store(store, mode="r")
    layout = store_layout(store_group)
    selection = selection_of_group(store_group)
    store_attributes = store_group.attrs.asdict()
    check_results_of_store(attributes, store_attributes, results, store, layout.n_examples)

    length = np.asarray(store_group["length"][...])
    variants = [variant for variant in VARIANTS if efficient_array_path(variant) in store_group]
    diagnostics = {
        variant: {
            name: np.asarray(store_group[diagnostic_array_path(variant, name)][...])
            for name in REPORT_DIAGNOSTICS
            if diagnostic_array_path(variant, name) in store_group
        }
        for variant in variants
    }
    tokenizer = load_local_tokenizer((store_attributes.get("tokenizer") or {}).get("name_or_path"))
    class_names = (store_attributes.get("corpus") or {}).get("class_names") or []
    views: list[ExampleView] = []
    if variants and examples > 0:
        reference = diagnostics[variants[0]]
        for index in choose_examples(length, reference["null_dim"], count=examples):
            layer, head = choose_head(reference["null_norm_ratio"][index])
            n = int(length[index])
            label = int(store_group["label"][index])
            views.append(
                ExampleView(  # labelled with the model's layer and head numbers
                    index=index,
                    layer=selection.layers[layer],
                    head=selection.heads[head],
                    labels=token_labels(store_group["tokens"][index, :n], tokenizer),
                    text=read_texts(store_group, [index])[0],
                    label=class_names[label]
                    if 0 <= label < len(class_names)
                    else ("none" if label < 0 else str(label)),
                    attention=np.asarray(store_group["attention"][index, layer, head, :n, :n], dtype=np.float64),
                    efficient={
                        variant: np.asarray(
                            store_group[efficient_array_path(variant)][index, layer, head, :n, :n], dtype=np.float64
                        )
                        for variant in variants
                    },
                    null_norm_ratio={
                        variant: float(diagnostics[variant]["null_norm_ratio"][index, layer, head])
                        for variant in variants
                    },
                )
            )
    return ReportInputs(
        results_url=results,
        store_url=store,
        attributes=attributes,
        aggregates=aggregates,
        diagnostics=diagnostics,
        length=length,
        layers=selection.layers,
        heads=selection.heads,
        head_dim=layout.head_dim,
        examples=views,
        captured=selection.describe(),
        tokenizer_loaded=tokenizer is not None,
        explanations=None if explanations is None else load_explanation_dataset(explanations),
    )


@task(
    name="read-report-inputs",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io_error,
)
def read_report_inputs(results: str, store: str | None, examples: int, explanations: str | None = None) -> ReportInputs:
    """load_report_inputs as a task (a transient I/O error of an object store is retried)."""
    return load_report_inputs(results, store, examples, explanations)


@task(name="write-report", cache_policy=NO_CACHE)
def draw_report(inputs: ReportInputs, out: str) -> str:
    """Draw the figures and write index.html into the local folder `out`; returns the path of index.html."""
    return str(write_report(inputs, out))
