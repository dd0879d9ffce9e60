"""Connecting to a Dask cluster: one place for the scheduler timeout and its message (the CLI's pre-flight and
every stage that runs on a cluster use it). No Prefect import here."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# How long to wait for a Dask scheduler to answer (seconds); distributed's own default is 30 s per attempt.
DASK_TIMEOUT_ENV_VAR = "EFFATTN_DASK_TIMEOUT"
DEFAULT_DASK_TIMEOUT_SECONDS = 10.0


class DaskSchedulerUnreachableError(ValueError):
    """No Dask scheduler answered at the address given (`--dask-address`) within the timeout."""


def dask_timeout_seconds() -> float:
    """Seconds to wait for a Dask scheduler: $EFFATTN_DASK_TIMEOUT, default 10."""
    from storage_schemas.remote import seconds_from_environment

    return seconds_from_environment(DASK_TIMEOUT_ENV_VAR, DEFAULT_DASK_TIMEOUT_SECONDS, "to wait for a Dask scheduler")


def connect_dask_scheduler(address: str, timeout: float | None = None):
    """A distributed Client connected to the scheduler at `address`, waiting at most `timeout` seconds (default
    `dask_timeout_seconds()`); DaskSchedulerUnreachableError when none answers. The caller closes the client."""
    from distributed import Client

    timeout = dask_timeout_seconds() if timeout is None else timeout
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise DaskSchedulerUnreachableError(
            f"no Dask scheduler answers at {address} (waited {timeout:g} s; {type(error).__name__}: {error}): start "
            f"one there (`dask scheduler`, then `dask worker {address}`), correct --dask-address, or leave it out to "
            f"run on a local cluster; set {DASK_TIMEOUT_ENV_VAR}=SECONDS to wait longer"
        ) from None


@contextlib.contextmanager
def main_script_hidden_from_workers() -> Iterator[None]:
    """While the block runs, hide the main module's `__file__` from the worker processes that multiprocessing
    spawns when it names no file they could import again: `python - < script.py` (`<stdin>`), or code run by
    `exec` under a made-up name. A spawned process runs the main module's file again before it starts, and with
    such a name it fails ("Nanny failed to start"). Main scripts that exist and notebooks (no `__file__`) are left
    alone: a script's stages belong under `if __name__ == "__main__":`, as the README shows."""
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


@contextlib.contextmanager
def local_cluster(workers: int | None) -> Iterator:
    """A new LocalCluster of `workers` processes (default: one per core) with one thread each, closed on exit."""
    from distributed import LocalCluster

    # The LocalCluster's scheduler and nannies live in this process and log every start and stop at INFO, which
    # Prefect's handler would print among the stage's progress: only their warnings and errors are shown. Workers
    # log nothing below CRITICAL: a failed task's exception reaches this process, which reports it (in one line,
    # or with its traceback when unexpected), so their "Compute Failed" traceback would only repeat it.
    distributed_logger = logging.getLogger("distributed")
    level = distributed_logger.level
    distributed_logger.setLevel(max(level, logging.WARNING))
    try:
        with (
            main_script_hidden_from_workers(),
            LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.CRITICAL,
                preload=[__name__],  # dask_setup below, in every worker process
            ) as cluster,
        ):
            yield cluster
    finally:
        distributed_logger.setLevel(level)


@contextlib.contextmanager
def dask_client(address: str | None, workers: int | None) -> Iterator:
    """A distributed Client: to the cluster at `address`, or to a new LocalCluster of `workers` processes
    (default: one per core) with one thread each, closed on exit."""
    from distributed import Client

    if address:
        with connect_dask_scheduler(address) as client:  # waits $EFFATTN_DASK_TIMEOUT s (10) for the scheduler
            yield client
        return
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client


