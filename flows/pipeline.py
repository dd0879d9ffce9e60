"""The whole pipeline as one Prefect flow: (train if needed) -> extract -> efficient -> causal -> report.

Every stage is skipped when its output is already complete for the same inputs (storage_schemas.pipeline_runs),
and resumes where it stopped otherwise. The outputs go under `run_dir`, named after corpus, model and limit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger

from analysis.corpora import load_corpus
from analysis.efficient_attention import VARIANTS
from analysis.models import has_trained_head
from analysis.run_summary import summarize_variant, summary_table, text_table
from analysis.training import TrainingSettings, head_to_train
from analysis.variants import default_variants
from flows.causal import causal, recorded_causal_settings
from flows.efficient import efficient, stage_default_variants
from flows.extract import extract
from flows.report import report
from flows.settings import CausalSettings, ExplainSettings, ExtractSettings, PipelineSettings, ReportSettings
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.causal_results import open_causal_results
from storage_schemas.pipeline_runs import (
    causal_status,
    efficient_status,
    extraction_status,
    local_input_fingerprint,
    read_diagnostics,
    record_extraction_inputs,
    record_report_source,
    report_status,
    run_name,
    run_paths,
)
from storage_schemas.selection import selection_of_group
from storage_schemas.store_lock import hold_store_lock
from analysis.explainers import default_methods
from flows.explain import explain, recorded_explanation_settings
from storage_schemas.explanation_results import (
    explanation_results_path,
    explanation_status,
    open_explanation_results,
)
from storage_schemas.pipeline_runs import StageCheck
from tasks.dask_cluster import RunCluster, run_cluster, use_stage_cluster
from tasks.training import train_head

StageSettingsT = TypeVar("StageSettingsT", ExtractSettings, CausalSettings, ExplainSettings)

STAGES = ("train", "extract", "efficient", "causal", "explain", "report")


def head_not_needed_reason(corpus: str, model: str, task: str, train: bool, text_column: str | None,
                           label_column: str | None) -> str | None:
    """Why no head has to be fine-tuned before extraction, or None when one has to (the rule of flows.extract)."""
    if not train:
        return "training switched off (random head)"
    if task != "classification":
        return f"task {task} needs no classifier"
    if has_trained_head(model):
        return "the model has a trained head"
    if not head_to_train(load_corpus(corpus, text_column=text_column, label_column=label_column), task, train, False):
        return "the corpus is unlabelled"  # a single-class corpus is refused by head_to_train
    return None


@flow(name="effattn-pipeline")
def run_pipeline(settings: PipelineSettings) -> dict[str, Any]:
    """Run every stage on `corpus` x `model` (`limit` examples; None for all) and return what happened; the names
    are the fields of `settings` (flows.settings.PipelineSettings).

    Outputs (storage_schemas.pipeline_runs.run_paths): the attention store `<run_dir>/<name>.zarr`, the causal
    results `<run_dir>/<name>[-<variants>].results.zarr` and the report `<run_dir>/<name>[-<variants>]-report`,
    with `<name>` = `<corpus>-<model>-<limit>[-<digest of the non-default extraction settings and, for a corpus
    file, of its content>]` and `-<variants>`
    (e.g. `-effective+simplex`) only when not all variants are asked for; `store`, `results` and `report_dir`
    override them. The extraction settings and the efficient ones mean what they mean in flows.extract.extract
    and flows.efficient.efficient; `variants` None means all of them.

    Returns {"store", "results", "report" (index.html), "stages": {stage: {"status", "seconds", "detail"}},
    "efficient_summary": {variant: analysis.run_summary.summarize_variant(...)}, "claims": the claims table
    (analysis.claims)}, where status is "ran", "skipped" (output complete for the same inputs) or "not needed"
    (train only). `scope_examples`, `scopes` (default all, layer, head) and `minimality_directions` (default
    flows.causal's) are flows.causal.causal's. `explain_examples` examples are explained (flows.explain; 0: not
    run) into `<name>[-<variants>].explanations.zarr`, and their claims join the claims table.
    """
    logger = get_run_logger()
    corpus, model, limit = settings.corpus, settings.model, settings.limit
    text_column, label_column = settings.text_column, settings.label_column
    name_settings = settings.non_default_extraction_shape()
    if local_input_fingerprint(corpus) is not None:
        # a user file: each content gets its own store (a scheduled run over a file that grows writes a new one)
        name_settings["corpus_digest"] = load_corpus(corpus, text_column=text_column, label_column=label_column).digest
    unknown = [variant for variant in settings.variants or () if variant not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    # without --variants: those the store's length allows (analysis.variants.default_variants), settled once the
    # store exists; until then those that --max-length allows
    variants = ([variant for variant in VARIANTS if variant in settings.variants] if settings.variants
                else default_variants(settings.max_length))
    analysis_label = "+".join(variants) if settings.variants and variants != list(VARIANTS) else None
    paths = run_paths(settings.run_dir, run_name(corpus, model, limit, name_settings), analysis_label)
    store = settings.store or paths.store
    results = settings.results or paths.results
    report_dir = settings.report_dir or paths.report
    stages: dict[str, dict[str, Any]] = {}

    def finished(stage: str, status: str, started: float | None, detail: str) -> None:
        seconds = round(time.perf_counter() - started, 2) if started is not None else 0.0
        stages[stage] = {"status": status, "seconds": seconds, "detail": detail}
        logger.info("stage %s: %s%s (%s)", stage, status, f" in {seconds:.1f} s" if status == "ran" else "", detail)

    with run_cluster(settings.dask_address, settings.workers) as cluster:
        # --- train (if needed) and extract ---
        extraction_inputs = {
            "corpus": corpus, "corpus_fingerprint": local_input_fingerprint(corpus),
            "model": model, "model_fingerprint": local_input_fingerprint(model), "limit": limit,
            **settings.extraction_shape(),
        }
        check = extraction_status(store, extraction_inputs, settings.extraction_shape_defaults())
        efficient_settings = settings.efficient_settings(store, tuple(variants))
        if not check.complete or not efficient_status(store, variants, efficient_settings.recorded()).complete:
            # the efficient stage will run on Dask: its cluster starts meanwhile, its workers import its code
            cluster.start_in_background(["tasks.efficient"])
        if check.complete:
            finished("train", "skipped", None, "the extraction is complete")
            finished("extract", "skipped", None, check.reason)
        else:
            logger.info("stage extract needed: %s", check.reason)
            extraction_model, extraction_split = model, settings.split
            reason = head_not_needed_reason(corpus, model, settings.task, settings.train, text_column, label_column)
            if reason is None:
                logger.info("stage train needed: a fine-tuned head for %s on %s (trained, or found cached)", model,
                            corpus)
                started = time.perf_counter()
                training = TrainingSettings(epochs=settings.epochs, max_length=settings.max_length, seed=settings.seed)
                extraction_model = train_head(model, corpus, text_column, label_column, training.as_dict(),
                                              settings.cache_root)
                extraction_split = settings.split or "held_out"
                finished("train", "ran", started, f"trained head (or cache hit): {extraction_model}")
            else:
                finished("train", "not needed", None, reason)
            started = time.perf_counter()
            extract(on_run_cluster(settings.extract_settings(store, extraction_model, extraction_split),
                                   cluster))
            with hold_store_lock(store, "pipeline"):
                record_extraction_inputs(store, extraction_inputs)
            finished("extract", "ran", started, store)

        # --- efficient ---
        if not settings.variants:
            variants = stage_default_variants(store)
            efficient_settings = settings.efficient_settings(store, tuple(variants))
        check = efficient_status(store, variants, efficient_settings.recorded())
        if check.complete:
            finished("efficient", "skipped", None, check.reason)
        else:
            logger.info("stage efficient needed: %s", check.reason)
            started = time.perf_counter()
            efficient(efficient_settings.model_copy(update={"dask_address": cluster.address()}))
            finished("efficient", "ran", started, f"{', '.join(variants)} in {store}")

        # --- causal ---
        causal_stage = settings.causal_settings(store, results, tuple(variants))
        check = causal_status(results, recorded_causal_settings(causal_stage), store)
        if check.conflicting:
            raise ValueError(
                f"{results} holds causal results made with other settings (by an earlier effattn version or other "
                "options; its attribute `settings` holds them): delete it to measure again with this run's settings, "
                "or pass --results PATH to keep both"
            )
        if check.complete:
            finished("causal", "skipped", None, check.reason)
        else:
            logger.info("stage causal needed: %s", check.reason)
            started = time.perf_counter()
            causal(on_run_cluster(causal_stage, cluster))
            finished("causal", "ran", started, results)

        # --- explain ---
        explanations = explanation_results_path(results) if settings.explain_examples else None
        captured = selection_of_group(open_attention_store(store, mode="r"))
        if explanations is None:
            finished("explain", "not needed", None, "explain_examples is 0")
        elif not captured.is_everything:  # its attributions roll attention through every layer (flows.explain)
            explanations = None
            finished("explain", "not needed", None, f"the store holds {captured.describe()}; explain needs all")
        else:
            explain_stage = settings.explain_settings(store, explanations, tuple(default_methods(variants)))
            check = explanation_status(explanations, recorded_explanation_settings(explain_stage), store)
            if check.conflicting:
                raise ValueError(f"{explanations} holds explanation results made with other settings: delete it to "
                                 "explain again with this run's settings, or pass --explain-examples 0")
            if check.complete:
                finished("explain", "skipped", None, check.reason)
            else:
                logger.info("stage explain needed: %s", check.reason)
                started = time.perf_counter()
                explain(on_run_cluster(explain_stage, cluster))
                finished("explain", "ran", started, explanations)

        # --- report ---
        check = report_status(report_dir, results)
        if check.complete and stages["explain"]["status"] == "ran":  # new explanations, redraw
            check = StageCheck(False, "the explanation results were recomputed")
        if check.complete:
            finished("report", "skipped", None, check.reason)
        else:
            logger.info("stage report needed: %s", check.reason)
            started = time.perf_counter()
            report(ReportSettings(results=results, out=report_dir, store=store, explanations=explanations))
            record_report_source(report_dir, results)
            finished("report", "ran", started, report_dir)

    summaries = {variant: summarize_variant(read_diagnostics(store, variant)) for variant in variants}
    record = {
        "store": store,
        "results": results,
        "report": str(Path(report_dir) / "index.html"),
        "stages": stages,
        "efficient_summary": summaries,
        "claims": open_causal_results(results).attrs["claims"]
        + (open_explanation_results(explanations).attrs["claims"] if explanations else []),
        "explanations": explanations,
        "comparisons": open_explanation_results(explanations).attrs.get("comparisons", []) if explanations else [],
        "examples": store_layout(open_attention_store(store)).n_examples,
    }
    logger.info("pipeline finished:\n%s\n\n%s", stage_table(record), summary_table(summaries))
    return record


def on_run_cluster(stage_settings: StageSettingsT, cluster: RunCluster) -> StageSettingsT:
    """`stage_settings` of a stage that runs in this process unless given a cluster (extract, causal, explain), sent
    to the run's cluster when the run was given one (--dask-address or --workers)."""
    if not use_stage_cluster(stage_settings.dask_address, stage_settings.workers):
        return stage_settings
    return stage_settings.model_copy(update={"dask_address": cluster.address()})


def stage_table(record: dict[str, Any]) -> str:
    """The stages of a `run_pipeline` record as a text table: stage, status, seconds, detail."""
    rows = [
        [stage, entry["status"], f"{entry['seconds']:.1f}" if entry["status"] == "ran" else "-", entry["detail"]]
        for stage, entry in record["stages"].items()
    ]
    return text_table(["stage", "status", "seconds", "detail"], rows)
