"""A whole corpus through every stage on a Dask cluster, as a user runs it: per stage wall time, its share of the
run, examples per second, its time against the bare forward pass over the same tokens, peak memory of the driver
and of the workers, and bytes on disk.

The benchmark starts a real `dask scheduler` and --workers `dask worker` processes on loopback (one thread each),
runs `effattn run --dask-address ADDRESS` in a subprocess (so that extract, efficient, causal and explain all run on
the workers), and samples the resident memory of the driver and of every worker twice a second, each sample
attributed to the stage the driver's log says is running; each worker's own peak (`ru_maxrss`) is read at the end.
Then it times the bare eager forward pass (output_attentions=True, nothing kept) over every stored example's tokens,
in batches of --batch-size, in this process. Run it at --limit N and at --limit N/4 to see whether memory grows
with the corpus.

    .venv/bin/python benchmarks/whole_corpus.py --corpus rt-sentiment --all
    .venv/bin/python benchmarks/whole_corpus.py --corpus bbc-topic --all --max-length 512 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage_schemas.inspection import size_on_disk
from tests.loopback_cluster import loopback_cluster

STAGES = ("train", "extract", "efficient", "causal", "explain", "report")
STAGE_NEEDED = re.compile(r"stage (\w+) needed:")
STAGE_RESUMED = re.compile(r"stage (\w+) needed: (\d+) of (\d+) shards")  # a rerun that finishes a stage
STAGE_FINISHED = re.compile(r"stage (\w+): (ran|skipped|not needed)(?: in ([0-9.]+) s)?")


class MemorySampler:
    """Resident memory (MiB) of the driver and of each worker, sampled every `interval` seconds and attributed to
    the stage that runs (set by the log reader); the peak per stage is kept."""

    def __init__(self, driver: int, workers: list[int], interval: float = 0.5) -> None:
        self.driver, self.workers, self.interval = driver, workers, interval
        self.stage = "start-up"  # until the log names a stage: imports, the Prefect server, the pipeline's checks
        self.peaks: dict[str, dict[str, float]] = {}
        self.samples: list[tuple[str, float, float]] = []  # (stage, driver MiB, largest worker MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _rss(self, pid: int) -> float:
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            stage, driver, worker = self.stage, self._rss(self.driver), max(self._rss(pid) for pid in self.workers)
            self.samples.append((stage, driver, worker))
            peaks = self.peaks.setdefault(stage, {"driver": 0.0, "worker": 0.0})
            peaks["driver"], peaks["worker"] = max(peaks["driver"], driver), max(peaks["worker"], worker)

    def first_quarter_peaks(self) -> dict[str, dict[str, float]]:
        """Per stage, the peaks over the first quarter of its samples (about its first quarter of the corpus,
        for stages whose work is spread evenly): memory that grows with the corpus shows as a higher whole-stage
        peak."""
        peaks = {}
        for stage in self.peaks:
            samples = [sample for sample in self.samples if sample[0] == stage]
            quarter = samples[: max(1, len(samples) // 4)]
            peaks[stage] = {"driver": max(s[1] for s in quarter), "worker": max(s[2] for s in quarter)}
        return peaks


def run_pipeline(arguments, address: str, worker_pids: list[int], log_path: Path) -> tuple[dict, dict, dict, float]:
    """`effattn run ... --dask-address address` in a subprocess; returns ({stage: (status, seconds)}, memory
    peaks per stage, {stage: share of its shards this run computed} for stages it resumed, wall seconds)."""
    effattn = str(Path(sys.executable).parent / "effattn")
    command = [
        effattn,
        "run",
        "--corpus",
        arguments.corpus,
        "--model",
        arguments.model,
        "--max-length",
        str(arguments.max_length),
        "--dtype",
        arguments.dtype,
        "--run-dir",
        arguments.run_dir,
        "--dask-address",
        address,
    ]
    command += ["--all"] if arguments.all else ["--limit", str(arguments.limit)]
    for option in ("variants", "layers", "heads"):
        if getattr(arguments, option):
            command += [f"--{option}", getattr(arguments, option)]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        with MemorySampler(process.pid, worker_pids) as sampler:
            stages, pending = follow_stages(process, log, started, lambda stage: setattr(sampler, "stage", stage))
            process.wait()
    if process.returncode != 0:
        raise SystemExit(f"effattn run failed (exit {process.returncode}); its log: {log_path}")
    return stages, (sampler.peaks, sampler.first_quarter_peaks()), pending, time.perf_counter() - started


def follow_stages(
    process: subprocess.Popen, log: TextIO, started: float, on_stage: Callable[[str], None] = lambda stage: None
) -> tuple[dict[str, tuple[str, float]], dict[str, float]]:
    """Copy an `effattn run` subprocess's output (text, stderr merged) to `log` until it ends, printing when each
    stage starts and ends (seconds since `started`, a perf_counter); `on_stage` is told the stage that runs after
    each line ("between" when none). Returns ({stage: (status, seconds)} as the run logged them, {stage: share of
    its shards this run computed} for stages it resumed)."""
    stages: dict[str, tuple[str, float]] = {}
    pending: dict[str, float] = {}
    running: list[str] = []
    for line in process.stdout:
        log.write(line)
        # the stage that runs is the latest one announced and not finished (the head trains after the extraction
        # was announced, and the extraction follows)
        if (needed := STAGE_NEEDED.search(line)) and needed.group(1) in STAGES:
            running.append(needed.group(1))
            if resumed := STAGE_RESUMED.search(line):
                done, shards = int(resumed.group(2)), int(resumed.group(3))
                pending[resumed.group(1)] = (shards - done) / shards
            print(f"  {time.perf_counter() - started:7.1f} s: stage {running[-1]} started", flush=True)
        elif (done := STAGE_FINISHED.search(line)) and done.group(1) in STAGES:
            stages[done.group(1)] = (done.group(2), float(done.group(3) or 0.0))
            print(f"  {time.perf_counter() - started:7.1f} s: stage {done.group(1)} {done.group(2)}", flush=True)
            running = [stage for stage in running if stage != done.group(1)]
        on_stage(running[-1] if running else "between")
    return stages, pending


def worker_peaks_mib(address: str) -> list[float]:
    """Each worker process's own peak resident memory (ru_maxrss) in MiB."""
    from distributed import Client

    with Client(address) as client:
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return sorted(peaks.values())


