"""The memory the causal stage's summary (tasks.causal.summarise_results: aggregates, diagnostics summary, claims)
adds to the driver, for finished runs of different sizes: each in a fresh process, on a copy of its results, as
the peak resident memory the summary adds. Run it on a whole-corpus run and on one of a quarter of it
(benchmarks/whole_corpus.py --run-dir ...) to see whether the driver's memory grows with the corpus.

    .venv/bin/python benchmarks/causal_summary_memory.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = """
import resource, shutil, sys, tempfile, time
from storage_schemas.attention_store import use_fast_codec_pipeline
from tasks.causal import summarise_results
use_fast_codec_pipeline()
store, results = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as folder:
    copy = shutil.copytree(results, folder + "/results.zarr")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    summarise_results(store, copy)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{after - before:.0f} {seconds:.2f}")
"""


def run_outputs(run_dir: Path) -> tuple[Path, Path]:
    """(attention store, causal results) of an `effattn run` folder."""
    results = sorted(run_dir.glob("*.results.zarr"))
    if len(results) != 1:
        raise SystemExit(f"{run_dir}: expected one *.results.zarr, found {len(results)}")
    store = results[0].with_name(results[0].name.replace(".results.zarr", ".zarr"))
    return store, results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    arguments = parser.parse_args()
    print("| run | examples | summary adds (MiB, peak RSS) | seconds |")
    print("|---|--:|--:|--:|")
    for run_dir in arguments.run_dirs:
        store, results = run_outputs(run_dir)
        import zarr

        examples = zarr.open_group(str(store), mode="r")["length"].shape[0]
        output = subprocess.run(
            [sys.executable, "-c", MEASURE, str(store), str(results)],
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
            env={**os.environ, "PYTHONPATH": REPOSITORY},
            check=True,
        )
        added, seconds = output.stdout.split()[-2:]
        print(f"| {run_dir} | {examples:,} | {float(added):,.0f} | {seconds} |")


if __name__ == "__main__":
    main()
