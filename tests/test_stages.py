"""The one sharded-stage runner (tasks/stages.py), on a dummy stage declared here: in process and on a loopback Dask
cluster it runs the pending shards, records their completion, skips completed shards on a rerun, forgets a stale
shard, retries a transient I/O error by its policy and holds the output's lock while it runs. A stage that splits
its shards in a computation and a write (as extract does) writes shard k while shard k+1 is computed, and its
`prepare` may return the plan the shards' jobs carry.

The dummy stage reads a folder of input files `input-<shard>.json` ({"values": [...]}) and writes, per shard, the
sum of its values times the run's `plan` into `<results>/shard-<shard>.json`; its records of completion are
`<results>/done.json` ({shard: identity of the input read}). A file `<store>/fail-<shard>-<n>` makes the shard's
next computation fail with an I/O error (EIO, transient) and disappear; `<store>/full-<shard>` with a full disk
(ENOSPC, permanent). Files, so that a Dask worker process sees them too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import threading
from pathlib import Path

import pytest

from storage_schemas.store_lock import LOCK_SUFFIX
from tasks.stages import (
    RETRY_POLICY,
    RetryPolicy,
    ShardJob,
    Stage,
    StageRun,
    retry_on_io_error,
    run_stage,
)


def write_input(store: Path, shard: int, values: list[int]) -> None:
    (store / f"input-{shard}.json").write_text(json.dumps({"values": values}))


def input_identity(store: Path, shard: int) -> str:
    return hashlib.sha256((store / f"input-{shard}.json").read_bytes()).hexdigest()


def prepare(run: StageRun) -> None:
    results = Path(run.results)
    results.mkdir(exist_ok=True)
    settings = results / "settings.json"
    if settings.exists() and json.loads(settings.read_text()) != run.plan:
        raise ValueError(f"{run.results} holds results of another plan")
    settings.write_text(json.dumps(run.plan))


def open_output(url: str, mode: str) -> Path:
    return Path(url)


def open_input(url: str) -> Path:
    return Path(url)


def records(results: Path) -> dict[str, str]:
    done = results / "done.json"
    return json.loads(done.read_text()) if done.exists() else {}


def shard_count(results: Path, store: Path) -> int:
    return len(list(store.glob("input-*.json")))


def completed_shards(results: Path, store: Path) -> list[int]:
    return sorted(
        int(shard) for shard, identity in records(results).items() if identity == input_identity(store, int(shard))
    )


def forget_stale_shards(results: Path, store: Path) -> list[int]:
    done = records(results)
    stale = sorted(int(shard) for shard, identity in done.items() if identity != input_identity(store, int(shard)))
    for shard in stale:
        del done[str(shard)]
    (results / "done.json").write_text(json.dumps(done))
    return stale


def compute_part(job: ShardJob) -> tuple[str, int]:
    """The shard's computation: (identity of its input, its value)."""
    store, results = Path(job.store), Path(job.results)
    assert Path(job.results + LOCK_SUFFIX).exists(), "the shard ran without the output's lock"
    failures = sorted(store.glob(f"fail-{job.shard_index}-*"))
    if failures:
        failures[0].unlink()
        raise OSError(errno.EIO, "Input/output error")
    if (store / f"full-{job.shard_index}").exists():
        raise OSError(errno.ENOSPC, "No space left on device")
    identity = input_identity(store, job.shard_index)
    values = json.loads((store / f"input-{job.shard_index}.json").read_text())["values"]
    with (results / "computed.log").open("a") as log:  # one line per computation, to count them
        log.write(f"{job.shard_index}\n")
    return identity, sum(values) * job.plan


def write_part(job: ShardJob, computed: tuple[str, int]) -> dict[str, str]:
    """The shard's write: its value, whole; returns what is recorded."""
    assert Path(job.results + LOCK_SUFFIX).exists(), "the shard was written without the output's lock"
    identity, value = computed
    (Path(job.results) / f"shard-{job.shard_index}.json").write_text(json.dumps(value))
    return {"input": identity}


def compute_shard(job: ShardJob) -> dict[str, str]:
    return write_part(job, compute_part(job))


def mark_completed(results: Path, shard: int, inputs: dict[str, str]) -> None:
    done = records(results)
    done[str(shard)] = inputs["input"]
    (results / "done.json").write_text(json.dumps(done))


def summarise(store: str, results: str) -> int:
    return sum(json.loads(path.read_text()) for path in sorted(Path(results).glob("shard-*.json")))


