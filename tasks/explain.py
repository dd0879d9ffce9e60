"""The explanation stage, declared (`EXPLAIN_STAGE`, run by tasks.stages.run_stage): choosing the examples, preparing
the results, one shard of explained examples, and the summary.

A shard (`explain_and_write_shard`, given a tasks.stages.ShardJob) reads each example's tokens, stored attention and
efficient attention (preparing refuses store shards that are not complete and current), computes every method's
attributions, faithfulness and rank agreement (analysis.explanations) and the simplex rows' minimality
(analysis.support_minimality), and writes the shard whole (storage_schemas.explanation_results). The runner records
completion after the write, with the identities of the store shards the task read, so that store shards written
again later make the shard stale.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import UTC, datetime
from typing import Any

import numpy as np

from analysis.efficient_attention import VARIANTS
from analysis.example_explanation import explain_example
from analysis.example_identities import keyed_share, seed_keys, share_for_count
from analysis.explainers import ATTENTION_SOURCE, ExplanationSettings, explainer_record, references
from analysis.explanation_claims import explainer_ranking, explanation_claims, faithfulness_comparisons
from analysis.explanations import DIFFERENCE_TOLERANCE, FAITHFULNESS_METRICS, aopc, draw_examples
from analysis.support_minimality import layer_minimality, minimal_share_by_layer
from storage_schemas.attention_store import open_attention_store, store_layout, stored_identities
from storage_schemas.efficient_store import diagnostic_array_path, efficient_array_path
from storage_schemas.explanation_results import (
    EXPLANATION_RESULTS,
    ExplanationResultsError,
    check_same_explanation_settings,
    create_explanation_results,
    explanation_completed_shards,
    explanation_shard_count,
    explanation_shard_inputs,
    explanation_shard_region,
    forget_stale_explanation_shards,
    mark_explanation_shard_completed,
    open_explanation_results,
    require_explanation_inputs,
    write_explanation_aggregates,
    write_explanation_shard,
)
from storage_schemas.results_dataset import results_store_identity, store_grows
from tasks.causal import PROVENANCE_KEYS
from tasks.models import load_store_model
from tasks.stages import ShardJob, Stage, StageRun

logger = logging.getLogger(__name__)

MINIMALITY_VARIANT = "simplex"
KEYED_DRAW = "keyed-share"  # the draw's `selection` in the settings of results of a store that grows


def matrix_sources(methods: list[str]) -> list[str]:
    """The stored matrices the methods read: 'attention' and efficient variants, in VARIANTS order (an efficient
    method reads raw attention too: its testability is measured against it)."""
    parsed = [method for method in map(explainer_record, methods) if method.reads_matrices]
    sources = {method.source for method in parsed} | (
        {ATTENTION_SOURCE} if any(m.is_efficient for m in parsed) else set()
    )
    unknown = sorted(sources - {ATTENTION_SOURCE, *VARIANTS})
    if unknown:
        raise ValueError(
            f"explanation methods read unknown matrices {unknown}: use attention or one of {list(VARIANTS)}"
        )
    return [source for source in (ATTENTION_SOURCE, *VARIANTS) if source in sources]


def efficient_sources(methods: list[str]) -> list[str]:
    """The efficient variants whose stored matrices the methods read, in VARIANTS order."""
    return [source for source in matrix_sources(methods) if source in VARIANTS]


def examples_where_efficient_differs(group, variants: list[str]) -> np.ndarray:
    """[example] bool: every one of `variants` differs from A in the store's last layer (the layer every
    aggregation reads): some head has a null space and ||A - E|| / ||A|| above DIFFERENCE_TOLERANCE, by the stored
    diagnostics. All True without variants."""
    n = store_layout(group).n_examples
    differs = np.ones(n, dtype=bool)
    for variant in variants:
        null_dim = group[diagnostic_array_path(variant, "null_dim")][:, -1, :]
        ratio = group[diagnostic_array_path(variant, "null_norm_ratio")][:, -1, :]
        differs &= ((null_dim > 0) & (ratio > DIFFERENCE_TOLERANCE)).any(-1)
    return differs


def choose_examples(
    store: str, count: int | None, variants: list[str], seed: int, results: str | None = None
) -> tuple[list[int], dict]:
    """`count` examples (None: all) drawn with `seed` from those where every variant's efficient attention differs
    from A (`examples_where_efficient_differs`): only there can an efficient explanation differ from raw attention's.
    Refuses (IncompleteInputError) a store whose extraction, or efficient stage for `variants`, is unfinished (the
    draw reads every example's diagnostics). Returns (store indices, the draw's record: {"asked", "drawn",
    "testable", "not_testable", "rule"}, and for a store that grows "share").

    A store that grows (storage_schemas.results_dataset.store_grows) draws per example: a candidate is explained iff
    its keyed draw (`keyed_share(identity, seed, "explain")`) is below the share that picks `count` of the candidates
    (1.0 for all; analysis.example_identities.share_for_count) fixed when the results at `results` were created
    (their attribute `explain_share`; computed now when they do not exist yet). Growth never changes an earlier
    example's choice: a grown store adds only new ones, about count / candidates of its new candidates."""
    group = open_attention_store(store, mode="r")
    # the draw reads every example's diagnostics: refuse an unfinished store, naming the shards and the commands
    require_explanation_inputs(group, store, range(store_layout(group).n_examples), variants)
    candidates = examples_where_efficient_differs(group, variants)
    growing = store_grows(group.attrs.asdict())
    if growing:
        draws = keyed_share(stored_identities(group), seed, "explain")
        share = recorded_explain_share(results)
        if share is None:
            share = share_for_count(draws[candidates], count)  # `count` of today's candidates
        drawn = np.flatnonzero(candidates & (draws < share))
    else:
        drawn = draw_examples(candidates, count, seed)
    verb = "differs" if len(variants) == 1 else "differ"
    rule = (
        "every example"
        if not variants
        else f"examples where {', '.join(variants)} {verb} from A in the last layer (a head with a null space and "
        f"||A - E|| / ||A|| > {DIFFERENCE_TOLERANCE:g})"
    )
    record = {
        "asked": count,
        "drawn": len(drawn),
        "testable": int(candidates.sum()),
        "not_testable": int((~candidates).sum()),
        "rule": rule,
        **({"share": float(share)} if growing else {}),
    }
    return [int(index) for index in drawn], record