class RunCluster:
    """The Dask cluster shared by the stages of one run: `address()` is the scheduler's address, the given one, else
    that of a LocalCluster of `workers` processes started on the first call (or by `start_in_background`) and kept
    for every later stage: its workers keep torch, the model's code and the stage modules imported. Closed by the
    `run_cluster` context that made it. A run whose stages never ask starts nothing."""

    def __init__(self, address: str | None, workers: int | None, stack: contextlib.ExitStack) -> None:
        self._given, self._workers, self._stack = address, workers, stack
        self._cluster = None
        self._error: BaseException | None = None
        self._starting: threading.Thread | None = None

    def start_in_background(self, modules: Sequence[str]) -> None:
        """Start the LocalCluster now in a thread, its workers importing `modules` once up, for a stage that asks
        for it later (the start-up then overlaps this process's own work). Nothing to do with an address."""
        if self._given or self._cluster is not None or self._starting is not None:
            return
        self._starting = threading.Thread(
            target=self._start, args=(tuple(modules),), name="effattn-run-cluster", daemon=True
        )
        self._starting.start()

    def _start(self, modules: tuple[str, ...] = ()) -> None:
        from distributed import Client

        try:
            cluster = self._stack.enter_context(local_cluster(self._workers))
            if modules:
                with Client(cluster) as client:
                    client.run(import_modules, modules)
            self._cluster = cluster
        except BaseException as error:  # noqa: BLE001 - raised by address(), in the stage that needs the cluster
            self._error = error

    def address(self) -> str:
        if self._given:
            return self._given
        self.wait()
        if self._cluster is None and self._error is None:
            self._start()
        if self._error is not None:
            raise self._error
        return self._cluster.scheduler_address

    def wait(self) -> None:
        """Wait for a start in the background to end (before the cluster is closed, or used)."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None


@contextlib.contextmanager
def run_cluster(address: str | None, workers: int | None) -> Iterator[RunCluster]:
    """The RunCluster of one run (a LocalCluster of `workers` processes unless `address`), closed on exit."""
    with contextlib.ExitStack() as stack:
        cluster = RunCluster(address, workers, stack)
        try:
            yield cluster
        finally:
            cluster.wait()


def import_modules(modules: Sequence[str]) -> None:
    """Import `modules` (run on each worker: the first task then finds them imported)."""
    for module in modules:
        importlib.import_module(module)


def dask_setup(worker) -> None:
    """Dask preload of the LocalCluster's workers, run in each worker process: a terminal's Ctrl-C reaches the whole
    process group, and a worker then ends at once and silently, as on SIGTERM (the driver records what is done and
    stops, flows/interrupts.py), instead of printing a KeyboardInterrupt traceback or finishing its task first."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def use_stage_cluster(address: str | None, workers: int | None) -> bool:
    """Whether a stage that can run in-process runs on Dask: an address or a worker count was given."""
    return bool(address) or workers is not None


def task_resources(device: str) -> dict[str, int] | None:
    """The Dask resources of a task placing a model on `device`: one GPU for "cuda" (a worker started with
    `--resources GPU=1`, or by `dask cuda worker`, runs one such task at a time); none for the CPU, so that any
    worker runs it."""
    return {"GPU": 1} if device.startswith("cuda") else None


def record_shard_futures(futures: dict[Any, int], record: Callable[[int, Any], None], desc: str) -> int:
    """Call `record(shard, result)` in this process as each Dask future (future -> the shard it computes) finishes,
    so that a rerun skips what finished even when another shard fails. The first failure is raised once every
    other task has ended, named by a note and a log line when its message does not name the shard. Returns the
    number of shards."""
    from distributed import as_completed

    first_error: BaseException | None = None
    with tqdm(total=len(futures), desc=desc, unit="shard", disable=not futures) as progress:
        for future in as_completed(futures):
            shard = futures[future]
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - raised below, once the other shards are recorded
                if first_error is None:
                    first_error = error
                    if f"shard {shard}" not in str(error):  # the worker's message may not say which one
                        error.add_note(f"(in the task of shard {shard})")
                        logger.error("%s: shard %d failed on a Dask worker", desc, shard)
                continue
            record(shard, result)
            progress.update()
    if first_error is not None:
        raise first_error
    return len(futures)


def keep_freed_memory_for_reuse() -> bool:
    """Let glibc reuse freed memory in this process instead of returning it to the system at once.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536. Setting that fixes glibc's mmap threshold at
    128 KiB, so every large temporary of the batched linear algebra is a fresh mmap whose pages fault in one by
    one: measured on a MiniLM shard, the computation takes three times as long. The model stages pay it too at
    long lengths (a batch's attention at 512 tokens is tens of MiB; docs/SCALE.md). This sets the mmap threshold
    to glibc's largest (32 MiB) and trims only above 256 MiB; a worker may then keep up to about 256 MiB of freed
    memory, which Dask's memory monitor reports as unmanaged. Returns False where there is no glibc (nothing to
    do there). Safe to call repeatedly.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        mmap_set = bool(libc.mallopt(m_mmap_threshold, 32 << 20))
        trim_set = bool(libc.mallopt(m_trim_threshold, 256 << 20))
        return mmap_set and trim_set
    except (OSError, AttributeError):
        return False


def prepare_worker_process() -> None:
    """What a stage's task does first on a Dask worker, a process with entry point of its own: the store's fast
    codec setting (the driver's own call does not reach it), the object-store time limits
    (storage_schemas.remote.apply_storage_time_limits: $EFFATTN_STORAGE_TIMEOUT, read in the worker's environment)
    and glibc's thresholds for reusing freed memory (`keep_freed_memory_for_reuse`). Cheap and safe to call for
    every task."""
    from storage_schemas.attention_store import use_fast_codec_pipeline
    from storage_schemas.remote import apply_storage_time_limits

    use_fast_codec_pipeline()
    apply_storage_time_limits()
    keep_freed_memory_for_reuse()
