"""The explanation stage as a Prefect flow: attention store (+ efficient attention) -> explanation results."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from analysis.explainers import default_methods
from flows.preflight import check_device
from flows.settings import ExplainSettings
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.explanation_results import require_explanation_inputs, require_stored_variants
from storage_schemas.selection import require_everything
from tasks.explain import EXPLAIN_STAGE, choose_examples, efficient_sources, growing_draw_record, store_identity
from tasks.stages import StageRun, run_stage


def recorded_explanation_settings(settings: ExplainSettings) -> dict[str, Any]:
    """The run's settings record (analysis.explainers.ExplanationSettings plus the store's identity and the
    draw's record), as the results record it (attribute `settings`; a rerun with other settings is refused).

    Default methods: raw attention and every variant the efficient stage was run for (the store holds
    `efficient/<variant>`), each in every aggregation, their norm-based twins, then the model baselines and random;
    a store without efficient attention is refused (there is nothing to compare). `examples` are drawn with the
    seed from those where every variant read differs from A (tasks.explain.choose_examples; None: all of them). For
    a store that grows the settings record no example list and only what was asked of the draw
    (tasks.explain.growing_draw_record): the examples are drawn per example and the results hold them, so growth
    leaves the settings as they were.
    """
    store, methods = settings.store, settings.methods
    if methods is None:
        group = open_attention_store(store, mode="r")
        require_explanation_inputs(group, store, range(store_layout(group).n_examples), [])  # extraction first
        methods = default_methods(require_stored_variants(group, store))
    methods = list(methods)
    variants = efficient_sources(methods)
    examples, draw = choose_examples(store, settings.examples, variants, settings.seed, settings.results)
    if "share" in draw:  # a store that grows: the results hold the examples, which growth appends to
        chosen = settings.explanation_settings(methods, ())
        return {**chosen.record(), "store_identity": store_identity(store, variants), "draw": growing_draw_record(draw)}
    chosen = settings.explanation_settings(methods, examples)
    return {**chosen.record(), "store_identity": store_identity(store, variants), "draw": draw}


def describe_draw(draw: dict[str, Any]) -> str:
    """One line on which examples are explained, and how many could not be."""
    asked = "every" if draw["asked"] is None else f"{draw['asked']} asked for"
    if "drawn" not in draw:  # the settings of a store that grows (tasks.explain.growing_draw_record)
        return (
            f"explaining the {draw['rule']} ({asked}) whose keyed draw is below the share fixed when the results "
            "were created; a grown store's new examples are added"
        )
    line = (
        f"explaining {draw['drawn']} examples ({asked}) drawn from the {draw['testable']} {draw['rule']}; "
        f"{draw['not_testable']} examples of the store are not testable (there E = A)"
    )
    if draw["asked"] is not None and draw["drawn"] < draw["asked"]:
        line += f"; only {draw['drawn']} exist, so fewer than asked are explained"
    return line


@flow(name="effattn-explain")
def explain(settings: ExplainSettings) -> list[dict[str, Any]]:
    """Token attributions of every method for `examples` examples, their ERASER faithfulness and Kendall τ, and the
    simplex rows' minimality, into the results dataset at `results` (the fields of `settings`,
    flows.settings.ExplainSettings). Resumable: done shards are skipped; other settings into the same results are
    refused; examples in store shards that are unfinished are refused, and shards computed from store shards
    written again since are computed again. `model` overrides the store's model (same
    weights); `forward_rows` bounds the rows of one removal forward pass. With `dask_address` or `workers` each
    pending shard is one Dask task (as in flows.causal). Returns the explanation claims."""
    store, results = settings.store, settings.results
    # a clear error for a store that is not one, or that holds only some layers or heads
    require_everything(open_attention_store(store, mode="r"), store, "explain")
    recorded = recorded_explanation_settings(settings)
    get_run_logger().info(describe_draw(recorded["draw"]))
    check_device(settings.device)  # before the lock or any results folder exists
    return run_stage(
        EXPLAIN_STAGE,
        StageRun(
            store=store,
            results=results,
            plan=recorded,
            model_override=settings.model,
            device=settings.device,
            forward_rows=settings.forward_rows,
            dask_address=settings.dask_address,
            workers=settings.workers,
        ),
    )
