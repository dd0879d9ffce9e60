"""Crashes and a full disk, with real `effattn` subprocesses: a run killed with SIGKILL at a seeded random moment
(its whole process group: Dask workers included) and then rerun completes the store with exactly the content of an
uninterrupted run; a disk that fills up mid-shard stops the run with a message, keeps every completed shard, and a
rerun after freeing space completes the store; a store path that is not writable is refused with a message.

The runs share one Prefect server on loopback (started here, stopped by its process group id): each CLI call then
costs a few seconds instead of starting its own temporary server.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from analysis.efficient_attention import efficient_attention
from storage_schemas.attention_store import open_attention_store
from storage_schemas.store_lock import LOCK_SUFFIX
from storage_schemas.verification import content_digests, verify_store
from tests import crash_harness
from tests.store_builders import write_corpus

SHARD_SIZE = 5
N_SHARDS = 12  # 60 reviews in shards of 5
SEED = 20261124


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def environment(workspace):
    with crash_harness.prefect_server(workspace) as environment:
        yield environment


@pytest.fixture(scope="module")
def extract_arguments(workspace, tiny_bert_folder) -> list[str]:
    corpus = write_corpus(workspace / "reviews.csv", copies=6)
    return [
        "extract",
        "--corpus",
        str(corpus),
        "--model",
        str(tiny_bert_folder),
        "--no-train",
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        "5",
        "--max-length",
        "32",
    ]


@pytest.fixture(scope="module")
def clean_extraction(workspace, environment, extract_arguments) -> tuple[str, dict]:
    """The uninterrupted run: its store and digests."""
    store = str(workspace / "clean.zarr")
    done = crash_harness.run([*extract_arguments, "--store", store], environment, workspace / "clean")
    assert done.returncode == 0, done.stderr
    assert crash_harness.extraction_progress(store) == N_SHARDS
    return store, content_digests(store)


def lock_file(store: str) -> Path:
    return Path(os.path.realpath(store) + LOCK_SUFFIX)


def test_extraction_killed_at_a_random_moment_resumes_to_the_same_store(
    workspace, environment, extract_arguments, clean_extraction
):
    chance = random.Random(SEED)
    reached, delay = chance.randrange(0, N_SHARDS - 3), chance.uniform(0.0, 0.05)
    store = str(workspace / "killed.zarr")
    arguments = [*extract_arguments, "--store", store]

    kill = crash_harness.kill_when(
        arguments, environment, workspace / "killed", lambda: crash_harness.extraction_progress(store), reached, delay
    )
    assert not kill.finished_first and kill.survivors == []
    assert reached <= crash_harness.extraction_progress(store) < N_SHARDS
    assert lock_file(store).exists()  # left behind by the killed run: the rerun must take it over

    rerun = crash_harness.run(arguments, environment, workspace / "killed-rerun")
    assert rerun.returncode == 0, rerun.stderr
    assert content_digests(store) == clean_extraction[1]
    assert verify_store(store).ok
    assert not lock_file(store).exists()


def test_efficient_stage_killed_at_a_random_moment_resumes_to_the_same_store(workspace, environment, clean_extraction):
    clean, killed = str(workspace / "efficient-clean.zarr"), str(workspace / "efficient-killed.zarr")
    shutil.copytree(clean_extraction[0], clean)
    shutil.copytree(clean_extraction[0], killed)
    efficient = ["efficient", "--workers", "1"]
    done = crash_harness.run([*efficient, "--store", clean], environment, workspace / "efficient-clean")
    assert done.returncode == 0, done.stderr

    chance = random.Random(SEED + 1)
    reached, delay = chance.randrange(0, N_SHARDS - 3), chance.uniform(0.0, 0.05)
    kill = crash_harness.kill_when(
        [*efficient, "--store", killed],
        environment,
        workspace / "efficient-killed",
        lambda: crash_harness.efficient_progress(killed),
        reached,
        delay,
    )
    assert not kill.finished_first and kill.survivors == []  # no Dask worker outlives the kill
    assert reached <= crash_harness.efficient_progress(killed) < N_SHARDS

    rerun = crash_harness.run([*efficient, "--store", killed], environment, workspace / "efficient-rerun")
    assert rerun.returncode == 0, rerun.stderr
    assert content_digests(killed) == content_digests(clean)
    assert verify_store(killed).ok


def shard_files(store: str) -> dict[str, int]:
    """Every chunk or shard file of the store -> its modification time (ns)."""
    return {
        str(path.relative_to(store)): path.stat().st_mtime_ns for path in Path(store).rglob("c/**/*") if path.is_file()
    }


def test_a_disk_that_fills_up_mid_shard_loses_nothing_and_a_rerun_completes(
    workspace, environment, extract_arguments, clean_extraction
):
    clean, digests = clean_extraction
    sizes = sorted(path.stat().st_size for path in (Path(clean) / "attention" / "c").rglob("*") if path.is_file())
    limit = (sizes[0] + sizes[-1]) // 2  # the short first shards fit, a later, longer one does not
    store = str(workspace / "full.zarr")
    arguments = [*extract_arguments, "--store", store]

    failed = crash_harness.run(arguments, environment, workspace / "full", file_size_limit=limit)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.startswith("effattn extract: error: ")]
    assert len(errors) == 1, failed.stderr
    assert errors[0].startswith(f"effattn extract: error: no space left while writing {store} (File too large")
    assert errors[0].endswith(
        "): free space on that disk (or raise the quota or the file size limit), then run the same command again. "
        "Shards already completed are kept; the shard being written was not marked done and will be written again"
    )
    done = crash_harness.extraction_progress(store)
    assert 0 < done < N_SHARDS
    report = verify_store(store)
    assert report.ok, report.text()  # what is recorded as done is sound; the rest is only "not completed"
    assert report.status == "incomplete"
    assert (
        report.unfinished[0] == f"extraction shards {list(range(done, N_SHARDS))} are not completed: run the "
        "`effattn extract` command that created the store again to finish them"
    )
    kept = {
        name: mtime
        for name, mtime in shard_files(store).items()
        if name.startswith(("attention/", "value/")) and int(name.split("/")[2]) < done
    }
    assert len(kept) == 2 * done

    rerun = crash_harness.run(arguments, environment, workspace / "full-rerun")  # space freed: no limit
    assert rerun.returncode == 0, rerun.stderr
    assert content_digests(store) == digests
    after = shard_files(store)
    assert {name: after[name] for name in kept} == kept  # completed shards were neither lost nor rewritten


def test_a_store_path_that_is_not_writable_is_refused(workspace, environment, extract_arguments):
    folder = workspace / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions; sysfs refuses new files even to root
        folder = Path("/sys/effattn-test")
    store = str(folder / "store.zarr")
    try:
        refused = crash_harness.run([*extract_arguments, "--store", store], environment, workspace / "read-only")
    finally:
        (workspace / "read-only").chmod(0o755)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("effattn extract: error: ")]
    assert len(errors) == 1, refused.stderr
    assert errors[0].startswith(f"effattn extract: error: cannot create --store {store}: the folder ")  # pre-flight
    assert errors[0].endswith(
        "): choose a --store in a folder this user may write to, or fix that folder's permissions. Nothing was written"
    )
    assert not os.path.exists(store)


def expected_efficient(store: str, variant: str) -> np.ndarray:
    """`variant` computed here from the store's stored attention and values: [example, layer, head, query, key]."""
    group = open_attention_store(store)
    result = efficient_attention(
        group["attention"][:],
        group["value"][:],
        group["w_out"][:],
        group["length"][:],
        causal=bool(group.attrs["model"]["causal"]),
        variants=[variant],
        output_dtype=np.float32,
    )
    return result[variant].efficient


