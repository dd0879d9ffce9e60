"""tasks/dask_cluster.py: the scheduler timeout and the message when no scheduler answers; glibc's thresholds for
freed memory on workers; one cluster per run; extraction, the causal stage and the explanations on a real cluster
give the in-process results, and a worker killed mid-run loses nothing (the loopback cluster:
tests/loopback_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flows.settings import CausalSettings, ExplainSettings, ExtractSettings
from storage_schemas.attention_store import completed_shards, open_attention_store
from storage_schemas.verification import content_digests
from tasks import dask_cluster
from tasks.dask_cluster import (
    DaskSchedulerUnreachableError,
    connect_dask_scheduler,
    dask_client,
    dask_timeout_seconds,
    run_cluster,
    task_resources,
    use_stage_cluster,
)
from tests.loopback_cluster import loopback_cluster
from tests.test_preflight import free_loopback_address


def test_dask_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, raising=False)
    assert dask_timeout_seconds() == 10.0
    monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, "2.5")
    assert dask_timeout_seconds() == 2.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, bad)
        with pytest.raises(ValueError) as raised:
            dask_timeout_seconds()
        assert str(raised.value) == (
            f"EFFATTN_DASK_TIMEOUT={bad!r}: give the seconds to wait for a Dask scheduler, e.g. EFFATTN_DASK_TIMEOUT=30"
        )


def test_no_scheduler_at_the_address_is_refused_within_the_timeout(monkeypatch):
    address = free_loopback_address()
    monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, "1")
    with pytest.raises(DaskSchedulerUnreachableError) as raised:
        connect_dask_scheduler(address)
    message = str(raised.value)  # "after 1 s": the timeout reached distributed (its default is 30 s)
    assert message.startswith(
        f"no Dask scheduler answers at {address} (waited 1 s; OSError: Timed out trying to "
        f"connect to {address} after 1 s): start one there"
    )
    assert message.endswith(
        "correct --dask-address, or leave it out to run on a local cluster; set EFFATTN_DASK_TIMEOUT=SECONDS to wait "
        "longer"
    )


def test_workers_keep_freed_memory_for_reuse_despite_dasks_trim_setting():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which makes every large temporary a fresh mmap; every
    stage's shard tasks reset glibc's thresholds (mallopt accepts them on glibc)."""
    import ctypes.util

    from tasks.dask_cluster import keep_freed_memory_for_reuse

    code = "from tasks.dask_cluster import keep_freed_memory_for_reuse as f; print(f())"
    environment = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        cwd=Path(__file__).parent.parent,
        check=True,
    ).stdout.strip()
    if (ctypes.util.find_library("c") or "").startswith("libc.so"):
        assert output == "True" and keep_freed_memory_for_reuse() is True
    else:  # no glibc: nothing to change
        assert output == "False"


# ---- extraction and the causal stage on a real cluster: `dask scheduler` + two `dask worker` on loopback ----

RUN = dict(limit=9, shard_size=2, batch_size=2, max_length=16, seed=0, train=False)


def test_a_run_cluster_is_started_on_first_use_kept_and_closed_on_exit(monkeypatch):
    """The stages of one run share one LocalCluster (started by the first that asks for it, or in the background
    beforehand); a run given an address, or whose stages never ask, starts none."""

    def no_local_cluster(workers):
        raise AssertionError("no LocalCluster should start")

    with monkeypatch.context() as patch:
        patch.setattr(dask_cluster, "local_cluster", no_local_cluster)
        with run_cluster("tcp://127.0.0.1:8786", None) as cluster:
            cluster.start_in_background(["json"])
            assert cluster.address() == "tcp://127.0.0.1:8786"
        with run_cluster(None, 1):
            pass
    for in_background in (False, True):
        with run_cluster(None, 1) as cluster:
            if in_background:
                cluster.start_in_background(["xarray"])
            address = cluster.address()
            assert cluster.address() == address  # the same cluster for the next stage
            with dask_client(address, None) as client:
                assert len(client.scheduler_info()["workers"]) == 1
                worker_pid = next(iter(client.run(os.getpid).values()))
                imported = next(iter(client.run(lambda: "xarray" in sys.modules).values()))
                assert imported == in_background
            with dask_client(address, None) as client:  # the worker process is kept, its imports too
                assert next(iter(client.run(os.getpid).values())) == worker_pid
        with pytest.raises(DaskSchedulerUnreachableError):
            connect_dask_scheduler(address, timeout=1)


