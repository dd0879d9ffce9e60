"""The efficient stage as a Prefect flow: attention store -> efficient attention + diagnostics (Dask tasks per shard,
and per layer of a shard for the simplex variant; tasks/efficient.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from analysis.variants import default_variants, left_out_by_default, require_known_variants
from flows.settings import EfficientSettings
from storage_schemas.attention_store import open_attention_store, store_layout, use_fast_codec_pipeline
from tasks.efficient import EfficientWork, efficient_stage
from tasks.stages import StageRun, run_stage


@flow(name="effattn-efficient")
def efficient(settings: EfficientSettings) -> str:
    """Compute the efficient-attention `settings.variants` (None: every registered variant that the store's length
    allows, analysis.variants.default_variants) of every shard of the store at
    `settings.store` on a Dask cluster (`dask_address`, or a LocalCluster of `workers` processes). Resumable:
    finished shards are skipped. Returns the store's URL."""
    use_fast_codec_pipeline()
    variants = settings.variants
    if variants is None:
        variants = stage_default_variants(settings.store)
    require_known_variants(variants)
    return run_stage(
        efficient_stage(variants),
        StageRun(
            store=settings.store,
            results=settings.store,
            plan=EfficientWork(tuple(variants), settings.recorded()),
            dask_address=settings.dask_address,
            workers=settings.workers,
        ),
    )


def stage_default_variants(store: str) -> list[str]:
    """The variants computed by default for the store at `store` (analysis.variants.default_variants of its
    length); says in the run's log which it leaves out and why."""
    positions = store_layout(open_attention_store(store, mode="r")).max_length
    reason = left_out_by_default(positions)
    if reason is not None:
        get_run_logger().warning("%s: %s", store, reason)
    return default_variants(positions)
