"""The efficient stage's work: one function per shard, run on Dask workers, and the Prefect task that drives them.

Each shard is one Dask task: it reads the shard's attention, values and lengths from the store, computes the
requested variants with analysis.efficient_attention, and writes whole shards of `efficient/<variant>` and
`diagnostics/<variant>/*`. The driver (this process) records completion as results arrive, so a rerun skips
finished shards. Workers open the store by its URL: they can run anywhere that can reach it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from analysis.efficient_attention import efficient_attention
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.efficient_store import (
    efficient_completed_shards,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)
from storage_schemas.storage_faults import DEFAULT_RETRY_DELAYS, retry_transient_io
from storage_schemas.store_lock import hold_store_lock

logger = logging.getLogger(__name__)


def _read_shard_inputs(group, region: slice) -> tuple:
    """attention [shard examples, layer, head, query, key], value, w_out, length of one shard."""
    return group["attention"][region], group["value"][region], group["w_out"][:], group["length"][region]


def _log_retry(attempt: int, error: BaseException, delay: float) -> None:
    logger.warning("transient I/O error (%s: %s); retry %d in %.1f s", type(error).__name__, error, attempt + 1, delay)


def compute_efficient_shard(
    store: str,
    shard_index: int,
    variants: Sequence[str],
    settings: dict,
    torch_threads: int = 1,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
) -> tuple[int, list[str]]:
    """Compute and write `variants` for one shard; returns (shard_index, variants written). Runs on a worker.

    Reads and writes are retried after `retry_delays` seconds on transient I/O errors only (a flaky disk or
    network); anything else (a full disk, a damaged store, bad numbers) fails at once. Dask's own `retries` would
    retry every exception, so the selection happens here.
    """
    import torch

    torch.set_num_threads(torch_threads)
    group = retry_transient_io(open_attention_store, store, mode="r+", delays=retry_delays, on_retry=_log_retry)
    layout = store_layout(group)
    region = layout.shard_slice(shard_index)
    attention, value, w_out, length = retry_transient_io(
        _read_shard_inputs, group, region, delays=retry_delays, on_retry=_log_retry
    )
    try:
        results = efficient_attention(
            attention,
            value,
            w_out,
            length,
            causal=bool(group.attrs["model"]["causal"]),
            variants=variants,
            simplex_max_iterations=settings["simplex_max_iterations"],
            simplex_tolerance=settings["simplex_tolerance"],
        )
    except ValueError as error:
        raise ValueError(
            f"{store}, shard {shard_index} (examples {region.start} to {region.stop - 1}): {error}"
        ) from error
    for variant, result in results.items():
        retry_transient_io(
            write_efficient_shard, group, layout, variant, shard_index, result.efficient, result.diagnostics,
            delays=retry_delays, on_retry=_log_retry,
        )
    return shard_index, list(variants)


@contextlib.contextmanager
def dask_client(address: str | None, workers: int | None) -> Iterator:
    """A distributed Client: to the cluster at `address`, or to a new LocalCluster of `workers` processes
    (default: one per core) with one thread each, closed on exit."""
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    n_workers = workers or os.cpu_count() or 1
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    ) as cluster, Client(cluster) as client:
        yield client


def pending_work(group, variants: Sequence[str]) -> dict[int, list[str]]:
    """shard -> variants still to compute there."""
    n_shards = store_layout(group).n_shards
    done = {variant: set(efficient_completed_shards(group, variant)) for variant in variants}
    work = {}
    for shard in range(n_shards):
        missing = [variant for variant in variants if shard not in done[variant]]
        if missing:
            work[shard] = missing
    return work


def prepare_variants(store: str, variants: Sequence[str], settings: dict) -> dict[int, list[str]]:
    """Create (or check) the arrays of every variant; returns the pending work, shard -> variants."""
    group = open_attention_store(store, mode="r+")
    for variant in variants:
        prepare_efficient_arrays(group, store, variant, settings)
    return pending_work(group, variants)


def compute_shards(store: str, work: dict[int, list[str]], settings: dict, client) -> int:
    """Run `work` (shard -> variants) on the Dask `client`, recording completion as results arrive.
    Returns the number of shards computed."""
    from distributed import as_completed

    group = open_attention_store(store, mode="r+")
    futures = [
        client.submit(compute_efficient_shard, store, shard, shard_variants, settings, pure=False)
        for shard, shard_variants in work.items()
    ]
    first_error = None
    with tqdm(total=len(futures), desc="efficient shards", unit="shard", disable=not futures) as progress:
        for future in as_completed(futures):
            try:
                shard, written = future.result()
            except Exception as error:  # noqa: BLE001 - raised below, once the other shards are recorded
                first_error = first_error or error
                continue
            for variant in written:
                mark_efficient_shard_completed(group, variant, shard)
            progress.update()
    if first_error is not None:  # every shard that did finish is recorded: a rerun does only the rest
        raise first_error
    return len(work)


@task(name="efficient-attention-shards", cache_policy=NO_CACHE)
def run_efficient_shards(
    store: str, variants: list[str], settings: dict, dask_address: str | None, workers: int | None
) -> int:
    """Run every pending shard of the store on Dask (an existing cluster or a LocalCluster)."""
    # One writer per store: a second run into it is refused, naming this one, until this one ends.
    with hold_store_lock(store, "efficient"):
        work = prepare_variants(store, variants, settings)
        if not work:
            return 0
        with dask_client(dask_address, workers) as client:
            return compute_shards(store, work, settings, client)