DUMMY_STAGE = Stage(
    name="dummy",
    shards="dummy shards",
    prepare=prepare,
    open_output=open_output,
    shard_count=shard_count,
    completed_shards=completed_shards,
    forget_stale_shards=forget_stale_shards,
    compute_shard=compute_shard,
    mark_completed=mark_completed,
    summarise=summarise,
    open_input=open_input,
    retry=RetryPolicy(delays=(0.01,)),  # one retry, at once
)


def prepare_and_plan(run: StageRun) -> int:
    """`prepare`, then the plan the jobs carry: the factor of the run's settings (as extract's head and classes)."""
    prepare(run)
    return run.plan["factor"]


# The same stage in two parts, its plan found by preparing.
SPLIT_STAGE = dataclasses.replace(
    DUMMY_STAGE,
    name="split",
    shards="split shards",
    prepare=prepare_and_plan,
    compute_shard=compute_part,
    write_shard=write_part,
)


def computed(results: Path) -> list[int]:
    log = results / "computed.log"
    return sorted(int(line) for line in log.read_text().split()) if log.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> Path:
    folder = tmp_path / "store"
    folder.mkdir()
    for shard, values in enumerate([[1, 2], [3], [4, 5, 6]]):
        write_input(folder, shard, values)
    return folder


def check_protocol(store: Path, results: Path, stage: Stage = DUMMY_STAGE, plan=10, **where) -> None:
    """Run, rerun, make a shard stale and run again, with `where` (dask_address / workers) choosing where."""
    run = StageRun(store=str(store), results=str(results), plan=plan, **where)
    assert run_stage(stage, run) == (3 + 3 + 15) * 10
    assert computed(results) == [0, 1, 2]
    assert sorted(records(results)) == ["0", "1", "2"]  # every shard recorded, with its input's identity
    assert records(results)["1"] == input_identity(store, 1)
    assert not Path(str(results) + LOCK_SUFFIX).exists()  # released

    assert run_stage(stage, run) == 210  # a complete output: nothing computed again
    assert computed(results) == [0, 1, 2]

    write_input(store, 1, [7])  # shard 1's input written again: its result is stale
    assert run_stage(stage, run) == (3 + 7 + 15) * 10
    assert computed(results) == [0, 1, 1, 2]  # only shard 1 again
    assert records(results)["1"] == input_identity(store, 1)


def test_a_stage_runs_in_process_records_skips_done_shards_and_forgets_stale_ones(store, tmp_path, caplog):
    check_protocol(store, tmp_path / "results")
    assert (
        f"{tmp_path / 'results'}: dummy shards [1] were computed from store shards that were unfinished then "
        "or written again since: computing them again"
    ) in caplog.messages


@pytest.mark.end_to_end  # a Dask cluster
def test_a_stage_runs_on_a_dask_cluster_the_same(store, tmp_path):
    from tests.loopback_cluster import loopback_cluster

    logs = tmp_path / "logs"
    logs.mkdir()
    with loopback_cluster(logs, workers=2) as (address, _):
        check_protocol(store, tmp_path / "results", dask_address=address)
        write_input(store, 1, [3])
        check_protocol(store, tmp_path / "split", SPLIT_STAGE, {"factor": 10}, dask_address=address)


def test_a_split_stage_runs_in_process_with_the_plan_its_preparation_returns(store, tmp_path):
    check_protocol(store, tmp_path / "results", SPLIT_STAGE, {"factor": 10})
    assert json.loads((tmp_path / "results" / "settings.json").read_text()) == {"factor": 10}


def test_a_split_stage_writes_a_shard_while_the_next_is_computed(store, tmp_path):
    next_computed = threading.Event()
    seen = {}

    def compute(job: ShardJob):
        if job.shard_index == 1:
            next_computed.set()
        return compute_part(job)

    def write(job: ShardJob, computed_part):
        if job.shard_index == 0:  # set only if shard 1 is computed while this write is under way
            seen["overlapped"] = next_computed.wait(timeout=30)
        seen.setdefault("threads", set()).add(threading.current_thread() is threading.main_thread())
        return write_part(job, computed_part)

    stage = dataclasses.replace(SPLIT_STAGE, compute_shard=compute, write_shard=write)
    assert run_stage(stage, StageRun(store=str(store), results=str(tmp_path / "results"), plan={"factor": 1})) == 21
    assert seen == {"overlapped": True, "threads": {False}}  # written beside the computation, in another thread
    assert sorted(records(tmp_path / "results")) == ["0", "1", "2"]