def test_an_interrupted_extraction_is_refused_by_efficient_and_causal_until_it_is_finished(
    workspace, environment, extract_arguments
):
    """The issue's sequence: extraction interrupted (SIGINT to its process group, as Ctrl-C does) after its first
    shard; `efficient` and `causal` refuse the store (naming the missing shards and the command), write nothing;
    extract again, then both stages compute every shard from the real tensors (none left at zero, replay holds for
    every example)."""
    store, results = str(workspace / "interrupted.zarr"), str(workspace / "interrupted.results.zarr")
    arguments = [*extract_arguments, "--store", store]
    interrupted = crash_harness.interrupt_when(
        arguments,
        environment,
        workspace / "interrupted",
        lambda: crash_harness.extraction_progress(store),
        1,
        signal.SIGINT,
    )
    assert not interrupted.finished_first and interrupted.survivors == []
    assert interrupted.returncode == 130, interrupted.stderr
    done = open_attention_store(store).attrs["completed_shards"]
    missing = sorted(set(range(N_SHARDS)) - set(done))
    assert done and missing

    refused = crash_harness.run(
        ["efficient", "--store", store, "--variants", "effective", "--workers", "1"],
        environment,
        workspace / "interrupted-efficient",
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("effattn efficient: error: ")]
    assert len(errors) == 1, refused.stderr
    assert errors[0].startswith(
        f"effattn efficient: error: {store}: extraction shards {missing} (examples {missing[0] * SHARD_SIZE} to "
    )
    assert (
        "are not complete (unwritten shards read as zeros), so `effattn efficient` cannot run on this store "
        f"yet: finish them by running the `effattn extract --corpus {extract_arguments[2]} --model "
        f"{extract_arguments[4]} --store {store} ...` command that created the store again" in errors[0]
    )
    assert "efficient" not in open_attention_store(store)  # nothing computed, nothing recorded

    causal = [
        "causal",
        "--store",
        store,
        "--results",
        results,
        "--interventions",
        "replay,efficient:effective",
        "--scopes",
        "all",
    ]
    refused = crash_harness.run(causal, environment, workspace / "interrupted-causal")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("effattn causal: error: ")]
    assert len(errors) == 1, refused.stderr
    # the pre-flight names the unfinished extraction first (the efficient attention it lacks comes after it)
    unfinished = f"effattn causal: error: {store}: extraction shards {missing} (examples "
    assert errors[0].startswith(unfinished)
    assert "so `effattn causal` cannot run on this store yet" in errors[0]
    replay_only = crash_harness.run(
        [*causal[:5], "--interventions", "replay", "--scopes", "all"], environment, workspace / "interrupted-replay"
    )
    assert replay_only.returncode == 2
    assert [line for line in replay_only.stderr.splitlines() if line.startswith(unfinished)], replay_only.stderr
    assert not Path(results).exists()

    finished = crash_harness.run(arguments, environment, workspace / "interrupted-rerun")
    assert finished.returncode == 0, finished.stderr
    computed = crash_harness.run(
        ["efficient", "--store", store, "--variants", "effective", "--workers", "1"],
        environment,
        workspace / "finished-efficient",
    )
    assert computed.returncode == 0, computed.stderr
    group = open_attention_store(store)
    stored = group["efficient/effective"][:]
    assert all(stored[example].any() for example in range(stored.shape[0]))  # no example left at zero
    np.testing.assert_allclose(stored, expected_efficient(store, "effective"), rtol=0, atol=1e-6)

    measured = crash_harness.run(causal, environment, workspace / "finished-causal")
    assert measured.returncode == 0, measured.stderr
    dataset = xr.open_zarr(results, consolidated=False)
    replay = dataset.sel(intervention="replay", target="all")
    assert (replay["agreement"].values == 1).all()
    assert replay["stored_logit_difference"].values.max() <= 1e-4  # replayed the real tensors of every example
    sufficiency = dataset.sel(intervention="efficient:effective", target="all")
    assert (sufficiency["agreement"].values == 1).all() and np.isfinite(sufficiency["kl_divergence"].values).all()


