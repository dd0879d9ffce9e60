"""A real Dask cluster on loopback for the tests and the benchmarks: a `dask scheduler` and nanny-less `dask worker`
processes, each stopped by its process id."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def loopback_cluster(folder: Path, workers: int = 2) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A `dask scheduler` and `workers` one-thread `dask worker` processes on 127.0.0.1, without nannies (so that a
    worker's process id is the worker itself), importing this checkout, their logs in `folder`; yields
    (address, [scheduler, *workers]) and stops every process by its id."""
    dask = str(Path(sys.executable).parent / "dask")
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    scheduler_file = folder / "scheduler.json"

    def start(command: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=(folder / log).open("w"), stderr=subprocess.STDOUT, env=environment)

    processes = [
        start(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            "scheduler.log",
        )
    ]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for index in range(workers):
            processes.append(
                start(
                    [
                        dask,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--no-nanny",
                        "--host",
                        "127.0.0.1",
                        "--name",
                        f"worker-{index}",
                    ],
                    f"worker-{index}.log",
                )
            )
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