def test_a_run_cluster_that_failed_to_start_in_the_background_says_why_when_asked(monkeypatch):
    def failing_local_cluster(workers):
        raise OSError("no room for workers")

    monkeypatch.setattr(dask_cluster, "local_cluster", failing_local_cluster)
    with run_cluster(None, 1) as cluster:
        cluster.start_in_background([])
        with pytest.raises(OSError, match="no room for workers"):
            cluster.address()


def _extract_settings(folder: Path, model_folder: Path, corpus: Path, name: str, **options) -> ExtractSettings:
    return ExtractSettings(corpus=str(corpus), model=str(model_folder), store=str(folder / name), **RUN, **options)


@pytest.mark.end_to_end
def test_extraction_causal_and_explain_on_a_cluster_equal_the_in_process_run(
    tmp_path, tiny_bert_folder, small_corpus_csv
):
    from flows.causal import causal
    from flows.explain import explain
    from flows.extract import extract

    local = _extract_settings(tmp_path, tiny_bert_folder, small_corpus_csv, "local.zarr")
    extract(local)
    causal_options = dict(
        interventions=["replay", "uniform", "ablate"], scopes=["all", "layer"], scope_examples=4, batch_size=2
    )
    causal(CausalSettings(store=local.store, results=str(tmp_path / "local-results.zarr"), **causal_options))
    explain_options = dict(
        methods=["attention:rollout", "leave-one-out", "random"], examples=4, shard_size=2, minimality_rows=0
    )
    explain(ExplainSettings(store=local.store, results=str(tmp_path / "local-explanations.zarr"), **explain_options))
    with loopback_cluster(tmp_path) as (address, _):
        remote = _extract_settings(tmp_path, tiny_bert_folder, small_corpus_csv, "remote.zarr", dask_address=address)
        extract(remote)
        causal(
            CausalSettings(
                store=local.store, results=str(tmp_path / "remote-results.zarr"), dask_address=address, **causal_options
            )
        )
        explain(
            ExplainSettings(
                store=local.store,
                results=str(tmp_path / "remote-explanations.zarr"),
                dask_address=address,
                **explain_options,
            )
        )
        from distributed import Client

        with Client(address) as client:  # both workers took shards: the work was spread
            ran = client.run(lambda: __import__("tasks.models", fromlist=["x"]).load_model_once.cache_info().currsize)
        assert sorted(ran.values()) == [1, 1]
    assert completed_shards(open_attention_store(remote.store)) == [0, 1, 2, 3, 4]
    assert content_digests(remote.store) == content_digests(local.store)
    local_results = xr.open_zarr(str(tmp_path / "local-results.zarr"), consolidated=False).load()
    remote_results = xr.open_zarr(str(tmp_path / "remote-results.zarr"), consolidated=False).load()
    measured = [name for name, array in local_results.data_vars.items() if "example" in array.dims]
    assert "agreement" in measured and "max_abs_logit_change" in measured
    for name in measured:
        np.testing.assert_array_equal(remote_results[name].values, local_results[name].values)
    assert remote_results.attrs["claims"] == local_results.attrs["claims"]
    local_explanations = xr.open_zarr(str(tmp_path / "local-explanations.zarr"), consolidated=False).load()
    remote_explanations = xr.open_zarr(str(tmp_path / "remote-explanations.zarr"), consolidated=False).load()
    assert remote_explanations.attrs["completed_shards"] == [0, 1]
    for name in ("faithfulness", "aopc", "kendall_tau", "attribution", "target", "full_probability"):
        np.testing.assert_array_equal(remote_explanations[name].values, local_explanations[name].values)
    assert remote_explanations.attrs["claims"] == local_explanations.attrs["claims"]


