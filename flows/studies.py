"""The four study datasets through the whole pipeline, and one page that answers the claims across them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from analysis.claims import claims_by_study, format_claims_by_study
from analysis.report_html import write_studies_page
from analysis.studies import STUDIES, get_study
from flows.pipeline import run_pipeline

# The decoder study is the expensive one on CPU: its simplex variant solves one problem per (head, row prefix)
# (30 layers x 9 heads x 128 rows per example), and each of its intervened forward passes scores the whole
# vocabulary at every position; by default it skips simplex and the minimality probe (one SVD per row prefix of
# every head: about 0.16 s per head and example on one core) and measures every layer at once only.
DEFAULT_VARIANTS: dict[str, list[str]] = {"next-token": ["effective", "stochastic"]}
DEFAULT_SCOPES: dict[str, list[str]] = {"next-token": ["all"]}
DEFAULT_MINIMALITY: dict[str, list[int]] = {"next-token": []}


def study_pipeline_arguments(name: str, limit: int | None, run_dir: str) -> dict[str, Any]:
    """run_pipeline's arguments for study `name` (analysis.studies)."""
    study = get_study(name)
    arguments: dict[str, Any] = {
        "corpus": study.corpus, "model": study.model, "limit": limit, "run_dir": run_dir,
        "max_length": study.max_length, "task": study.task,
    }
    if study.training is not None:
        arguments["epochs"] = study.training.epochs  # the head is trained on the train split; held_out extracted
    else:
        arguments["split"] = study.split
    return arguments


@flow(name="effattn-studies")
def run_studies(
    studies: Sequence[str] = tuple(STUDIES),
    limit: int | None = 100,
    run_dir: str = "runs/studies",
    variants_of: dict[str, list[str]] | None = None,
    limit_of: dict[str, int] | None = None,
    scope_examples: int | None = 16,
    workers: int | None = None,
    cache_root: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline on every study (`limit` held-out examples each) and write `run_dir/index.html`, the
    claims of SEED.md against every study. Each study's stages are skipped when complete (flows.pipeline).

    variants_of: study -> efficient-attention variants (default DEFAULT_VARIANTS, else all three); limit_of:
    study -> its own limit instead of `limit`.
    Returns {"records": {study: run_pipeline's record}, "claims": analysis.claims.claims_by_study rows,
    "index": path of the page}.
    """
    logger = get_run_logger()
    chosen_variants = {**DEFAULT_VARIANTS, **(variants_of or {})}
    records = {}
    for name in studies:
        arguments = study_pipeline_arguments(name, (limit_of or {}).get(name, limit), run_dir)
        logger.info("study %s: %s", name, get_study(name).description())
        records[name] = run_pipeline(**arguments, variants=chosen_variants.get(name), scopes=DEFAULT_SCOPES.get(name),
                                     minimality_directions=DEFAULT_MINIMALITY.get(name), scope_examples=scope_examples,
                                     workers=workers, cache_root=cache_root)
    rows = claims_by_study({name: record["claims"] for name, record in records.items()})
    page = write_studies_page(run_dir, rows, {
        name: {"description": get_study(name).description(), "report": record["report"],
               "examples": record["examples"]}
        for name, record in records.items()
    })
    logger.info("claims across the studies:\n%s", format_claims_by_study(rows, list(records)))
    return {"records": records, "claims": rows, "index": str(Path(page))}