def append_progress(store: str, examples_before: int) -> int:
    """1 once an append to `store` has begun (recorded, or already committed), else 0."""
    try:
        attributes = json.loads((Path(store) / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return 0
    grown = attributes.get("layout", {}).get("n_examples", 0) > examples_before
    return int("append_in_progress" in attributes or grown)


def test_a_run_killed_while_appending_to_a_growing_store_ends_equal_to_a_run_from_scratch(
    workspace, environment, tiny_bert_folder
):
    from tests.store_builders import assert_run_outputs_equal
    from tests.test_serve import GROWTH_OPTIONS

    rows = write_corpus(workspace / "growing-all.csv", copies=8).read_text(encoding="utf-8").splitlines(keepends=True)
    folder = workspace / "growing"
    feed = folder / "feed" / "reviews.csv"
    feed.parent.mkdir(parents=True)
    arguments = ["run", "--corpus", str(feed), "--model", str(tiny_bert_folder), *GROWTH_OPTIONS, "--run-dir"]
    feed.write_text("".join(rows[: 1 + 48]), encoding="utf-8")
    first = crash_harness.run([*arguments, str(folder / "runs")], environment, workspace / "growing-first")
    assert first.returncode == 0, first.stderr
    (store,) = [path for path in (folder / "runs").glob("*.zarr") if path.name.count(".") == 1]

    feed.write_text("".join(rows[: 1 + 64]), encoding="utf-8")
    delay = random.Random(SEED + 2).uniform(0.0, 0.3)
    kill = crash_harness.kill_when(
        [*arguments, str(folder / "runs")],
        environment,
        workspace / "growing-killed",
        lambda: append_progress(str(store), 48),
        1,
        delay,
    )
    assert not kill.finished_first and kill.survivors == []
    rerun = crash_harness.run([*arguments, str(folder / "runs")], environment, workspace / "growing-rerun")
    assert rerun.returncode == 0, rerun.stderr
    group = open_attention_store(str(store))
    assert [run["examples_added"] for run in group.attrs["runs"]] == [48, 16]  # nothing lost or added twice

    scratch = workspace / "scratch"
    scratch_feed = scratch / "feed" / "reviews.csv"
    scratch_feed.parent.mkdir(parents=True)
    scratch_feed.write_text("".join(rows[: 1 + 64]), encoding="utf-8")
    done = crash_harness.run(
        [
            "run",
            "--corpus",
            str(scratch_feed),
            "--model",
            str(tiny_bert_folder),
            *GROWTH_OPTIONS,
            "--run-dir",
            str(scratch / "runs"),
        ],
        environment,
        workspace / "growing-scratch",
    )
    assert done.returncode == 0, done.stderr
    assert_run_outputs_equal(store, scratch / "runs" / store.name, "effective")
