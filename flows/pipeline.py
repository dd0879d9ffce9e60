"""The whole pipeline as one Prefect flow: (train if needed) -> extract -> efficient -> causal -> report.

Every stage is skipped when its output is already complete for the same inputs (storage_schemas.pipeline_runs),
and resumes where it stopped otherwise. The outputs go under `run_dir`, named after corpus, model and limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger

from analysis.corpora import load_corpus
from analysis.efficient_attention import VARIANTS
from analysis.explainers import default_methods
from analysis.models import has_trained_head
from analysis.run_summary import summarize_variant, summary_table, text_table
from analysis.training import TrainingSettings, head_to_train
from analysis.variants import default_variants
from flows.causal import causal, recorded_causal_settings
from flows.efficient import efficient, stage_default_variants
from flows.explain import explain, recorded_explanation_settings
from flows.extract import extract
from flows.report import report
from flows.settings import CausalSettings, ExplainSettings, ExtractSettings, PipelineSettings, ReportSettings
from storage_schemas.attention_store import attention_store_state, open_attention_store, store_layout
from storage_schemas.causal_results import open_causal_results
from storage_schemas.explanation_results import (
    explanation_results_path,
    explanation_status,
    open_explanation_results,
)
from storage_schemas.pipeline_runs import (
    StageCheck,
    causal_status,
    efficient_status,
    extraction_status,
    generation_name,
    latest_generation,
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
from tasks.dask_cluster import RunCluster, run_cluster, use_stage_cluster
from tasks.extraction import growing_store_model
from tasks.training import train_head

StageSettingsT = TypeVar("StageSettingsT", ExtractSettings, CausalSettings, ExplainSettings)


def head_not_needed_reason(
    corpus: str, model: str, task: str, train: bool, text_column: str | None, label_column: str | None
) -> str | None:
    """Why no head has to be fine-tuned before extraction, or None when one has to (the rule of
    tasks.extraction.prepare_extraction)."""
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
    with `<name>` = `<corpus>-<model>-<limit>[-<digest of the non-default extraction settings>][-g<generation>]`
    (a corpus file or folder grows: later runs append to its store; `retrain` starts the next generation) and
    `-<variants>`
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
    growable = load_corpus(corpus, text_column=text_column, label_column=label_column).growable
    if settings.retrain and not growable:
        raise ValueError(
            f"--retrain starts a new store for a corpus that grows (a file or folder); {corpus} is bundled and never "
            "changes, so its head never needs training again: leave --retrain out"
        )
    unknown = [variant for variant in settings.variants or () if variant not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    # without --variants: those the store's length allows (analysis.variants.default_variants), settled once the
    # store exists; until then those that --max-length allows
    variants = (
        [variant for variant in VARIANTS if variant in settings.variants]
        if settings.variants
        else default_variants(settings.max_length)
    )
    analysis_label = "+".join(variants) if settings.variants and variants != list(VARIANTS) else None
    name = run_name(corpus, model, limit, name_settings)
    if growable:  # stable outputs: later runs append to the newest generation, --retrain starts the next one
        generation = latest_generation(settings.run_dir, name)
        if settings.retrain and attention_store_state(run_paths(settings.run_dir, name).store) != "absent":
            generation += 1
        name = generation_name(name, generation)
    paths = run_paths(settings.run_dir, name, analysis_label)
    store = settings.store or paths.store
    results = settings.results or paths.results
    report_dir = settings.report_dir or paths.report
    run = PipelineRun(
        settings=settings, store=store, results=results, report_dir=report_dir, variants=variants, logger=logger
    )
    with run_cluster(settings.dask_address, settings.workers) as cluster:
        run.cluster = cluster
        if (
            not extraction_check(run).complete
            or not efficient_status(store, variants, run.efficient_settings().recorded()).complete
        ):
            # the efficient stage will run on Dask: its cluster starts meanwhile, its workers import its code
            cluster.start_in_background(["tasks.efficient"])
        for stage in PIPELINE_STAGES:
            run_pipeline_stage(stage, run)
    variants, explanations, stages = run.variants, run.explanations, run.stages

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


@dataclass
class PipelineRun:
    """The state of one `run_pipeline` call that its stages share: the outputs, the variants (settled once the store
    exists), the explanation results (None: not explained), the run's cluster and what each stage did."""

    settings: PipelineSettings
    store: str
    results: str
    report_dir: str
    variants: list[str]
    logger: Any
    cluster: RunCluster | None = None
    explanations: str | None = None
    extraction_model: str = ""
    extraction_split: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def extraction_inputs(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "corpus": settings.corpus,
            "corpus_fingerprint": local_input_fingerprint(settings.corpus),
            "model": settings.model,
            "model_fingerprint": local_input_fingerprint(settings.model),
            "limit": settings.limit,
            **settings.extraction_shape(),
        }

    def efficient_settings(self):
        return self.settings.efficient_settings(self.store, tuple(self.variants))

    def finished(self, stage: str, status: str, started: float | None, detail: str) -> None:
        seconds = round(time.perf_counter() - started, 2) if started is not None else 0.0
        self.stages[stage] = {"status": status, "seconds": seconds, "detail": detail}
        self.logger.info(
            "stage %s: %s%s (%s)", stage, status, f" in {seconds:.1f} s" if status == "ran" else "", detail
        )