def recorded_explain_share(results: str | None) -> float | None:
    """The share of candidates explained that the explanation results at `results` recorded when they were created
    (None: no results there yet, or results of a store that does not grow)."""
    if results is None:
        return None
    try:
        share = open_explanation_results(results, mode="r").attrs.get("explain_share")
    except ExplanationResultsError:
        return None
    return None if share is None else float(share)


def growing_draw_record(draw: dict) -> dict:
    """What the settings of results of a store that grows record of the draw: what was asked and the rule, not the
    counts, which growth changes (the explained examples are the results' `store_example`, the whole record their
    root attribute `draw`)."""
    return {"asked": draw["asked"], "rule": draw["rule"], "selection": KEYED_DRAW}


def store_identity(store: str, variants: list[str]) -> dict[str, Any]:
    """What ties results to a store: changed weights, corpus or efficient settings make them stale (explanation
    results record no dtype, as they never did)."""
    return results_store_identity(open_attention_store(store, mode="r"), variants, with_dtype=False)


def create_explanations(run: StageRun) -> None:
    """Refuse a store whose shards holding the examples are not extracted, or lack current efficient attention of a
    variant the methods read; create the results dataset of the recorded settings `run.plan`
    (flows.explain.recorded_explanation_settings), or check that it belongs to this run. Settings of a store that
    grows (their draw's `selection` is KEYED_DRAW) list no examples: they are drawn here (`choose_examples`, with the
    share the results recorded), and those the results lack are appended to them (`grow_explanations`); the draw's
    whole record over the store as it is now is the results' root attribute `draw`."""
    store, results, settings = run.store, run.results, run.plan
    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    attributes = group.attrs.asdict()
    variants = efficient_sources(settings["methods"])
    growing = (settings.get("draw") or {}).get("selection") == KEYED_DRAW
    if growing:  # the settings name no examples: they are drawn per example, with the share the results recorded
        examples, draw = choose_examples(store, settings["draw"]["asked"], variants, settings["seed"], results)
    else:
        examples, draw = settings["examples"], None
    require_explanation_inputs(group, store, examples, variants)
    try:
        results_group = open_explanation_results(results, mode="r+")
    except ExplanationResultsError as error:
        if "there are no explanation results" not in str(error):
            raise
        chosen = np.asarray(examples, dtype=np.int64)
        growth = {"store_examples": layout.n_examples, "explain_share": draw["share"], "draw": draw} if growing else {}
        create_explanation_results(
            results,
            methods=[explainer_record(name).stored() for name in settings["methods"]],
            metrics=list(FAITHFULNESS_METRICS),
            percents=settings["percents"],
            references=list(references()),
            examples={
                "store_example": chosen,
                "length": group["length"].get_orthogonal_selection(chosen),
                "label": group["label"].get_orthogonal_selection(chosen),
            },
            layers=layout.layers,
            positions=layout.max_length,
            shard_size=settings["shard_size"],
            attributes={
                **{key: attributes[key] for key in PROVENANCE_KEYS if key in attributes},
                "attention_store": store if "://" in store else os.path.abspath(store),
                "settings": settings,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **growth,
            },
        )
    else:
        check_same_explanation_settings(results_group, results, settings)
        if growing:
            grow_explanations(results_group, group, examples)
            results_group.attrs["draw"] = draw  # the draw over the grown store


