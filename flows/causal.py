"""The causal stage as a Prefect flow: attention store (+ efficient attention) -> causal results dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.preflight import check_device
from flows.settings import CausalSettings
from storage_schemas.attention_store import open_attention_store, use_fast_codec_pipeline
from tasks.causal import CAUSAL_STAGE, causal_plan
from tasks.stages import StageRun, run_stage


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
    span the vocabulary). Returns the claims table (analysis.claims).
    """
    use_fast_codec_pipeline()
    store, results, forward_rows = settings.store, settings.results, settings.forward_rows
    plan = causal_plan(settings)
    if forward_rows is None:
        task_name = open_attention_store(store).attrs["extraction"]["task"]
        forward_rows = 8 if task_name == "next-token" else 64
    check_device(settings.device)  # before the lock or any results folder exists
    return run_stage(
        CAUSAL_STAGE,
        StageRun(
            store=store,
            results=results,
            plan=plan,
            model_override=settings.model,
            device=settings.device,
            batch_size=settings.batch_size,
            forward_rows=forward_rows,
            dask_address=settings.dask_address,
            workers=settings.workers,
        ),
    )
