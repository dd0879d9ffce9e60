"""The four study datasets through the whole pipeline, and one page that answers the claims across them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from analysis.claims import claims_by_study, format_claims_by_study
from analysis.report_html import write_studies_page
from analysis.studies import STUDIES, get_study
from flows.pipeline import run_pipeline
from flows.settings import PipelineSettings, StudiesSettings

# The decoder study is the expensive one on CPU: its simplex variant solves one problem per (head, row prefix)
# (30 layers x 9 heads x 128 rows per example), and each of its intervened forward passes scores the whole
# vocabulary at every position; by default it skips simplex (StudiesSettings.next_token_variants) and the
# minimality probe (one SVD per row prefix of every head: about 0.16 s per head and example on one core) and
# measures every layer at once only.
DEFAULT_SCOPES: dict[str, list[str]] = {"next-token": ["all"]}
DEFAULT_MINIMALITY: dict[str, list[int]] = {"next-token": []}


def study_pipeline_arguments(name: str, limit: int | None, run_dir: str) -> dict[str, Any]:
    """The PipelineSettings fields of study `name` (analysis.studies) that differ between studies."""
    study = get_study(name)
    arguments: dict[str, Any] = {
        "corpus": study.corpus,
        "model": study.model,
        "limit": limit,
        "run_dir": run_dir,
        "max_length": study.max_length,
        "task": study.task,
    }
    if study.training is not None:
        arguments["epochs"] = study.training.epochs  # the head is trained on the train split; held_out extracted
    else:
        arguments["split"] = study.split
    return arguments


@flow(name="effattn-studies")
def run_studies(settings: StudiesSettings) -> dict[str, Any]:
    """Run the pipeline on every study of `settings.studies` (None: all; `limit` held-out examples each, the
    decoder study `next_token_limit` with `next_token_variants`) and write `run_dir/index.html`, the claims of
    SEED.md against every study. Each study's stages are skipped when complete (flows.pipeline).

    Returns {"records": {study: run_pipeline's record}, "claims": analysis.claims.claims_by_study rows,
    "index": path of the page}.
    """
    logger = get_run_logger()
    run_dir = settings.run_dir
    records = {}
    for name in settings.studies or tuple(STUDIES):
        limit = settings.next_token_limit if name == "next-token" else settings.limit
        arguments = study_pipeline_arguments(name, limit, run_dir)
        logger.info("study %s: %s", name, get_study(name).description())
        records[name] = run_pipeline(
            PipelineSettings(
                **arguments,
                variants=settings.next_token_variants if name == "next-token" else None,
                scopes=DEFAULT_SCOPES.get(name),
                minimality_directions=DEFAULT_MINIMALITY.get(name),
                scope_examples=settings.scope_examples,
                workers=settings.workers,
                cache_root=settings.cache_root,
                explain_examples=settings.explain_examples,
            )
        )
    rows = claims_by_study({name: record["claims"] for name, record in records.items()})
    page = write_studies_page(
        run_dir,
        rows,
        {
            name: {
                "description": get_study(name).description(),
                "report": record["report"],
                "examples": record["examples"],
                "comparisons": record["comparisons"],
            }
            for name, record in records.items()
        },
    )
    logger.info("claims across the studies:\n%s", format_claims_by_study(rows, list(records)))
    return {"records": records, "claims": rows, "index": str(Path(page))}
