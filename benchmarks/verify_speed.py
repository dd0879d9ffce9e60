"""`effattn verify` against the store's plain read speed, side by side in one run on the same store.

  * plain read: every chunk of every array read back with zarr (the fast codec pipeline the commands use),
    decompressed, shard by shard, no checks, in this process;
  * verify in parallel: `verify_store_in_parallel` (every check; one Dask task per shard) on a LocalCluster of
    --workers processes, started before the timing (a run's cluster), and with its start-up added;
  * verify in one process: `verify_store(url)` (what verify was before it ran in parallel).
Target: parallel verify >= 2/3 of the plain read speed (MB/s of decoded array data). The store is a real MiniLM
store of rt-sentiment with the `effective` and `stochastic` variants (built here, or --store to take one).

    .venv/bin/python benchmarks/verify_speed.py [--examples 512] [--max-length 128] [--workers 2] [--store URL]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import shutil
import sys
import tempfile
import time

import zarr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage_schemas.attention_store import open_attention_store, store_layout, use_fast_codec_pipeline


def build_store(url: str, examples: int, max_length: int) -> None:
    """A real store: MiniLM over `examples` rt-sentiment texts, and its effective and stochastic variants."""
    from benchmarks.efficient_stage import SETTINGS, make_store
    from tasks.dask_cluster import dask_client
    from tasks.efficient import compute_shards, prepare_variants

    make_store(url, examples, max_length)
    with dask_client(None, None) as client:
        compute_shards(url, prepare_variants(url, ["effective", "stochastic"], SETTINGS), SETTINGS, client)


def plain_read(url: str) -> int:
    """Read every chunk of every array (a shard of examples at a time where the array runs along the examples);
    returns the bytes decoded."""
    group = open_attention_store(url)
    layout = store_layout(group)
    total = 0
    for _, array in _all_arrays(group):
        if array.ndim and array.shape[0] == layout.n_examples:
            for shard in range(layout.n_shards):
                total += array[layout.shard_slice(shard)].nbytes
        else:
            total += array[...].nbytes
    return total


def _all_arrays(group: zarr.Group) -> list:
    """(name, array) of every array in `group` and its subgroups."""
    arrays = sorted(group.arrays(), key=lambda item: item[0])
    for _, sub in group.groups():
        arrays += _all_arrays(sub)
    return arrays


def main() -> None:
    from storage_schemas.verification import verify_store
    from tasks.dask_cluster import local_cluster
    from tasks.verification import verify_store_in_parallel

    use_fast_codec_pipeline()  # as the commands do
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--store", help="an existing store to measure (default: build one, removed afterwards)")
    parser.add_argument("--keep", help="build the store at this path and keep it")
    arguments = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="effattn-verify-bench-")
    try:
        url = arguments.store or arguments.keep or os.path.join(folder, "store.zarr")
        if not arguments.store:
            build_store(url, arguments.examples, arguments.max_length)
        layout = store_layout(open_attention_store(url))
        plain_read(url)  # once untimed: the page cache holds the files for every timing below
        start = time.perf_counter()
        size = plain_read(url)
        read_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with local_cluster(arguments.workers) as cluster:
            started_seconds = time.perf_counter() - start
            start = time.perf_counter()
            parallel = verify_store_in_parallel(url, dask_address=cluster.scheduler_address)
            parallel_seconds = time.perf_counter() - start
        start = time.perf_counter()
        serial = verify_store(url)
        serial_seconds = time.perf_counter() - start
        assert parallel.text() == serial.text(), (parallel.text(), serial.text())
        megabytes = size / 1e6
        print(
            f"store: {layout.n_examples} examples in {layout.n_shards} shards, {megabytes:.0f} MB decoded; "
            f"verify: {parallel.status}"
        )
        rows = [
            ("plain read (no checks, one process)", read_seconds),
            (f"verify on a running cluster of {arguments.workers} workers", parallel_seconds),
            ("  the same with the LocalCluster's start", parallel_seconds + started_seconds),
            ("verify in one process", serial_seconds),
        ]
        for name, seconds in rows:
            print(
                f"{name:<44} {seconds:7.2f} s  {megabytes / seconds:7.1f} MB/s  "
                f"speed / plain read speed {read_seconds / seconds:5.2f}"
            )
        print("target: verify in parallel >= 0.67 of the plain read speed")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
