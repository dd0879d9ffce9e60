"""One sharded-stage protocol: a stage is a declaration (`Stage`), one runner (`run_stage`) runs it.

Every sharded stage does the same thing: check its inputs and create (or check) its output, forget shards whose
inputs changed since they were computed, compute each pending shard with a pure function that writes it whole and
returns the identities of the inputs it read, record completion with those identities, and summarise. A `Stage`
names the stage's own functions for each step; `run_stage` holds the output's lock, runs the pending shards in this
process or as one Dask task each, with one retry policy (`RETRY_POLICY`), records completion in this process as each
shard returns (so that a rerun skips them even when another shard fails), shows progress and summarises.

What one shard needs is one frozen value, a `ShardJob`: it is what goes to a Dask worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from tqdm.auto import tqdm

from storage_schemas.attention_store import open_attention_store
from storage_schemas.storage_faults import DEFAULT_RETRY_DELAYS, is_transient_io_error, retry_transient_io
from storage_schemas.store_lock import hold_store_lock
from tasks.dask_cluster import (
    dask_client,
    keep_freed_memory_for_reuse,
    prepare_worker_process,
    record_shard_futures,
    task_resources,
    use_stage_cluster,
)

logger = logging.getLogger(__name__)


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, else the standard logger `fallback` (a stage function
    called directly, e.g. in tests)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


def log_retry(attempt: int, error: BaseException, delay: float) -> None:
    """Say in the log that a transient I/O error is retried (`retry_transient_io`'s `on_retry`)."""
    logger.warning("transient I/O error (%s: %s); retry %d in %.1f s", type(error).__name__, error, attempt + 1, delay)


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures of a shard are tried again, and after how long: transient I/O errors only (a flaky disk or
    object store, `is_transient_io_error`), after each of `delays` seconds; a full disk, a store this process may
    not write, a wrong shape or a bad store fail at once. A retry computes and writes the whole shard again."""

    delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS

    def retries(self, error: BaseException) -> bool:
        """Whether `error` is one to try again."""
        return is_transient_io_error(error)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)`, retried by this policy."""
        return retry_transient_io(function, *args, delays=self.delays, on_retry=log_retry)


RETRY_POLICY = RetryPolicy()


def retry_on_io_error(task, task_run, state) -> bool:
    """`RETRY_POLICY` as a Prefect task's `retry_condition_fn` (for the Prefect tasks that retry on their own)."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classified, not handled
        return RETRY_POLICY.retries(error)
    return False


@dataclass(frozen=True)
class StageJob:
    """What every shard of one stage run shares.

    `plan` is what the stage computes, fixed for the whole run (tasks.extraction.ExtractionWork for extract;
    analysis.causal.CausalPlan for causal; the recorded settings dict for explain); `results` is the output dataset
    the shards are written to (extract: the store itself)."""

    store: str
    results: str
    plan: Any
    model_override: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    forward_rows: int = 64


@dataclass(frozen=True)
class ShardJob(StageJob):
    """Everything one shard of a model stage needs (the run's `StageJob` and the shard): what a Dask worker
    receives."""

    shard_index: int = field(kw_only=True)


@dataclass(frozen=True)
class StageRun(StageJob):
    """One run of a stage: what every shard shares and where the shards run (`dask_address` or `workers`: on Dask;
    neither: in this process)."""

    dask_address: str | None = None
    workers: int | None = None

    def job(self, shard_index: int) -> ShardJob:
        return ShardJob(**{item.name: getattr(self, item.name) for item in fields(StageJob)}, shard_index=shard_index)


def read_attention_store(url: str):
    """The attention store at `url`, read-only: what the model stages read."""
    return open_attention_store(url, mode="r")


@dataclass(frozen=True)
class Stage:
    """A sharded stage, declared: the functions `run_stage` calls, in this order.

    - `prepare(run)`: refuse unfinished inputs (with the commands that finish them); create the output at
      `run.results`, or check that it belongs to this run (other settings are refused). It runs under the lock.
      Returns None, or the plan the shards' jobs carry instead of `run.plan`: what only preparing finds out (the
      extract stage trains the head there and plans from the run's settings).
    - `open_output(url, mode)`: the output's group; `shard_count(output, store)`, `completed_shards(output,
      store)` and `forget_stale_shards(output, store)` (the shards computed from store shards written again since,
      forgotten; returns them) read and change its shard records (`store`: `open_input(run.store)`, by default the
      attention store's group, read-only).
    - `compute_shard(job)`: compute one shard and write it whole; returns the identities of the inputs it read
      (input name -> identity). A module-level function: it is sent to Dask workers by name.
    - `mark_completed(output, shard, inputs)`: record the shard as done from those inputs.
    - `summarise(store, results)`: aggregates and claims once every shard is done; what the stage returns.

    A stage may split a shard in two, `compute_shard(job)` returning what `write_shard(job, computed)` writes whole
    (returning what `mark_completed` records): in process, shard k is then written in a thread while shard k+1 is
    computed (each part retried by `retry`); on Dask, one task does both.

    A stage whose shards always run on Dask (`runs_in_process` False: a LocalCluster without an address) may submit
    them its own way: `submit_shards(client, run, todo, output)` returns {future: shard}, each future's result what
    `mark_completed` records (the efficient stage: longest shards first, cut by layer for an iterative variant).
    By default each pending shard is one task, `compute_shard(job)` retried by `retry` on the worker.
    """

    name: str  # the command, the lock's owner
    shards: str  # the shards in messages and progress: "causal shards"
    prepare: Callable[[StageRun], None]
    open_output: Callable[[str, str], Any]
    shard_count: Callable[[Any, Any], int]
    completed_shards: Callable[[Any, Any], Sequence[int]]
    forget_stale_shards: Callable[[Any, Any], Sequence[int]]
    compute_shard: Callable[[ShardJob], dict[str, str]]
    mark_completed: Callable[[Any, int, Any], None]
    summarise: Callable[[str, str], Any]
    open_input: Callable[[str], Any] = field(default=read_attention_store)
    retry: RetryPolicy = field(default=RETRY_POLICY)
    runs_in_process: bool = True
    submit_shards: Callable[[Any, StageRun, list[int], Any], dict[Any, int]] | None = None
    write_shard: Callable[[ShardJob, Any], Any] | None = None


def prepared_run(stage: Stage, run: StageRun) -> StageRun:
    """Prepare the stage's output; returns `run` with the plan `prepare` returned, if it returned one."""
    plan = stage.prepare(run)
    return run if plan is None else replace(run, plan=plan)


def pending_shards(stage: Stage, run: StageRun) -> list[int]:
    """Forget the stage's stale shards (saying so) and return the shards still to do (`run`: prepared)."""
    output = stage.open_output(run.results, "r+")
    store = stage.open_input(run.store)
    stale = stage.forget_stale_shards(output, store)
    if stale:
        logger.warning(
            "%s: %s %s were computed from store shards that were unfinished then or written again since: "
            "computing them again",
            run.results,
            stage.shards,
            list(stale),
        )
    done = set(stage.completed_shards(output, store))
    return [shard for shard in range(stage.shard_count(output, store)) if shard not in done]


def compute_shard_on_worker(
    compute_shard: Callable[[ShardJob], Any],
    job: ShardJob,
    retry: RetryPolicy,
    write_shard: Callable[[ShardJob, Any], Any] | None = None,
) -> Any:
    """`compute_shard(job)` (then `write_shard(job, computed)`, if the stage splits its shards) as a Dask task,
    each retried by `retry`; the driver records completion."""
    prepare_worker_process()
    result = retry.call(compute_shard, job)
    return result if write_shard is None else retry.call(write_shard, job, result)


def submit_shard_jobs(stage: Stage, client, run: StageRun, todo: list[int]) -> dict[Any, int]:
    """One Dask task per pending shard, `compute_shard_on_worker` (with --device cuda each asks for one GPU)."""
    return {
        client.submit(
            compute_shard_on_worker,
            stage.compute_shard,
            run.job(shard),
            stage.retry,
            stage.write_shard,
            pure=False,
            resources=task_resources(run.device),
        ): shard
        for shard in todo
    }


def run_shards_in_process(stage: Stage, run: StageRun, todo: list[int], record: Callable[[int, Any], None]) -> None:
    """Run `todo` one after the other in this process, each recorded once it is written. A stage that splits its
    shards (`write_shard`) has shard k written in a thread while shard k+1 is computed; on any failure the write
    under way ends before this returns (and before the lock is released)."""
    keep_freed_memory_for_reuse()
    progress = tqdm(todo, desc=stage.shards, unit="shard", disable=not todo)
    if stage.write_shard is None:
        for shard in progress:
            record(shard, stage.retry.call(stage.compute_shard, run.job(shard)))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{stage.name}-write") as writer:
        pending_write = None  # (shard, future of its write)
        for shard in progress:
            job = run.job(shard)
            computed = stage.retry.call(stage.compute_shard, job)
            if pending_write is not None:
                record(pending_write[0], pending_write[1].result())
            pending_write = (shard, writer.submit(stage.retry.call, stage.write_shard, job, computed))
        if pending_write is not None:
            record(pending_write[0], pending_write[1].result())


def run_stage(stage: Stage, run: StageRun) -> Any:
    """Run `stage` (one writer: the output's lock is held throughout): its pending shards in this process, one after
    the other, or with `run.dask_address` / `run.workers` (or a stage that always runs on Dask) as Dask tasks; each
    shard recorded in this process as it returns, so that a rerun resumes. Returns the stage's summary. A failed shard
    stops an in-process run at once; on Dask it is raised once every other shard has ended and been recorded."""
    with hold_store_lock(run.results, stage.name):  # one writer per output
        run = prepared_run(stage, run)
        todo = pending_shards(stage, run)
        output = stage.open_output(run.results, "r+")

        def record(shard: int, result: Any) -> None:
            stage.mark_completed(output, shard, result)

        if todo and (not stage.runs_in_process or use_stage_cluster(run.dask_address, run.workers)):
            with dask_client(run.dask_address, run.workers) as client:
                futures = (
                    submit_shard_jobs(stage, client, run, todo)
                    if stage.submit_shards is None
                    else stage.submit_shards(client, run, todo, output)
                )
                record_shard_futures(futures, record, stage.shards)
        else:
            run_shards_in_process(stage, run, todo, record)
        return stage.summarise(run.store, run.results)