def bare_forward_seconds(store: str, model: str, batch_size: int) -> tuple[float, int]:
    """Seconds of the bare eager forward pass over every stored example's tokens, and the number of examples."""
    import torch

    from analysis.models import load_model
    from benchmarks.extraction_throughput import bare_forward
    from storage_schemas.attention_store import open_attention_store, store_layout

    group = open_attention_store(store, mode="r")
    layout = store_layout(group)
    tokens, length = group["tokens"][:], group["length"][:]
    loaded = load_model(model, num_labels=layout.n_classes)
    loaded.model.set_attn_implementation("eager")
    with torch.inference_mode():
        bare_forward(loaded.model, tokens[:batch_size], length[:batch_size], batch_size)  # warm-up
        started = time.perf_counter()
        bare_forward(loaded.model, tokens, length, batch_size)
    return time.perf_counter() - started, len(length)


def outputs(run_dir: str) -> dict[str, int]:
    """Bytes on disk of each store, results dataset and report folder the run wrote."""
    return {path.name: size_on_disk(str(path)) for path in sorted(Path(run_dir).iterdir()) if path.is_dir()}


def attention_store_in(run_dir: str) -> str:
    """The attention store a run wrote in `run_dir` (the one `.zarr` that is not results or explanations)."""
    return next(
        str(path)
        for path in sorted(Path(run_dir).iterdir())
        if path.name.endswith(".zarr") and not path.name.endswith((".results.zarr", ".explanations.zarr"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="rt-sentiment")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--all", action="store_true", help="every example of the split (default: --limit)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", help="default: the run's default")
    parser.add_argument("--layers")
    parser.add_argument("--heads")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="of the bare forward pass (the run's default)")
    parser.add_argument("--run-dir", help="default: a fresh temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    parser.add_argument("--json", help="write the figures here too")
    arguments = parser.parse_args()
    temporary = arguments.run_dir is None
    arguments.run_dir = arguments.run_dir or tempfile.mkdtemp(prefix="effattn-whole-corpus-")
    Path(arguments.run_dir).mkdir(parents=True, exist_ok=True)
    print(f"free disk under {arguments.run_dir}: {shutil.disk_usage(arguments.run_dir).free / 2**30:.1f} GiB")
    try:
        with (
            tempfile.TemporaryDirectory() as cluster_folder,
            loopback_cluster(Path(cluster_folder), arguments.workers) as (address, processes),
        ):
            worker_pids = [process.pid for process in processes[1:]]
            stages, (peaks, quarter_peaks), pending, wall = run_pipeline(
                arguments, address, worker_pids, Path(arguments.run_dir) / "effattn-run.log"
            )
            worker_peaks = worker_peaks_mib(address)
        disk = outputs(arguments.run_dir)
        store = attention_store_in(arguments.run_dir)
        bare_seconds, examples = bare_forward_seconds(store, arguments.model, arguments.batch_size)
    finally:
        if temporary and not arguments.keep:
            shutil.rmtree(arguments.run_dir, ignore_errors=True)

    total = sum(seconds for _, seconds in stages.values())
    print(
        f"\n{arguments.corpus}, {examples} examples, max length {arguments.max_length}, {arguments.dtype}, "
        f"{arguments.workers} workers; wall {wall:.1f} s (stages {total:.1f} s, the rest is start-up); bare "
        f"forward over the stored tokens {bare_seconds:.1f} s ({examples / bare_seconds:.1f} examples/s)"
    )
    header = (
        f"{'stage':<10} {'status':<11} {'seconds':>8} {'share':>6} {'ex/s':>8} {'x bare':>7} "
        f"{'driver MiB':>10} {'worker MiB':>10} {'(first quarter: driver, worker)':>32}"
    )
    print(header)
    rows = {}
    for stage in STAGES:
        status, seconds = stages.get(stage, ("-", 0.0))
        peak = peaks.get(stage, {"driver": 0.0, "worker": 0.0})
        quarter = quarter_peaks.get(stage, {"driver": 0.0, "worker": 0.0})
        ran = status == "ran" and seconds > 0
        computed = examples * pending.get(stage, 1.0)  # a resumed stage computed only its pending shards
        if stage in pending:
            status = f"resumed {pending[stage]:.0%}"
        rows[stage] = {
            "status": status,
            "seconds": seconds,
            "share": seconds / total if total else 0.0,
            "examples_per_second": computed / seconds if ran else None,
            "times_bare_forward": seconds / (bare_seconds * computed / examples) if ran else None,
            "driver_peak_mib": peak["driver"],
            "worker_peak_mib": peak["worker"],
            "first_quarter_driver_peak_mib": quarter["driver"],
            "first_quarter_worker_peak_mib": quarter["worker"],
        }
        print(
            f"{stage:<10} {status:<11} {seconds:8.1f} {rows[stage]['share']:6.1%} "
            f"{computed / seconds if ran else float('nan'):8.2f} "
            f"{rows[stage]['times_bare_forward'] if ran else float('nan'):7.1f} "
            f"{peak['driver']:10.0f} {peak['worker']:10.0f} {quarter['driver']:22.0f} {quarter['worker']:9.0f}"
        )
    for other in sorted(set(peaks) - set(STAGES)):
        print(f"{other}: driver peak {peaks[other]['driver']:.0f} MiB, worker peak {peaks[other]['worker']:.0f} MiB")
    print(f"workers' own peaks (ru_maxrss, MiB): {', '.join(f'{peak:.0f}' for peak in worker_peaks)}")
    for name, size in disk.items():
        print(f"on disk: {name} {size / 2**20:.1f} MiB ({size / 2**20 / examples:.3f} MiB per example)")
    if arguments.json:
        Path(arguments.json).write_text(
            json.dumps(
                {
                    "corpus": arguments.corpus,
                    "examples": examples,
                    "max_length": arguments.max_length,
                    "dtype": arguments.dtype,
                    "workers": arguments.workers,
                    "wall_seconds": wall,
                    "bare_forward_seconds": bare_seconds,
                    "stages": rows,
                    "worker_peaks_mib": worker_peaks,
                    "bytes_on_disk": disk,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
