"""`effattn verify` on Dask workers: the shards of a store (their chunks and checks) checked in parallel, on a new
LocalCluster or on the cluster at a given address. The checks and the report are storage_schemas.verification's;
this module only decides where the shards run."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from storage_schemas.verification import VerificationReport, run_in_process, verify_store
from tasks.dask_cluster import dask_client, prepare_worker_process


def verify_shards_on_worker(function: Callable, *arguments) -> Any:
    """`function(*arguments)` in a Dask worker, with the store settings of the commands (fast codecs, object-store
    time limits)."""
    prepare_worker_process()
    return function(*arguments)


@contextlib.contextmanager
def parallel_shard_runner(dask_address: str | None, workers: int | None) -> Iterator[Callable]:
    """A ShardRunner (storage_schemas.verification) that checks the shards as Dask tasks, one per shard: on the
    cluster at `dask_address`, else on a LocalCluster of `workers` processes (default: one per core), started only
    when there are two shards or more to check (one runs in this process) and closed on exit."""
    with contextlib.ExitStack() as stack:

        def run(function: Callable, submissions: Sequence[tuple[int, tuple]]) -> dict[int, Any]:
            if len(submissions) < 2 and not dask_address:
                return run_in_process(function, submissions)
            from distributed import as_completed

            with warnings.catch_warnings():  # verify's output is its report: not distributed's note on a busy port
                warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
                client = stack.enter_context(dask_client(dask_address, workers))
            futures = {
                client.submit(verify_shards_on_worker, function, *arguments, pure=False): shard
                for shard, arguments in submissions
            }
            found: dict[int, Any] = {}
            # the progress bar only on a terminal: verify's output is its report
            for future in tqdm(as_completed(futures), total=len(futures), desc="verify", unit="shard", disable=None):
                found[futures[future]] = future.result()
            return found

        yield run


def verify_store_in_parallel(
    url: str, storage_options: dict | None = None, dask_address: str | None = None, workers: int | None = None
) -> VerificationReport:
    """`verify_store`, its shards checked on Dask workers (see parallel_shard_runner); one worker (or one core)
    and no address: in this process. The report is the same as in one process."""
    if (workers or os.cpu_count() or 1) == 1 and not dask_address:
        return verify_store(url, storage_options)
    with parallel_shard_runner(dask_address, workers) as runner:
        return verify_store(url, storage_options, run_shards=runner)