def grow_explanations(results_group, store_group, examples) -> None:
    """Append to the explanation results the chosen store examples `examples` they lack (in store order, after the
    ones they hold, which keep their place; storage_schemas.results_dataset.ResultsSchema.grow)."""
    held = results_group["store_example"][:]
    new = np.asarray(sorted(set(int(example) for example in examples) - set(held.tolist())), dtype=np.int64)
    first = EXPLANATION_RESULTS.n_examples(results_group)
    EXPLANATION_RESULTS.grow(
        results_group,
        {
            "store_example": new,
            "length": store_group["length"].get_orthogonal_selection(new) if len(new) else new,
            "label": store_group["label"].get_orthogonal_selection(new) if len(new) else new,
            "example": np.arange(first, first + len(new)),
        },
        store_examples=store_layout(store_group).n_examples,
    )


def compute_explanation_shard(job: ShardJob) -> dict[str, np.ndarray]:
    """Every per-example array of results shard `job.shard_index` under the recorded settings `job.plan`
    (storage_schemas.explanation_results.PER_EXAMPLE_ARRAYS). Writes nothing."""
    settings, forward_rows = job.plan, job.forward_rows
    group = open_attention_store(job.store, mode="r")
    layout = store_layout(group)
    results_group = open_explanation_results(job.results, mode="r")
    region = explanation_shard_region(results_group, job.shard_index)
    examples = np.asarray(results_group["store_example"][region], dtype=np.int64)  # as settings["examples"] lists
    options = ExplanationSettings(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in settings.items()
            if key not in ("store_identity", "draw")
        }
    )
    loaded = load_store_model(group.attrs.asdict(), job.model_override, job.device)
    causal = bool(group.attrs["model"]["causal"])
    sources = matrix_sources(settings["methods"])
    M, K, R, N, P = len(options.methods), len(options.percents), len(references()), len(examples), layout.max_length
    arrays = {
        "faithfulness": np.full((M, len(FAITHFULNESS_METRICS), K, N), np.nan),
        "aopc": np.full((M, len(FAITHFULNESS_METRICS), N), np.nan),
        "kendall_tau": np.full((M, R, N), np.nan),
        "attribution": np.full((M, N, P), np.nan),
        "testable": np.full((M, N), -1),
        "largest_difference": np.full((M, N), np.nan),
        "target": np.full(N, -1),
        "full_probability": np.full(N, np.nan),
        "empty_probability": np.full(N, np.nan),
        "integrated_gradients_delta": np.full(N, np.nan),
        "removable_tokens": np.full(N, -1),
        **{
            name: np.full((N, layout.layers), -1)
            for name in ("minimality_tested", "minimality_minimal", "minimality_untestable")
        },
        "minimality_support_size": np.full((N, layout.layers), np.nan),
    }
    w_out = group["w_out"][:]
    measure_minimality = options.minimality_rows > 0 and MINIMALITY_VARIANT in sources
    norms = any(explainer_record(name).kind == "norms" for name in options.methods)
    # what seeds each example's random draws: its identity in a store that grows, else its store index
    grows = store_grows(group.attrs.asdict())
    keys = seed_keys(group["example_identity"][:])[examples] if grows else examples
    for row, index in enumerate(examples):
        length = int(group["length"][index])
        tokens = group["tokens"][index, :length]
        matrices = {
            source: group["attention" if source == ATTENTION_SOURCE else efficient_array_path(source)][
                index, :, :, :length, :length
            ]
            for source in sources
        }
        value = group["value"][index, :, :, :length] if norms or measure_minimality else None
        null_dims = {
            source: group[diagnostic_array_path(source, "null_dim")][index] for source in sources if source in VARIANTS
        }
        found = explain_example(
            loaded,
            tokens,
            matrices,
            options,
            int(keys[row]),
            causal,
            forward_rows,
            value=value,
            w_out=w_out,
            null_dims=null_dims,
        )
        for metric_index, metric in enumerate(FAITHFULNESS_METRICS):
            arrays["faithfulness"][:, metric_index, :, row] = found.faithfulness[metric]
            arrays["aopc"][:, metric_index, row] = aopc(found.faithfulness[metric])
        arrays["kendall_tau"][:, :, row] = found.kendall_tau
        arrays["attribution"][:, row, :length] = found.attributions
        arrays["target"][row] = found.target
        arrays["full_probability"][row] = found.full_probability
        arrays["empty_probability"][row] = found.empty_probability
        arrays["integrated_gradients_delta"][row] = found.integrated_gradients_delta
        arrays["removable_tokens"][row] = int(found.removable.sum())
        arrays["testable"][:, row] = found.testable
        arrays["largest_difference"][:, row] = found.largest_difference
        if measure_minimality:
            counts = layer_minimality(
                matrices[ATTENTION_SOURCE]
                if ATTENTION_SOURCE in matrices
                else group["attention"][index, :, :, :length, :length],
                matrices[MINIMALITY_VARIANT],
                value,
                w_out,
                options.minimality_rows,
                np.random.default_rng([options.seed, int(keys[row]), 1]),
                options.minimality_tolerance,
            )
            arrays["minimality_tested"][row] = counts["tested"]
            arrays["minimality_minimal"][row] = counts["minimal"]
            arrays["minimality_untestable"][row] = counts["untestable"]
            arrays["minimality_support_size"][row] = counts["support_size"]
    return arrays