@dataclass(frozen=True)
class PipelineStage:
    """A stage of the pipeline, declared: `not_needed(run)` says why it is not run at all (None: it is needed);
    `status(run)` whether its output is complete for this run's inputs (storage_schemas.pipeline_runs), or holds
    other settings (refused with `conflict(run)`); `run_stage(run)` runs it and returns the detail line."""

    name: str
    status: Callable[[PipelineRun], StageCheck]
    run_stage: Callable[[PipelineRun], str]
    not_needed: Callable[[PipelineRun], str | None] = lambda run: None
    conflict: Callable[[PipelineRun], str] = lambda run: ""


def run_pipeline_stage(stage: PipelineStage, run: PipelineRun) -> None:
    """Not needed, conflicting, complete (skipped) or run: the one rule every stage of the pipeline follows."""
    reason = stage.not_needed(run)
    if reason is not None:
        run.finished(stage.name, "not needed", None, reason)
        return
    check = stage.status(run)
    if check.conflicting:
        raise ValueError(stage.conflict(run))
    if check.complete:
        run.finished(stage.name, "skipped", None, check.reason)
        return
    run.logger.info("stage %s needed: %s", stage.name, check.reason)
    started = time.perf_counter()
    detail = stage.run_stage(run)
    run.finished(stage.name, "ran", started, detail)


def extraction_check(run: PipelineRun) -> StageCheck:
    return extraction_status(run.store, run.extraction_inputs(), run.settings.extraction_shape_defaults())


def train_not_needed(run: PipelineRun) -> str | None:
    """Why no head is trained: the extraction is complete (then the stage is skipped), or the rule of
    tasks.extraction.prepare_extraction says none has to be."""
    settings = run.settings
    run.extraction_model, run.extraction_split = settings.model, settings.split
    if extraction_check(run).complete:
        return None
    grows_with = growing_store_model(run.store)
    if grows_with is not None:
        run.extraction_model = grows_with[0]
        run.extraction_split = settings.split or grows_with[1]
        return "the store grows with the model it was made with (--retrain starts a new store)"
    return head_not_needed_reason(
        settings.corpus, settings.model, settings.task, settings.train, settings.text_column, settings.label_column
    )


def train_status(run: PipelineRun) -> StageCheck:
    if extraction_check(run).complete:
        return StageCheck(True, "the extraction is complete")
    return StageCheck(
        False, f"a fine-tuned head for {run.settings.model} on {run.settings.corpus} (trained, or found cached)"
    )


