"""The efficient stage as a Prefect flow: attention store -> efficient attention + diagnostics (Dask tasks per shard,
and per layer of a shard for the simplex variant; tasks/efficient.py)."""

from __future__ import annotations

from prefect import flow

from analysis.efficient_attention import VARIANTS
from flows.settings import EfficientSettings
from storage_schemas.attention_store import use_fast_codec_pipeline
from tasks.efficient import run_efficient_shards


@flow(name="effattn-efficient")
def efficient(settings: EfficientSettings) -> str:
    """Compute the efficient-attention `settings.variants` (None: every registered variant,
    analysis/variants.py) of every shard of the store at
    `settings.store` on a Dask cluster (`dask_address`, or a LocalCluster of `workers` processes). Resumable:
    finished shards are skipped. Returns the store's URL."""
    variants = list(VARIANTS) if settings.variants is None else settings.variants
    use_fast_codec_pipeline()
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown or list(variants)}: choose from {list(VARIANTS)}")
    run_efficient_shards(settings.store, list(variants), settings.recorded(), settings.dask_address, settings.workers)
    return settings.store
