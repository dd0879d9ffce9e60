"""The causal stage as a Prefect flow: attention store (+ efficient attention) -> causal results dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow

from analysis.causal import SCOPES, CausalPlan, targets_for
from analysis.variants import require_known_variants
from analysis.interventions import (
    DEFAULT_MINIMALITY_DIRECTIONS,
    Intervention,
    default_head_interventions,
    default_interventions,
    default_layer_interventions,
    parse_interventions,
)
from flows.preflight import check_device
from flows.settings import CausalSettings
from storage_schemas.attention_store import open_attention_store, store_layout, use_fast_codec_pipeline
from storage_schemas.causal_results import causal_variants, mark_causal_shard_completed, open_causal_results
from storage_schemas.results_dataset import results_store_identity
from storage_schemas.selection import selection_of_group
from storage_schemas.store_lock import hold_store_lock
from tasks.causal import causal_shard_on_worker, prepare_results, run_causal_shard, summarise_results
from tasks.dask_cluster import run_model_stage_shards


def causal_plan(settings: CausalSettings) -> CausalPlan:
    """Everything that shapes the numbers of a causal run (a rerun with another plan is refused); the names are
    parsed here, once.

    Defaults: the variants the efficient stage has finished in the store; every intervention for them at scope
    "all"; those whose kind is measured per layer (efficient, null, uniform, ablate) at scope "layer"; ablate at
    scope "head" (which heads matter; within one head null:<v> is ablation by construction, (A - E)·T = 0, and
    the layer scope already shows that); the layer and head scopes on `scope_examples` examples spread over the
    store (None: all).
    """
    store, variants, interventions = settings.store, settings.variants, settings.interventions
    layer_interventions, head_interventions = settings.layer_interventions, settings.head_interventions
    scopes = SCOPES if settings.scopes is None else settings.scopes
    minimality_directions = (DEFAULT_MINIMALITY_DIRECTIONS if settings.minimality_directions is None
                             else settings.minimality_directions)
    scope_examples = settings.scope_examples
    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    if variants is not None:
        require_known_variants(variants)
    variants = causal_variants(group, store, variants, interventions)  # default: those the efficient stage finished
    if interventions is None:
        directions = [k for k in minimality_directions if k < layout.head_dim]
        chosen = default_interventions(variants, directions)
    else:
        chosen = parse_interventions(interventions)
    selection = selection_of_group(group)
    return CausalPlan(
        interventions=tuple(chosen),
        scopes=tuple(scopes),
        layer_interventions=tuple(default_layer_interventions(chosen) if layer_interventions is None
                                  else map(Intervention.parse, layer_interventions)),
        head_interventions=tuple(default_head_interventions(chosen) if head_interventions is None
                                 else map(Intervention.parse, head_interventions)),
        scope_examples=None if scope_examples is None else int(scope_examples),
        targets=tuple(targets_for(list(scopes), selection.layers, selection.heads)),  # model indices
        seed=int(settings.seed),
        # what ties the results to the store: weights, corpus, examples, dtype, selection, efficient settings
        store_identity=results_store_identity(group, sorted({item.variant_name for item in chosen if item.variant})),
    )


def recorded_causal_settings(settings: CausalSettings) -> dict[str, Any]:
    """The plan of `causal_plan(settings)` as the results' `settings` attribute records it (the same shape as
    before the settings objects, so that older results stay complete for a rerun of the same command)."""
    return causal_plan(settings).as_attribute()


@flow(name="effattn-causal")
def causal(settings: CausalSettings) -> list[dict[str, Any]]:
    """Re-inject stored attention, efficient attention and controls into the model; write per-example metrics,
    aggregates and the claims table to the results dataset at `results` (the fields of `settings`,
    flows.settings.CausalSettings). Resumable: done shards are skipped.

    `model` overrides the model named in the store (it must have the same weights). `forward_rows` bounds the
    rows of one intervened forward pass (targets x examples; default 64, 8 for next-token stores whose logits
    span the vocabulary) up to 128 positions; longer passes take fewer rows (analysis.causal.rows_per_pass).
    Returns the claims table (analysis.claims).
    """
    use_fast_codec_pipeline()
    store, results, forward_rows = settings.store, settings.results, settings.forward_rows
    plan = causal_plan(settings)
    if forward_rows is None:
        task_name = open_attention_store(store).attrs["extraction"]["task"]
        forward_rows = 8 if task_name == "next-token" else 64
    check_device(settings.device)  # before the lock or any results folder exists
    with hold_store_lock(results, "causal"):  # one writer per results dataset (the store is only read)
        todo = prepare_results(store, results, plan)
        group = open_causal_results(results, mode="r+")
        arguments = (plan, settings.model, settings.device, settings.batch_size, forward_rows)
        run_model_stage_shards(
            settings, todo, causal_shard_on_worker, run_causal_shard,
            lambda shard: (store, results, shard, *arguments),
            lambda shard, inputs: mark_causal_shard_completed(group, shard, inputs), "causal shards",
        )
        return summarise_results(store, results)