def explain_and_write_shard(job: ShardJob) -> dict[str, str]:
    """Compute one shard and write it whole. Returns the identities of the store's shards it read (input name ->
    identity), read before the data: a store shard written again meanwhile gets a new identity, so this shard would
    be stale, not silently wrong. Runs in the driver or on a Dask worker (which keeps the model loaded)."""
    store, results, shard_index = job.store, job.results, job.shard_index
    inputs = explanation_shard_inputs(
        open_explanation_results(results, mode="r"), open_attention_store(store, mode="r"), shard_index
    )
    unfinished = [name for name, identity in inputs.items() if identity is None]
    if unfinished:
        raise ExplanationResultsError(
            f"{store}: the inputs of explanation shard {shard_index} stopped being complete while the explanation "
            f"stage ran ({', '.join(unfinished)}): finish them (`effattn extract` / `effattn efficient`), then run "
            "`effattn explain` again"
        )
    arrays = compute_explanation_shard(job)
    write_explanation_shard(open_explanation_results(results, mode="r+"), shard_index, arrays)
    return inputs


def summarise_explanations(store: str, results: str) -> list[dict[str, Any]]:
    """Write the aggregates and the claims (root attribute `claims`) once every shard is done and current for the
    store; returns the claims."""
    group = open_explanation_results(results, mode="r+")
    done = explanation_completed_shards(group, open_attention_store(store, mode="r"))
    if len(done) < explanation_shard_count(group):
        raise ExplanationResultsError(f"{results} is not complete yet: run `effattn explain` again to finish it")
    per_example_aopc = group["aopc"][:]
    taus = group["kendall_tau"][:]
    testable = group["testable"][:]
    tested, minimal = group["minimality_tested"][:], group["minimality_minimal"][:]
    counted = testable != 0  # an efficient method counts only where its matrices differ from A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a reference that was not run
        aggregates = {
            "mean_aopc": np.nanmean(np.where(counted[:, None], per_example_aopc, np.nan), -1),
            "mean_kendall_tau": np.nanmean(np.where(counted[:, None], taus, np.nan), -1),
            "minimal_share": minimal_share_by_layer(minimal, tested),
        }
        methods, metrics = group["explainer"][:].tolist(), group["metric"][:].tolist()
        seed = int(group.attrs["settings"]["seed"])
        comparisons = faithfulness_comparisons(methods, metrics, per_example_aopc, testable, seed)
        ranking = explainer_ranking(
            methods,
            metrics,
            group["reference"][:].tolist(),
            per_example_aopc,
            taus,
            testable,
            group["length"][:],
            int(group.attrs["model"]["head_dim"]),
            seed,
        )
    write_explanation_aggregates(group, aggregates)
    claims = explanation_claims(comparisons, tested, minimal)
    group.attrs.update(json_safe({"claims": claims, "comparisons": comparisons, "ranking": ranking}))
    return claims


def json_safe(value: Any) -> Any:
    """`value` with every float NaN or infinity as None (zarr attributes are JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def results_shard_count(results_group, store_group) -> int:
    """The explanation results have their own shards (of explained examples)."""
    return explanation_shard_count(results_group)


EXPLAIN_STAGE = Stage(
    name="explain",
    shards="explanation shards",
    prepare=create_explanations,
    open_output=open_explanation_results,
    shard_count=results_shard_count,
    completed_shards=explanation_completed_shards,
    forget_stale_shards=forget_stale_explanation_shards,
    compute_shard=explain_and_write_shard,
    mark_completed=mark_explanation_shard_completed,
    summarise=summarise_explanations,
)
