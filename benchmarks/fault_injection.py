"""Fault injection: each fault several times against real `effattn` runs, then a table of what it cost.

Faults (tiny random BERT of tests/conftest, 60 reviews in 12 shards of 5; every CLI call is a real subprocess on a
shared Prefect server on loopback):

  kill extract      SIGKILL of the whole process group at a random moment after the store was created, then the
                    same command again
  kill efficient    the same for `effattn efficient --workers 1` (Dask workers included)
  corrupt chunk     4 flipped bytes in a random shard file of a random shard-written array (attention, value,
                    logits, efficient/*, diagnostics/*): `effattn verify` must find it; `verify --repair` and the
                    stage's command again
  disk full         a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk) between the sizes of
                    the smallest and the largest attention shard file; then the command again without it
  transient I/O     1-3 OSError(EIO) from the efficient stage's shard write (in process), default back-off delays
  stale lock        a lock holder killed with SIGKILL; the next writer takes the lock over

"data lost" counts arrays and attribute sets whose content digest differs from an uninterrupted run's after the
recovery (must be 0); "recovery" is the wall time from the fault to a complete, verified store (the rerun with its
process start, or the retries' back-off).

    .venv/bin/python benchmarks/fault_injection.py [--times 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import errno
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import zarr

import tasks.efficient
from storage_schemas.durable_writes import shard_file_paths
from storage_schemas.efficient_store import write_efficient_shard
from storage_schemas.storage_faults import DEFAULT_RETRY_DELAYS
from storage_schemas.store_lock import hold_store_lock
from storage_schemas.verification import content_digests, unmark_damaged_shards, verify_store
from tests import crash_harness
from tests.conftest import save_model_folder, tiny_bert
from tests.store_builders import SETTINGS, write_corpus

N_SHARDS = 12
SHARD_ARRAYS = (
    ["attention", "value", "logits"]
    + [f"efficient/{variant}" for variant in ("effective", "stochastic", "simplex")]
    + [f"diagnostics/simplex/{name}" for name in ("rank", "output_residual", "converged")]
)


def lost(store: str, reference: dict) -> int:
    digests = content_digests(store)
    return sum(digests.get(key) != value for key, value in reference.items()) + len(set(digests) - set(reference))


class Table:
    def __init__(self):
        self.rows = []

    def add(self, fault: str, injected: int, handled: int, lost_items: list[int], recovery: list[float], note: str):
        self.rows.append(
            (fault, injected, handled, sum(lost_items), statistics.median(recovery) if recovery else 0.0, note)
        )

    def print(self):
        header = ("fault", "injected", "handled", "data lost", "median recovery (s)", "notes")
        cells = [header] + [
            (fault, str(injected), str(handled), str(data_lost), f"{recovery:.3g}", note)
            for fault, injected, handled, data_lost, recovery, note in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        for index, row in enumerate(cells):
            print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if index == 0:
                print("-|-".join("-" * width for width in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, default=3, help="injections of each fault")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    chance = random.Random(options.seed)
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="effattn-faults-"))
    try:
        model = save_model_folder(tiny_bert(), work / "tiny-bert")
        corpus = write_corpus(work / "reviews.csv", copies=6)
        extract = [
            "extract",
            "--corpus",
            str(corpus),
            "--model",
            str(model),
            "--no-train",
            "--shard-size",
            "5",
            "--batch-size",
            "5",
            "--max-length",
            "32",
        ]
        efficient = ["efficient", "--workers", "1"]
        with crash_harness.prefect_server(work) as environment:

            def cli(arguments, name, **options):
                return crash_harness.run(arguments, environment, work / name, **options)

            clean = str(work / "clean.zarr")
            assert cli([*extract, "--store", clean], "clean").returncode == 0
            extracted_digests = content_digests(clean)
            clean_efficient = str(work / "clean-efficient.zarr")
            shutil.copytree(clean, clean_efficient)
            assert cli([*efficient, "--store", clean_efficient], "clean-efficient").returncode == 0
            efficient_digests = content_digests(clean_efficient)

            def kill_and_rerun(stage, command, progress_of, first_progress, reference, prepare, fault, note):
                """SIGKILL `command` at a seeded random moment, `options.times` times, then rerun it and count."""
                lost_items, recovery, handled = [], [], 0
                for trial in range(options.times):
                    store = str(work / f"kill-{stage}-{trial}.zarr")
                    prepare(store)
                    kill = crash_harness.kill_when(
                        [*command, "--store", store],
                        environment,
                        work / f"kill-{stage}-{trial}",
                        lambda: progress_of(store),
                        chance.randrange(first_progress, N_SHARDS - 2),
                        chance.uniform(0, 0.3),
                    )
                    began = time.monotonic()
                    rerun = cli([*command, "--store", store], f"kill-{stage}-{trial}-rerun")
                    recovery.append(time.monotonic() - began)
                    handled += rerun.returncode == 0 and not kill.survivors and verify_store(store).ok
                    lost_items.append(lost(store, reference))
                    print(
                        f"kill {stage} {trial}: killed at {kill.progress_at_kill} shards done, rerun "
                        f"{recovery[-1]:.1f} s",
                        flush=True,
                    )
                table.add(fault, options.times, handled, lost_items, recovery, note)

            kill_and_rerun(
                "extract",
                extract,
                crash_harness.extraction_progress,
                -1,
                extracted_digests,
                lambda store: None,
                "SIGKILL extract",
                "rerun of the same command; killed anywhere from store creation to the last shard",
            )
            kill_and_rerun(
                "efficient",
                efficient,
                crash_harness.efficient_progress,
                0,
                efficient_digests,
                lambda store: shutil.copytree(clean, store),
                "SIGKILL efficient (+ Dask workers)",
                "rerun of the same command",
            )

            # corrupt chunk
            lost_items, recovery, handled = [], [], 0
            for trial in range(options.times):
                store = str(work / f"corrupt-{trial}.zarr")
                shutil.copytree(clean_efficient, store)
                array, shard = chance.choice(SHARD_ARRAYS), chance.randrange(N_SHARDS)
                (path,) = shard_file_paths(zarr.open_group(store, mode="r"), [array], shard)
                offset = chance.randrange(path.stat().st_size - 4)
                with path.open("r+b") as handle:
                    handle.seek(offset)
                    data = handle.read(4)
                    handle.seek(offset)
                    handle.write(bytes(byte ^ 0xFF for byte in data))
                began = time.monotonic()
                report = verify_store(store)
                found = [(p.array, p.shard) for p in report.problems]
                unmarked = unmark_damaged_shards(store, report)
                if "extract" in unmarked:
                    cli([*extract, "--store", store], f"corrupt-{trial}-extract")
                cli([*efficient, "--store", store], f"corrupt-{trial}-efficient")
                recovery.append(time.monotonic() - began)
                handled += found == [(array, shard)] and verify_store(store).ok
                lost_items.append(lost(store, efficient_digests))
                print(
                    f"corrupt {array} shard {shard} at byte {offset}: found {found}, recovered in {recovery[-1]:.1f} s",
                    flush=True,
                )
            table.add(
                "corrupt chunk (4 bytes)",
                options.times,
                handled,
                lost_items,
                recovery,
                "handled = verify named exactly that array and shard; verify --repair + rerun",
            )

            # disk full
            sizes = sorted(p.stat().st_size for p in (Path(clean) / "attention" / "c").rglob("*") if p.is_file())
            lost_items, recovery, handled = [], [], 0
            for trial in range(options.times):
                store = str(work / f"full-{trial}.zarr")
                limit = chance.randrange(sizes[0] + 1, sizes[-1])
                failed = cli([*extract, "--store", store], f"full-{trial}", file_size_limit=limit)
                done = crash_harness.extraction_progress(store)
                began = time.monotonic()
                rerun = cli([*extract, "--store", store], f"full-{trial}-rerun")
                recovery.append(time.monotonic() - began)
                handled += (
                    failed.returncode == 2
                    and "no space left while writing" in failed.stderr
                    and done < N_SHARDS
                    and rerun.returncode == 0
                )
                lost_items.append(lost(store, extracted_digests))
                print(
                    f"disk full at {limit} bytes per file: stopped with {done} shards done, rerun {recovery[-1]:.1f} s",
                    flush=True,
                )
            table.add(
                "disk full mid-shard (EFBIG)",
                options.times,
                handled,
                lost_items,
                recovery,
                "message says free space and rerun; rerun without the limit",
            )

        # transient I/O errors in the efficient stage's writes (in process, real back-off delays)
        lost_items, recovery, handled = [], [], 0
        for trial in range(options.times):
            store = str(work / f"transient-{trial}.zarr")
            shutil.copytree(clean, store)
            tasks.efficient.prepare_variants(store, ["effective", "stochastic", "simplex"], SETTINGS)
            failures, calls = chance.randint(1, len(DEFAULT_RETRY_DELAYS)), []

            def flaky_write(*args, failures=failures, calls=calls):
                calls.append(1)
                if len(calls) <= failures:
                    raise OSError(errno.EIO, "Input/output error (injected)")
                return write_efficient_shard(*args)

            tasks.efficient.write_efficient_shard = flaky_write
            shard = chance.randrange(N_SHARDS)
            began = time.monotonic()
            tasks.efficient.compute_efficient_shard(store, shard, ["effective", "stochastic", "simplex"], SETTINGS)
            recovery.append(time.monotonic() - began)
            tasks.efficient.write_efficient_shard = write_efficient_shard
            mine, reference = zarr.open_group(store, mode="r"), zarr.open_group(clean_efficient, mode="r")
            region = slice(shard * 5, shard * 5 + 5)
            differ = sum(
                not np.array_equal(mine[f"efficient/{v}"][region], reference[f"efficient/{v}"][region])
                for v in ("effective", "stochastic", "simplex")
            )
            handled += len(calls) == failures + 3  # the failures, then the three variants' writes
            lost_items.append(differ)
            print(f"transient: {failures} failures, shard {shard} done in {recovery[-1]:.1f} s", flush=True)
        table.add(
            "transient OSError on write",
            options.times,
            handled,
            lost_items,
            recovery,
            f"retried after {', '.join(str(d) for d in DEFAULT_RETRY_DELAYS)} s; a ValueError is not retried",
        )

        # stale lock
        lost_items, recovery, handled = [], [], 0
        for trial in range(options.times):
            store = str(work / f"lock-{trial}.zarr")
            holder = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys, time\nfrom storage_schemas.store_lock import hold_store_lock\n"
                    "with hold_store_lock(sys.argv[1], 'extract'):\n    print('held', flush=True)\n    time.sleep(600)",
                    store,
                ],
                cwd=crash_harness.REPOSITORY,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(crash_harness.REPOSITORY)},
            )
            assert holder.stdout.readline().strip() == "held"
            holder.kill()
            holder.wait()
            began = time.monotonic()
            with hold_store_lock(store, "extract") as lock:
                recovery.append(time.monotonic() - began)
                handled += lock.taken_over is not None and lock.taken_over.pid == holder.pid
            lost_items.append(0)
        table.add(
            "stale lock (holder SIGKILLed)",
            options.times,
            handled,
            lost_items,
            recovery,
            "taken over by the next writer (flock released by the kernel; pid checked)",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    table.print()


if __name__ == "__main__":
    main()
