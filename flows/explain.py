"""The explanation stage as a Prefect flow: attention store (+ efficient attention) -> explanation results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow
from tqdm.auto import tqdm

from analysis.efficient_attention import VARIANTS
from analysis.explanations import PERCENTS, ExplanationSettings, default_methods
from flows.preflight import check_device
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.efficient_store import efficient_array_path
from storage_schemas.explanation_results import mark_explanation_shard_completed, open_explanation_results
from storage_schemas.store_lock import hold_store_lock
from tasks.explain import (
    choose_examples,
    efficient_sources,
    prepare_explanations,
    run_explanation_shard,
    store_identity,
    summarise_explanations,
)

DEFAULT_EXAMPLES = 16


def explanation_settings(
    store: str, methods: Sequence[str] | None = None, examples: int | None = DEFAULT_EXAMPLES,
    percents: Sequence[int] = PERCENTS, integrated_gradients_steps: int = 32, leave_one_out_max_tokens: int = 128,
    minimality_rows: int = 8, minimality_tolerance: float = 1e-8, seed: int = 0, shard_size: int = 8,
) -> dict[str, Any]:
    """The run's settings record (analysis.explanations.ExplanationSettings plus the store's identity).

    Default methods: raw attention and every variant the efficient stage was run for (the store holds
    `efficient/<variant>`), each in every aggregation, then the model baselines and random. `examples` are spread
    over the whole store (None: all); the stage refuses them while a store shard holding one is unfinished.
    """
    if examples is not None and examples < 1:
        raise ValueError(f"examples must be at least 1 (or None: every example of the store), got {examples}")
    if methods is None:
        group = open_attention_store(store, mode="r")
        methods = default_methods([variant for variant in VARIANTS if efficient_array_path(variant) in group])
    methods = list(methods)
    variants = efficient_sources(methods)
    chosen = ExplanationSettings(
        methods=tuple(methods), examples=tuple(choose_examples(store, examples)), percents=tuple(percents),
        integrated_gradients_steps=int(integrated_gradients_steps),
        leave_one_out_max_tokens=int(leave_one_out_max_tokens), minimality_rows=int(minimality_rows),
        minimality_tolerance=float(minimality_tolerance), seed=int(seed), shard_size=int(shard_size),
    )
    return {**chosen.record(), "store_identity": store_identity(store, variants)}


@flow(name="effattn-explain")
def explain(
    store: str,
    results: str,
    methods: Sequence[str] | None = None,
    examples: int | None = DEFAULT_EXAMPLES,
    percents: Sequence[int] = PERCENTS,
    integrated_gradients_steps: int = 32,
    leave_one_out_max_tokens: int = 128,
    minimality_rows: int = 8,
    minimality_tolerance: float = 1e-8,
    seed: int = 0,
    shard_size: int = 8,
    model: str | None = None,
    device: str = "cpu",
    forward_rows: int = 64,
) -> list[dict[str, Any]]:
    """Token attributions of every method for `examples` examples, their ERASER faithfulness and Kendall τ, and the
    simplex rows' minimality, into the results dataset at `results`. Resumable: done shards are skipped; other
    settings into the same results are refused; examples in store shards that are unfinished are refused, and shards
    computed from store shards written again since are computed again. `model` overrides the store's model (same
    weights); `forward_rows` bounds the rows of one removal forward pass. Returns the explanation claims."""
    settings = explanation_settings(store, methods, examples, percents, integrated_gradients_steps,
                                    leave_one_out_max_tokens, minimality_rows, minimality_tolerance, seed, shard_size)
    store_layout(open_attention_store(store, mode="r"))  # a clear error for a store that is not one
    check_device(device)  # before the lock or any results folder exists
    with hold_store_lock(results, "explain"):  # one writer per results dataset (the store is only read)
        todo = prepare_explanations(store, results, settings)
        group = open_explanation_results(results, mode="r+")
        for shard_index in tqdm(todo, desc="explanation shards", unit="shard", disable=not todo):
            inputs = run_explanation_shard(store, results, shard_index, settings, model, device, forward_rows)
            mark_explanation_shard_completed(group, shard_index, inputs)
        return summarise_explanations(store, results)