def test_a_failed_computation_lets_the_write_under_way_end_and_record_nothing_more(store, tmp_path):
    (store / "full-2").touch()  # shard 2's computation fails while shard 1's write is under way
    writes = []

    def slow_write(job: ShardJob, computed_part):
        if job.shard_index == 1:
            threading.Event().wait(0.5)
        result = write_part(job, computed_part)
        writes.append(job.shard_index)
        return result

    results = tmp_path / "results"
    stage = dataclasses.replace(SPLIT_STAGE, write_shard=slow_write)
    with pytest.raises(OSError, match="No space left"):
        run_stage(stage, StageRun(store=str(store), results=str(results), plan={"factor": 1}))
    assert writes == [0, 1]  # shard 1's write ended before run_stage returned (and released the lock)
    assert sorted(records(results)) == ["0"]  # shard 1 is written but its completion was not recorded
    assert not Path(str(results) + LOCK_SUFFIX).exists()
    (store / "full-2").unlink()
    assert run_stage(SPLIT_STAGE, StageRun(store=str(store), results=str(results), plan={"factor": 1})) == 21
    assert computed(results) == [0, 1, 1, 2]  # shard 1 again (unrecorded), shard 0 not


def test_a_transient_io_error_is_retried_once_by_the_policy_in_process(store, tmp_path):
    (store / "fail-2-a").touch()  # shard 2 fails once: the retry computes it
    run = StageRun(store=str(store), results=str(tmp_path / "results"), plan=1)
    assert run_stage(DUMMY_STAGE, run) == 21
    assert not (store / "fail-2-a").exists()

    results = tmp_path / "again"
    (store / "fail-0-a").touch()
    (store / "fail-0-b").touch()  # twice: more than the policy's one retry
    with pytest.raises(OSError, match="Input/output error"):
        run_stage(DUMMY_STAGE, StageRun(store=str(store), results=str(results), plan=1))
    assert computed(results) == []
    assert not (store / "fail-0-b").exists()  # tried twice: once, and once again


def test_a_permanent_io_error_fails_at_once_and_the_shards_before_it_stay_recorded(store, tmp_path):
    (store / "full-1").touch()
    results = tmp_path / "results"
    with pytest.raises(OSError, match="No space left"):
        run_stage(DUMMY_STAGE, StageRun(store=str(store), results=str(results), plan=1))
    assert sorted(records(results)) == ["0"]
    (store / "full-1").unlink()
    assert run_stage(DUMMY_STAGE, StageRun(store=str(store), results=str(results), plan=1)) == 21
    assert computed(results) == [0, 1, 2]  # shard 0 not again


@pytest.mark.end_to_end  # a Dask cluster
def test_a_transient_io_error_on_a_dask_worker_is_retried_and_other_shards_are_recorded(store, tmp_path):
    from tests.loopback_cluster import loopback_cluster

    logs = tmp_path / "logs"
    logs.mkdir()
    (store / "fail-0-a").touch()  # retried on the worker
    (store / "full-2").touch()  # fails: shards 0 and 1 are still recorded
    results = tmp_path / "results"
    with loopback_cluster(logs, workers=2) as (address, _):
        with pytest.raises(OSError, match="No space left"):
            run_stage(DUMMY_STAGE, StageRun(store=str(store), results=str(results), plan=1, dask_address=address))
    assert sorted(records(results)) == ["0", "1"]
    assert not (store / "fail-0-a").exists()


def test_the_retry_policy_retries_transient_io_errors_only():
    from prefect.states import Failed

    assert RETRY_POLICY.retries(OSError(errno.EIO, "Input/output error"))
    assert not RETRY_POLICY.retries(OSError(errno.ENOSPC, "No space left on device"))
    assert not RETRY_POLICY.retries(ValueError("shard 1: 'value' has shape ..."))
    assert retry_on_io_error(None, None, Failed(data=OSError(errno.EIO, "Input/output error"))) is True
    assert retry_on_io_error(None, None, Failed(data=ValueError("a bad store"))) is False


def test_a_shard_job_is_one_frozen_value():
    import dataclasses
    import pickle

    job = StageRun(store="s.zarr", results="r.zarr", plan={"seed": 1}, device="cpu", workers=2).job(3)
    assert job == ShardJob("s.zarr", "r.zarr", {"seed": 1}, shard_index=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.shard_index = 4
    assert pickle.loads(pickle.dumps(job)) == job  # what goes to a Dask worker
