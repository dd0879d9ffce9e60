"""The causal stage, declared (`CAUSAL_STAGE`, run by tasks.stages.run_stage): its plan (`causal_plan`), preparing
the results, one shard's measurement, and the summary.

A shard (`measure_and_write_causal_shard`, given a tasks.stages.ShardJob) reads the shard's stored attention, values
and efficient attention batch by batch (`read_causal_batch`), builds each intervention's matrices
(analysis.interventions), runs the intervened forward passes for every target of the scopes that intervention is
measured at (`measure_batch`, in the groups of analysis.causal.forward_groups), measures them for the store's task
(analysis.causal.BatchMetrics) and writes the shard's metrics whole (storage_schemas.causal_results). The runner
records completion after the write, so a rerun skips done shards. What is run is an analysis.causal.CausalPlan:
interventions are objects here, names only in the results dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from analysis.causal import (
    METRICS,
    SCOPES,
    BatchMetrics,
    CausalBatch,
    CausalPlan,
    aggregate_metric_parts,
    forward_groups,
    injected_change_ratio,
    intervened_logits,
    keyed_scope_examples,
    measured_examples,
    scope_share,
    target_attribute,
    targets_for,
)
from analysis.claims import REPLAY_TOLERANCE, claims_table, efficient_diagnostics_summary_of_parts
from analysis.efficient_attention import VARIANTS
from analysis.example_identities import seed_keys
from analysis.interventions import (
    DEFAULT_MINIMALITY_DIRECTIONS,
    Intervention,
    SharedBases,
    default_head_interventions,
    default_interventions,
    default_layer_interventions,
    intervention_matrices,
    parse_interventions,
)
from analysis.key_bands import KeyBand, store_key_bands
from analysis.models import LoadedModel
from analysis.variants import require_known_variants
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    open_attention_store,
    store_layout,
    stored_identities,
)
from storage_schemas.causal_results import (
    CAUSAL_RESULTS,
    CausalResultsError,
    causal_completed_shards,
    causal_input_identities,
    causal_variants,
    check_same_settings,
    create_causal_results,
    forget_stale_causal_shards,
    mark_causal_shard_completed,
    open_causal_results,
    require_causal_inputs,
    write_aggregates,
    write_causal_shard,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    diagnostic_array_path,
    efficient_array_path,
)
from storage_schemas.results_dataset import results_store_identity, store_grows
from storage_schemas.selection import StoreSelection, selection_of_group
from tasks.models import load_store_model
from tasks.stages import ShardJob, Stage, StageRun

if TYPE_CHECKING:
    from flows.settings import CausalSettings

logger = logging.getLogger(__name__)

PROVENANCE_KEYS = ("model", "tokenizer", "corpus", "extraction", "max_length", "dtype", "package_versions")


def causal_plan(settings: CausalSettings) -> CausalPlan:
    """Everything that shapes the numbers of a causal run (a rerun with another plan is refused); the names are
    parsed here, once.

    Defaults: the variants the efficient stage has finished in the store; every intervention for them at scope
    "all"; those whose kind is measured per layer (efficient, null, uniform, ablate) at scope "layer"; ablate at
    scope "head" (which heads matter; within one head null:<v> is ablation by construction, (A - E)·T = 0, and
    the layer scope already shows that); the layer and head scopes on `scope_examples` examples spread over the
    store (None: all). In a store that grows they measure the examples whose keyed draw is below the share that
    picks `scope_examples` of them when the results are created (analysis.causal.scope_share), fixed then
    (`scoped_examples`): growth never changes an earlier example's choice, and the plan stays the same.
    """
    store, variants, interventions = settings.store, settings.variants, settings.interventions
    layer_interventions, head_interventions = settings.layer_interventions, settings.head_interventions
    scopes = SCOPES if settings.scopes is None else settings.scopes
    minimality_directions = (
        DEFAULT_MINIMALITY_DIRECTIONS if settings.minimality_directions is None else settings.minimality_directions
    )
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
        layer_interventions=tuple(
            default_layer_interventions(chosen)
            if layer_interventions is None
            else map(Intervention.parse, layer_interventions)
        ),
        head_interventions=tuple(
            default_head_interventions(chosen)
            if head_interventions is None
            else map(Intervention.parse, head_interventions)
        ),
        scope_examples=None if scope_examples is None else int(scope_examples),
        targets=tuple(targets_for(list(scopes), selection.layers, selection.heads)),  # model indices
        seed=int(settings.seed),
        # what ties the results to the store: weights, corpus, examples, dtype, selection, efficient settings
        store_identity=results_store_identity(group, sorted({item.variant_name for item in chosen if item.variant})),
    )


def create_results(run: StageRun) -> None:
    """Refuse a store whose extraction or needed efficient attention is unfinished; create the results dataset of
    `run.plan` (an analysis.causal.CausalPlan), or check that it belongs to this run."""
    store, results, plan = run.store, run.results, run.plan
    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    require_causal_inputs(group, store, plan.efficient_variants())
    attributes = group.attrs.asdict()
    grows = store_grows(attributes)
    try:
        results_group = open_causal_results(results, mode="r+")
    except CausalResultsError as error:
        if "there are no causal results" not in str(error):
            raise
        provenance = {key: attributes[key] for key in PROVENANCE_KEYS if key in attributes}
        growth = (
            {
                "store_examples": layout.n_examples,
                "scope_share": scope_share(stored_identities(group), plan.seed, plan.scope_examples),
            }
            if grows
            else {}
        )
        create_causal_results(
            results,
            interventions=[item.results_row() for item in plan.interventions],
            targets=[target_attribute(target) for target in plan.targets],
            examples={name: group[name][:] for name in ("source_index", "length", "label")},
            shard_size=layout.shard_size,
            metrics=METRICS,
            attributes={
                **provenance,
                "attention_store": store if "://" in store else os.path.abspath(store),
                "settings": plan.as_attribute(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **growth,
            },
        )
    else:
        check_same_settings(results_group, results, plan.as_attribute())
        if grows:
            grow_causal_results(results_group, group)


def grow_causal_results(results_group, store_group) -> None:
    """Append to the causal results the examples the store added since they were computed (their shards are then
    pending; the old partial shard is forgotten, storage_schemas.results_dataset.ResultsSchema.grow)."""
    held, n_examples = CAUSAL_RESULTS.n_examples(results_group), store_layout(store_group).n_examples
    new = slice(held, n_examples)
    CAUSAL_RESULTS.grow(
        results_group,
        {
            "example": np.arange(held, n_examples),
            **{name: store_group[name][new] for name in ("source_index", "length", "label")},
        },
        store_examples=n_examples,
    )


def scoped_examples(store_group, results_group, region: slice, plan: CausalPlan) -> set[int]:
    """The store indices, among `region`, of the examples measured at the layer and head scopes: in results of a
    store that grows (they record `scope_share`), those whose keyed draw is below the share
    (analysis.causal.keyed_scope_examples: growth never changes an earlier example's choice); otherwise
    `plan.scope_examples` spread evenly over the store (analysis.causal.measured_examples)."""
    share = results_group.attrs.get("scope_share")
    if share is None:
        return set(measured_examples(store_layout(store_group).n_examples, plan.scope_examples).tolist())
    chosen = keyed_scope_examples(store_group["example_identity"][region], plan.seed, float(share))
    return set((chosen + region.start).tolist())


def read_causal_batch(group, start: int, stop: int, task: str, variants: Sequence[str]) -> CausalBatch:
    """Examples start..stop-1 of the attention store `group` (a zarr group, or any mapping of its array paths to
    arrays) with the stored efficient attention of `variants`, trimmed to the batch's longest example."""
    length = np.asarray(group["length"][start:stop])
    size = int(length.max())
    return CausalBatch(
        start=start,
        tokens=np.asarray(group["tokens"][start:stop]),
        length=length,
        attention=np.asarray(group["attention"][start:stop, :, :, :size, :size]),
        value=np.asarray(group["value"][start:stop, :, :, :size]),
        stored_logits=np.asarray(group["logits"][start:stop]),
        label=np.asarray(group["label"][start:stop]) if task != "next-token" else None,
        stored_logit_ids=np.asarray(group["logit_ids"][start:stop]) if task == "next-token" else None,
        efficient={
            variant: np.asarray(group[efficient_array_path(variant)][start:stop, :, :, :size, :size])
            for variant in variants
        },
        noise_keys=noise_keys(group, slice(start, stop)),
    )


def noise_keys(group, examples: slice) -> np.ndarray | None:
    """[examples] what seeds the noise of `examples` of the store `group`: in a store that grows, their identities
    (analysis.example_identities.seed_keys: the same noise in any store holding them, whatever their index);
    None (their store indices) otherwise."""
    if not hasattr(group, "attrs") or not store_grows(group.attrs.asdict()):
        return None
    return seed_keys(np.asarray(group["example_identity"][examples]))


def measure_batch(
    loaded: LoadedModel,
    batch: CausalBatch,
    plan: CausalPlan,
    batch_metrics: BatchMetrics,
    w_out: np.ndarray,
    causal: bool,
    scoped: set[int],
    forward_rows: int,
    on_intervention: Callable[[], Any] | None = None,
    key_bands: Sequence[KeyBand] | None = None,
    selection: StoreSelection | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every planned intervention of one batch, injected at every target of its scopes, `forward_rows` rows
    (targets x examples) at most per forward pass.

    w_out: [layer, head, head_dim, hidden]; scoped: the store indices of the examples the layer and head scopes
    measure (analysis.causal.measured_examples). Returns ({metric: [intervention, target, batch]},
    injected_change_ratio [intervention, batch]), NaN where not measured; calls `on_intervention()` after each
    intervention. key_bands: per layer, the keys each query sees (analysis.key_bands; None: the prefix rule).
    selection: the model layers and heads the store holds (None: all of them); injection goes into those."""
    shape = (len(plan.interventions), len(plan.targets), len(batch.length))
    measured = {name: np.full(shape, np.nan, np.float32) for name in METRICS}
    change_ratio = np.full((shape[0], shape[2]), np.nan, np.float32)
    if selection is None:
        selection = StoreSelection.everything(w_out.shape[0], w_out.shape[1], batch.value.shape[2])
    masks = plan.target_masks(selection.layers, selection.heads)  # [target, stored layer, stored head]
    shared = SharedBases()  # decompositions the interventions of this batch share
    for intervention, scopes in plan.scope_plan():
        matrices = intervention_matrices(
            intervention,
            batch.attention,
            batch.value,
            w_out,
            batch.length,
            causal,
            efficient=batch.efficient.get(intervention.variant_name),
            example_indices=batch.seed_keys,  # what seeds each example's noise
            seed=plan.seed,
            shared=shared,
            key_bands=key_bands,
        )
        index = plan.interventions.index(intervention)
        change_ratio[index] = injected_change_ratio(matrices, batch.attention)
        for scope, target_indices in scopes:
            for examples, targets in forward_groups(
                batch.examples_at(scope, scoped), target_indices, forward_rows, batch.length
            ):
                logits = intervened_logits(
                    loaded,
                    batch.tokens[examples],
                    batch.length[examples],
                    matrices[examples],
                    masks[targets],
                    selection.layers,
                    selection.heads,
                )
                for name, values in batch_metrics.measure(logits, examples).items():
                    measured[name][index, targets[:, None], examples[None, :]] = values
        if on_intervention is not None:
            on_intervention()
    return measured, change_ratio


def compute_causal_shard(job: ShardJob) -> dict[str, np.ndarray]:
    """Every metric of shard `job.shard_index` under `job.plan` (an analysis.causal.CausalPlan): {metric:
    [intervention, target, shard examples]} plus 'injected_change_ratio' [intervention, shard examples] and
    'original_correct' [shard examples]. Writes nothing."""
    plan, batch_size, shard_index = job.plan, job.batch_size, job.shard_index
    group = open_attention_store(job.store, mode="r")
    layout = store_layout(group)
    loaded = load_store_model(group.attrs.asdict(), job.model_override, job.device)
    region = layout.shard_slice(shard_index)
    n_examples = region.stop - region.start
    shape = (len(plan.interventions), len(plan.targets), n_examples)
    metrics = {name: np.full(shape, np.nan, np.float32) for name in METRICS}
    change_ratio = np.full((shape[0], n_examples), np.nan, np.float32)
    original_correct = np.full(n_examples, np.nan, np.float32)
    planned = plan.scope_plan()
    variants = sorted({item.variant_name for item, _ in planned if item.needs_efficient})
    scoped = scoped_examples(group, open_causal_results(job.results, mode="r"), region, plan)
    w_out = group["w_out"][:]
    causal = bool(group.attrs["model"]["causal"])
    selection = selection_of_group(group)
    key_bands = store_key_bands(group.attrs["model"], selection.layers)  # the noise stays on the keys each query sees
    starts = range(region.start, region.stop, batch_size)
    progress = tqdm(
        total=len(starts) * len(planned), desc=f"causal shard {shard_index}", unit="intervention", leave=False
    )
    for start in starts:
        batch = read_causal_batch(group, start, min(start + batch_size, region.stop), layout.task, variants)
        rows = slice(start - region.start, start - region.start + len(batch.length))
        batch_metrics = BatchMetrics.for_batch(loaded, batch, layout.task)
        original_correct[rows] = batch_metrics.original_correct()
        measured, ratio = measure_batch(
            loaded,
            batch,
            plan,
            batch_metrics,
            w_out,
            causal,
            scoped,
            job.forward_rows,
            on_intervention=progress.update,
            key_bands=key_bands,
            selection=selection,
        )
        for name in METRICS:
            metrics[name][:, :, rows] = measured[name]
        change_ratio[:, rows] = ratio
    progress.close()
    return {**metrics, "injected_change_ratio": change_ratio, "original_correct": original_correct}


def measure_and_write_causal_shard(job: ShardJob) -> dict[str, str]:
    """Compute one shard and write it whole. Returns the identities of the store's shards it read (input name ->
    identity), read before the data: a shard written again meanwhile gets a new identity, so these results would
    be stale, not silently wrong. Runs in the driver or on a Dask worker (which keeps the model loaded)."""
    store, shard_index = job.store, job.shard_index
    inputs = causal_input_identities(open_attention_store(store, mode="r"), job.plan.efficient_variants())[shard_index]
    if any(identity is None for identity in inputs.values()):
        raise CausalResultsError(
            f"{store}, shard {shard_index}: its inputs stopped being complete while the causal stage ran "
            f"({', '.join(name for name, identity in inputs.items() if identity is None)}): finish them "
            "(`effattn extract` / `effattn efficient`), then run `effattn causal` again"
        )
    computed = compute_causal_shard(job)
    group = open_causal_results(job.results, mode="r+")
    write_causal_shard(
        group,
        shard_index,
        {name: computed[name] for name in METRICS},
        computed["injected_change_ratio"],
        computed["original_correct"],
    )
    return inputs


# Examples read at once by the summary of a causal run (whole shards of the store).
SUMMARY_PART_EXAMPLES = 128


def summary_parts(layout: AttentionStoreLayout) -> list[slice]:
    """The store's examples as consecutive runs of whole shards, about SUMMARY_PART_EXAMPLES each (a few MiB of
    per-example metrics)."""
    step = max(1, SUMMARY_PART_EXAMPLES // layout.shard_size) * layout.shard_size
    return [slice(start, min(start + step, layout.n_examples)) for start in range(0, layout.n_examples, step)]


def summarise_results(store: str, results: str) -> list[dict[str, Any]]:
    """Write the aggregates and the claims table (root attribute `claims`) once every shard is done; returns the
    claims table."""
    group = open_causal_results(results, mode="r+")
    store_group = open_attention_store(store, mode="r")
    layout = store_layout(store_group)
    if len(causal_completed_shards(group, store_group)) < layout.n_shards:
        raise CausalResultsError(f"{results} is not complete yet: run `effattn causal` again to finish it")
    parts = summary_parts(layout)  # a hundred examples or so at a time: the driver's memory stays flat
    aggregates = aggregate_metric_parts({name: group[name][:, :, part] for name in METRICS} for part in parts)
    write_aggregates(group, aggregates)
    named = set(group["variant"][:].tolist())
    variants = [variant for variant in VARIANTS if variant in named]
    stored = [variant for variant in variants if efficient_array_path(variant) in store_group]

    def diagnostics_of(part: slice) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
        return (
            {
                variant: {name: store_group[diagnostic_array_path(variant, name)][part] for name in DIAGNOSTIC_ARRAYS}
                for variant in stored
            },
            store_group["length"][part],
        )

    summary = efficient_diagnostics_summary_of_parts(diagnostics_of(part) for part in parts)
    claims = claims_table(
        interventions=parse_interventions(group["intervention"][:].tolist()),
        targets=group["target"][:].tolist(),
        aggregates=aggregates,
        diagnostics_summary=summary,
        original_accuracy=float(np.nanmean(group["original_correct"][:])),
        replay_tolerance=REPLAY_TOLERANCE[layout.dtype],
    )
    group.attrs.update({"claims": claims, "efficient_diagnostics": summary})
    return claims


def store_shard_count(results_group, store_group) -> int:
    """The causal results have one shard per shard of the store."""
    return store_layout(store_group).n_shards


CAUSAL_STAGE = Stage(
    name="causal",
    shards="causal shards",
    prepare=create_results,
    open_output=open_causal_results,
    shard_count=store_shard_count,
    completed_shards=causal_completed_shards,
    forget_stale_shards=forget_stale_causal_shards,
    compute_shard=measure_and_write_causal_shard,
    mark_completed=mark_causal_shard_completed,
    summarise=summarise_results,
)
