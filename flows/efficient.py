"""The efficient stage as a Prefect flow: attention store -> efficient attention + diagnostics (Dask tasks per shard,
and per layer of a shard for the simplex variant; tasks/efficient.py)."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow

from analysis.efficient_attention import VARIANTS
from storage_schemas.attention_store import use_chunk_codec_batches
from tasks.efficient import run_efficient_shards


@flow(name="effattn-efficient")
def efficient(
    store: str,
    variants: Sequence[str] | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    simplex_max_iterations: int = 200,
    simplex_tolerance: float = 1e-10,
) -> str:
    """Compute the efficient-attention `variants` of every shard of the store at `store` on a Dask cluster
    (`dask_address`, or a LocalCluster of `workers` processes); `variants` None: every registered variant
    (analysis/variants.py). Resumable: finished shards are skipped."""
    variants = list(VARIANTS) if variants is None else variants
    use_chunk_codec_batches()
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown or list(variants)}: choose from {list(VARIANTS)}")
    settings = {"simplex_max_iterations": int(simplex_max_iterations), "simplex_tolerance": float(simplex_tolerance)}
    run_efficient_shards(store, list(variants), settings, dask_address, workers)
    return store
