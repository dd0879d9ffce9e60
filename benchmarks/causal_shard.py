"""One causal shard of a store whose efficient stage is done, in this process, with the plan `effattn causal`
would use by default: wall time, user and system CPU seconds and page faults per repeat (nothing is written).
Run it at two commits, or with and without --keep-freed-memory under MALLOC_TRIM_THRESHOLD_=65536 (what Dask's
nanny gives its workers), to compare.

    .venv/bin/python benchmarks/causal_shard.py STORE --shard 100 [--threads 2] [--forward-rows 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forward-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="set glibc's thresholds as a stage's Dask task does (tasks.dask_cluster)",
    )
    arguments = parser.parse_args()

    import torch

    from flows.settings import CausalSettings
    from storage_schemas.attention_store import use_fast_codec_pipeline
    from tasks.causal import causal_plan, compute_causal_shard
    from tasks.dask_cluster import keep_freed_memory_for_reuse
    from tasks.stages import ShardJob

    torch.set_num_threads(arguments.threads)
    use_fast_codec_pipeline()
    if arguments.keep_freed_memory:
        keep_freed_memory_for_reuse()
    unused_results = os.path.join(tempfile.gettempdir(), "effattn-causal-shard-benchmark.zarr")  # never written
    plan = causal_plan(CausalSettings(store=arguments.store, results=unused_results))
    for repeat in range(arguments.repeats):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        compute_causal_shard(
            ShardJob(
                arguments.store, unused_results, plan, forward_rows=arguments.forward_rows, shard_index=arguments.shard
            )
        )
        after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
        print(
            f"shard {arguments.shard}, repeat {repeat + 1}: {seconds:.1f} s, user "
            f"{after.ru_utime - before.ru_utime:.1f} s, sys {after.ru_stime - before.ru_stime:.1f} s, "
            f"page faults {after.ru_minflt - before.ru_minflt:,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
