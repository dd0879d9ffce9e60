"""The causal stage's work: one Prefect task per shard of examples, plus preparing and summarising the results.

A shard task reads the shard's stored attention, values and efficient attention batch by batch, builds each
intervention's matrices (analysis.interventions), runs the intervened forward passes for every target of the
scopes that intervention is measured at (analysis.causal) and writes the shard's metrics whole
(storage_schemas.causal_results). The driver records completion after the write, so a rerun skips done shards.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from analysis.causal import (
    METRICS,
    Target,
    aggregate_metrics,
    classification_metrics,
    injected_change_ratio,
    intervened_logits,
    measured_examples,
    next_token_metrics,
    plain_logits,
    targets_for,
)
from analysis.claims import REPLAY_TOLERANCE, claims_table, efficient_diagnostics_summary
from analysis.efficient_attention import VARIANTS
from analysis.interventions import Intervention, SharedBases, intervention_matrices
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.causal_results import (
    CausalResultsError,
    causal_completed_shards,
    causal_input_identities,
    check_same_settings,
    create_causal_results,
    forget_stale_causal_shards,
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
from tasks.extraction import retry_on_io_error
from tasks.models import cached_model

logger = logging.getLogger(__name__)

PROVENANCE_KEYS = ("model", "tokenizer", "corpus", "extraction", "max_length", "dtype", "package_versions")


def scope_plan(settings: dict[str, Any]) -> list[tuple[Intervention, list[tuple[str, list[int]]]]]:
    """For every intervention, the scopes it is measured at with the indices of their targets."""
    plan = []
    for name in settings["interventions"]:
        scopes = [
            (scope, [index for index, target in enumerate(settings["targets"]) if target["scope"] == scope])
            for scope in settings["scopes"]
            if name in settings["scope_interventions"][scope]
        ]
        if scopes:
            plan.append((Intervention.parse(name), scopes))
    return plan


def efficient_inputs(settings: dict[str, Any]) -> list[str]:
    """The variants whose stored efficient attention the interventions of `settings` read."""
    return sorted({item.variant for item in map(Intervention.parse, settings["interventions"]) if item.needs_efficient})


def prepare_results(store: str, results: str, settings: dict[str, Any]) -> list[int]:
    """Refuse a store whose extraction or needed efficient attention is unfinished; create the results dataset (or
    check that it belongs to this run) and forget shards measured on store shards written again since; returns the
    shards still to do."""
    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    needed = efficient_inputs(settings)
    unfinished = [variant for variant in needed if efficient_array_path(variant) not in group]
    if unfinished:
        raise CausalResultsError(
            f"{store} lacks finished efficient attention for the variants {unfinished}: run "
            f"`effattn efficient --store {store} --variants {','.join(unfinished)}` first"
        )
    require_causal_inputs(group, store, needed)
    try:
        results_group = open_causal_results(results, mode="r+")
    except CausalResultsError as error:
        if "there are no causal results" not in str(error):
            raise
        attributes = group.attrs.asdict()
        provenance = {key: attributes[key] for key in PROVENANCE_KEYS if key in attributes}
        from datetime import datetime, timezone

        results_group = create_causal_results(
            results,
            interventions=[
                {"name": item.name, "kind": item.kind, "variant": item.variant,
                 "removed_directions": item.removed_directions}
                for item in map(Intervention.parse, settings["interventions"])
            ],
            targets=settings["targets"],
            examples={name: group[name][:] for name in ("source_index", "length", "label")},
            shard_size=layout.shard_size,
            metrics=METRICS,
            attributes={**provenance, "attention_store": store if "://" in store else os.path.abspath(store),
                        "settings": settings,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        )
    else:
        check_same_settings(results_group, results, settings)
        stale = forget_stale_causal_shards(results_group, group)
        if stale:
            logger.warning("%s: causal shards %s were measured on store shards that were unfinished then or "
                           "written again since: measuring them again", results, stale)
    done = set(causal_completed_shards(results_group, group))
    return [shard for shard in range(layout.n_shards) if shard not in done]


def _load_store_model(group, model_override: str | None, device: str):
    attributes = group.attrs.asdict()
    model = attributes["model"]
    task_name = attributes["extraction"]["task"]
    loaded = cached_model(model_override or model["name"], int(model["num_labels"] or 1), device,
                          int(model["head_seed"]), task_name)
    tokenizer = attributes["tokenizer"]
    if (type(loaded.tokenizer).__name__, len(loaded.tokenizer)) != (tokenizer["class"], tokenizer["vocab_size"]):
        raise CausalResultsError(
            f"the tokenizer of {model_override or model['name']} ({type(loaded.tokenizer).__name__}, "
            f"{len(loaded.tokenizer)} tokens) is not the one that wrote the store ({tokenizer['class']}, "
            f"{tokenizer['vocab_size']} tokens): pass --model with the model that wrote the store"
        )
    if loaded.weights_digest != model["weights_digest"]:
        raise CausalResultsError(
            f"the model {model_override or model['name']} has weights digest {loaded.weights_digest[:16]}…, but the "
            f"store was extracted with {model['weights_digest'][:16]}… ({model['name']}): pass --model with the "
            "model that wrote the store"
        )
    return loaded


def compute_causal_shard(
    store: str, results: str, shard_index: int, settings: dict[str, Any], model_override: str | None = None,
    device: str = "cpu", batch_size: int = 16, forward_rows: int = 64,
) -> dict[str, np.ndarray]:
    """Every metric of one shard: {metric: [intervention, target, shard examples]} plus 'injected_change_ratio'
    [intervention, shard examples] and 'original_correct' [shard examples]."""
    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    loaded = _load_store_model(group, model_override, device)
    region = layout.shard_slice(shard_index)
    n_examples = region.stop - region.start
    interventions = [Intervention.parse(name) for name in settings["interventions"]]
    n_targets = len(settings["targets"])
    targets = [Target(item["scope"], item["layer"], item["head"]) for item in settings["targets"]]
    masks = np.stack([target.mask(layout.layers, layout.heads) for target in targets])
    scoped = set(measured_examples(layout.n_examples, settings["scope_examples"]).tolist())
    metrics = {name: np.full((len(interventions), n_targets, n_examples), np.nan, np.float32) for name in METRICS}
    change_ratio = np.full((len(interventions), n_examples), np.nan, np.float32)
    original_correct = np.full(n_examples, np.nan, np.float32)
    plan = scope_plan(settings)
    w_out = group["w_out"][:]
    causal = bool(group.attrs["model"]["causal"])
    next_token = layout.task == "next-token"
    starts = range(region.start, region.stop, batch_size)
    progress = tqdm(total=len(starts) * len(plan), desc=f"causal shard {shard_index}", unit="intervention",
                    leave=False)
    for start in starts:
        stop = min(start + batch_size, region.stop)
        length = group["length"][start:stop]
        size = int(length.max())
        tokens = group["tokens"][start:stop]
        attention = group["attention"][start:stop, :, :, :size, :size]
        value = group["value"][start:stop, :, :, :size]
        stored_logits = group["logits"][start:stop]
        rows = slice(start - region.start, stop - region.start)
        if next_token:
            stored_ids = group["logit_ids"][start:stop]
            original = plain_logits(loaded, tokens, length)
            measure = lambda logits, chosen: next_token_metrics(  # noqa: E731
                original[chosen], stored_logits[chosen], stored_ids[chosen], logits, tokens[chosen], length[chosen])
            original_correct[rows] = measure(original[None], np.arange(stop - start))["correct"][0]
        else:
            label = group["label"][start:stop]
            measure = lambda logits, chosen: classification_metrics(  # noqa: E731
                stored_logits[chosen], stored_logits[chosen], logits, label[chosen])
            original_correct[rows] = measure(torch.as_tensor(stored_logits)[None], np.arange(stop - start))["correct"][0]
        efficient: dict[str, np.ndarray] = {}  # variant -> this batch's stored efficient attention
        shared = SharedBases()  # decompositions the interventions of this batch share
        for intervention, scopes in plan:
            if intervention.needs_efficient and intervention.variant not in efficient:
                efficient[intervention.variant] = group[efficient_array_path(intervention.variant)][
                    start:stop, :, :, :size, :size]
            matrices = intervention_matrices(
                intervention, attention, value, w_out, length, causal, efficient=efficient.get(intervention.variant),
                example_indices=np.arange(start, stop), seed=settings["seed"], shared=shared,
            )
            index = interventions.index(intervention)
            change_ratio[index, rows] = injected_change_ratio(matrices, attention)
            for scope, target_indices in scopes:
                chosen = np.arange(stop - start)
                if scope != "all":  # the layer and head scopes measure the spread subset of examples
                    chosen = np.array([offset for offset in chosen if start + offset in scoped], dtype=np.int64)
                if not len(chosen):
                    continue
                # at most `forward_rows` rows (targets x examples) per forward pass
                for part in range(0, len(chosen), forward_rows):
                    examples = chosen[part:part + forward_rows]
                    copies = max(1, forward_rows // len(examples))
                    for first in range(0, len(target_indices), copies):
                        group_targets = np.asarray(target_indices[first:first + copies])
                        logits = intervened_logits(loaded, tokens[examples], length[examples], matrices[examples],
                                                   masks[group_targets])
                        for name, values in measure(logits, examples).items():
                            metrics[name][index, group_targets[:, None], rows.start + examples[None, :]] = values
            progress.update()
    progress.close()
    return {**metrics, "injected_change_ratio": change_ratio, "original_correct": original_correct}


@task(name="causal-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io_error)
def run_causal_shard(
    store: str, results: str, shard_index: int, settings: dict[str, Any], model_override: str | None,
    device: str, batch_size: int, forward_rows: int,
) -> dict[str, str]:
    """Compute one shard and write it whole (an I/O error is retried: the whole shard is rewritten). Returns the
    identities of the store's shards it read (input name -> identity), read before the data: a shard written again
    meanwhile gets a new identity, so these results would be stale, not silently wrong."""
    inputs = causal_input_identities(open_attention_store(store, mode="r"), efficient_inputs(settings))[shard_index]
    if any(identity is None for identity in inputs.values()):
        raise CausalResultsError(
            f"{store}, shard {shard_index}: its inputs stopped being complete while the causal stage ran "
            f"({', '.join(name for name, identity in inputs.items() if identity is None)}): finish them "
            "(`effattn extract` / `effattn efficient`), then run `effattn causal` again"
        )
    computed = compute_causal_shard(store, results, shard_index, settings, model_override, device, batch_size,
                                    forward_rows)
    group = open_causal_results(results, mode="r+")
    write_causal_shard(
        group, shard_index, {name: computed[name] for name in METRICS}, computed["injected_change_ratio"],
        computed["original_correct"],
    )
    return inputs


def summarise_results(store: str, results: str) -> list[dict[str, Any]]:
    """Write the aggregates and the claims table (root attribute `claims`) once every shard is done; returns the
    claims table."""
    group = open_causal_results(results, mode="r+")
    store_group = open_attention_store(store, mode="r")
    layout = store_layout(store_group)
    if len(causal_completed_shards(group, store_group)) < layout.n_shards:
        raise CausalResultsError(f"{results} is not complete yet: run `effattn causal` again to finish it")
    metrics = {name: group[name][:] for name in METRICS}
    aggregates = aggregate_metrics(metrics)
    write_aggregates(group, aggregates)
    named = set(group["variant"][:].tolist())
    variants = [variant for variant in VARIANTS if variant in named]
    diagnostics = {
        variant: {name: store_group[diagnostic_array_path(variant, name)][:] for name in DIAGNOSTIC_ARRAYS}
        for variant in variants
        if efficient_array_path(variant) in store_group
    }
    summary = efficient_diagnostics_summary(diagnostics, store_group["length"][:])
    claims = claims_table(
        interventions=group["intervention"][:].tolist(),
        targets=group["target"][:].tolist(),
        aggregates=aggregates,
        diagnostics_summary=summary,
        original_accuracy=float(np.nanmean(group["original_correct"][:])),
        replay_tolerance=REPLAY_TOLERANCE[layout.dtype],
    )
    group.attrs.update({"claims": claims, "efficient_diagnostics": summary})
    return claims