def run_train(run: PipelineRun) -> str:
    settings = run.settings
    training = TrainingSettings(epochs=settings.epochs, max_length=settings.max_length, seed=settings.seed)
    run.extraction_model = train_head(
        settings.model,
        settings.corpus,
        settings.text_column,
        settings.label_column,
        training.as_dict(),
        settings.cache_root,
    )
    run.extraction_split = settings.split or "held_out"
    return f"trained head (or cache hit): {run.extraction_model}"


def run_extract(run: PipelineRun) -> str:
    extract(
        on_run_cluster(
            run.settings.extract_settings(run.store, run.extraction_model, run.extraction_split), run.cluster
        )
    )
    with hold_store_lock(run.store, "pipeline"):
        record_extraction_inputs(run.store, run.extraction_inputs())
    return run.store


def efficient_check(run: PipelineRun) -> StageCheck:
    if not run.settings.variants:  # without --variants: those the store's length allows, now that it exists
        run.variants = stage_default_variants(run.store)
    return efficient_status(run.store, run.variants, run.efficient_settings().recorded())


def run_efficient(run: PipelineRun) -> str:
    efficient(run.efficient_settings().model_copy(update={"dask_address": run.cluster.address()}))
    return f"{', '.join(run.variants)} in {run.store}"


def causal_settings(run: PipelineRun) -> CausalSettings:
    return run.settings.causal_settings(run.store, run.results, tuple(run.variants))


def run_causal(run: PipelineRun) -> str:
    causal(on_run_cluster(causal_settings(run), run.cluster))
    return run.results


def explain_not_needed(run: PipelineRun) -> str | None:
    if not run.settings.explain_examples:
        return "explain_examples is 0"
    captured = selection_of_group(open_attention_store(run.store, mode="r"))
    if not captured.is_everything:  # its attributions roll attention through every layer (flows.explain)
        return f"the store holds {captured.describe()}; explain needs all"
    run.explanations = explanation_results_path(run.results)
    return None


def explain_settings(run: PipelineRun) -> ExplainSettings:
    return run.settings.explain_settings(run.store, run.explanations, tuple(default_methods(run.variants)))


def run_explain(run: PipelineRun) -> str:
    explain(on_run_cluster(explain_settings(run), run.cluster))
    return run.explanations


def report_check(run: PipelineRun) -> StageCheck:
    check = report_status(run.report_dir, run.results)
    if check.complete and run.stages["explain"]["status"] == "ran":  # new explanations, redraw
        return StageCheck(False, "the explanation results were recomputed")
    return check


def run_report(run: PipelineRun) -> str:
    report(ReportSettings(results=run.results, out=run.report_dir, store=run.store, explanations=run.explanations))
    record_report_source(run.report_dir, run.results)
    return run.report_dir


PIPELINE_STAGES = (
    PipelineStage("train", status=train_status, run_stage=run_train, not_needed=train_not_needed),
    PipelineStage("extract", status=extraction_check, run_stage=run_extract),
    PipelineStage("efficient", status=efficient_check, run_stage=run_efficient),
    PipelineStage(
        "causal",
        status=lambda run: causal_status(run.results, recorded_causal_settings(causal_settings(run)), run.store),
        run_stage=run_causal,
        conflict=lambda run: (
            f"{run.results} holds causal results made with other settings (by an earlier effattn version or other "
            "options; its attribute `settings` holds them): delete it to measure again with this run's settings, "
            "or pass --results PATH to keep both"
        ),
    ),
    PipelineStage(
        "explain",
        status=lambda run: explanation_status(
            run.explanations, recorded_explanation_settings(explain_settings(run)), run.store
        ),
        run_stage=run_explain,
        not_needed=explain_not_needed,
        conflict=lambda run: (
            f"{run.explanations} holds explanation results made with other settings: delete it "
            "to explain again with this run's settings, or pass --explain-examples 0"
        ),
    ),
    PipelineStage("report", status=report_check, run_stage=run_report),
)
STAGES = tuple(stage.name for stage in PIPELINE_STAGES)


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