@pytest.mark.end_to_end
def test_a_worker_killed_during_an_extraction_loses_nothing(tmp_path, tiny_bert_folder, small_corpus_csv, monkeypatch):
    """Worker 1 is killed (SIGKILL, by its process id) as the first shard is recorded: the scheduler gives its
    shards to worker 0, or the run fails naming what failed; either way a rerun completes a store equal to the
    in-process one."""
    import tasks.extraction
    from flows.extract import extract

    local = _extract_settings(tmp_path, tiny_bert_folder, small_corpus_csv, "local.zarr")
    extract(local)
    record = tasks.extraction.mark_shard_completed  # what the extract stage records a shard with
    with loopback_cluster(tmp_path) as (address, processes):
        victim = processes[2]

        def record_then_kill(group, shard):
            record(group, shard)
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()

        monkeypatch.setattr(tasks.extraction, "mark_shard_completed", record_then_kill)
        remote = _extract_settings(tmp_path, tiny_bert_folder, small_corpus_csv, "remote.zarr", dask_address=address)
        try:
            extract(remote)
        except Exception as error:  # noqa: BLE001 - a clean failure is allowed; the rerun below must complete
            print(f"first run failed: {type(error).__name__}: {error}")
        assert victim.poll() is not None  # the kill happened during the run
        recorded = completed_shards(open_attention_store(remote.store))
        assert recorded and recorded == sorted(set(recorded))
        monkeypatch.setattr(tasks.extraction, "mark_shard_completed", record)
        extract(remote)  # the surviving worker does what is left
    assert completed_shards(open_attention_store(remote.store)) == [0, 1, 2, 3, 4]
    assert content_digests(remote.store) == content_digests(local.store)


def test_gpu_tasks_ask_for_one_gpu_and_cpu_tasks_for_nothing():
    assert task_resources("cuda") == {"GPU": 1}
    assert task_resources("cuda:1") == {"GPU": 1}
    assert task_resources("cpu") is None
    assert not use_stage_cluster(None, None)
    assert use_stage_cluster("tcp://127.0.0.1:8786", None) and use_stage_cluster(None, 2)


CLUSTER_FROM_STDIN = """
import sys
from distributed import Client, LocalCluster

from tasks.dask_cluster import local_cluster

if __name__ == "__main__":
    print("main file:", __file__, flush=True)
    cluster = local_cluster(1) if sys.argv[1] == "effattn" else LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster as started, Client(started) as client:
        print("sum on a worker:", client.submit(sum, [1, 2, 3]).result(timeout=60), flush=True)
    print("main file after:", __file__, flush=True)
"""


def test_a_local_cluster_starts_from_a_script_read_from_standard_input():
    """`python - < script.py`: spawned worker processes would run the main module's file `<stdin>` again, which
    does not exist (a plain LocalCluster's nanny fails to start); effattn's local cluster hides it from them."""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def run(which: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-", which],
            input=CLUSTER_FROM_STDIN,
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )

    ours = run("effattn")
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert ours.stdout.splitlines() == ["main file: <stdin>", "sum on a worker: 6", "main file after: <stdin>"]
    plain = run("plain")  # the failure the hiding avoids
    assert plain.returncode != 0 and "sum on a worker" not in plain.stdout


def test_a_worker_process_gets_the_object_store_time_limits(monkeypatch):
    import fsspec.config

    from tasks.dask_cluster import prepare_worker_process

    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setenv("EFFATTN_STORAGE_TIMEOUT", "7")
    prepare_worker_process()
    limits = fsspec.config.conf["s3"]["config_kwargs"]
    assert (limits["connect_timeout"], limits["read_timeout"]) == (7.0, 7.0)
