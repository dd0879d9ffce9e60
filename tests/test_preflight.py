"""flows/preflight.py: the checks the CLI runs before Prefect starts. Each refusal is pinned, and nothing is written."""

from __future__ import annotations

import os
import re
import socket

import pytest

from flows import preflight
from flows.preflight import (
    check_command,
    check_device,
    check_writable_location,
)
from flows.settings import CausalSettings, EfficientSettings, ExtractSettings, ReportSettings


def free_loopback_address() -> str:
    """tcp://127.0.0.1:PORT where nothing listens (a port just handed out by the kernel and closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_a_location_under_a_regular_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ValueError) as raised:
        check_writable_location(str(afile / "s.zarr"), "--store")
    assert str(raised.value) == (
        f"cannot create --store {afile / 's.zarr'}: {afile} is a file, not a folder: choose a --store whose parent "
        "folders are folders. Nothing was written"
    )
    with pytest.raises(ValueError, match=f"cannot create --store .*: {afile} is a file"):
        check_writable_location(str(afile / "deeper" / "s.zarr"), "--store")
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_location_that_is_a_file_is_refused(tmp_path):
    report = tmp_path / "rep.html"
    report.write_text("<html>")
    with pytest.raises(ValueError) as raised:
        check_writable_location(str(report), "--out")
    assert str(raised.value) == (
        f"--out {report} is a file, not a folder: --out names a folder (created if needed); choose another path or "
        "move that file away. Nothing was written"
    )
    assert report.read_text() == "<html>"


def test_a_folder_that_accepts_no_files_is_refused():
    # /proc refuses new entries even to root (a chmod-ed folder would not stop root)
    with pytest.raises(ValueError) as raised:
        check_writable_location("/proc/s.zarr", "--store")
    assert str(raised.value) == (
        "cannot create --store /proc/s.zarr: the folder /proc does not accept new files (No such file or directory): "
        "choose a --store in a folder this user may write to, or fix that folder's permissions. Nothing was written"
    )


def test_usable_locations_pass_and_leave_nothing_behind(tmp_path):
    check_writable_location(str(tmp_path / "new" / "deeper" / "s.zarr"), "--store")  # created later by the stage
    (tmp_path / "existing.zarr").mkdir()
    check_writable_location(str(tmp_path / "existing.zarr"), "--store")
    check_writable_location(f"file://{tmp_path}/other.zarr", "--store")
    check_writable_location("s3://bucket/s.zarr", "--store")  # remote: reached by the stage, not here
    assert os.listdir(tmp_path) == ["existing.zarr"] and os.listdir(tmp_path / "existing.zarr") == []


def test_cuda_without_cuda_is_refused(monkeypatch):
    import torch

    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError) as raised:
        check_device("cuda")
    assert str(raised.value) == (
        f"--device cuda: this torch ({torch.__version__}) was built without CUDA: run with --device cpu, or on a "
        "machine with a GPU and a CUDA build of torch. Nothing was written"
    )
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match="^--device cuda: no CUDA device is visible to torch: run with --device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device("cuda")


def test_a_live_scheduler_passes():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        preflight.check_dask_scheduler(cluster.scheduler_address)


def test_extract_checks_the_store_location_before_the_corpus(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    settings = ExtractSettings(store=str(afile / "s.zarr"), corpus=str(tmp_path / "missing.csv"), model="minilm")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_command("extract", settings)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        check_command("extract", settings.model_copy(update={"store": str(tmp_path / "s.zarr")}))
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_commands_on_a_missing_store_are_refused(tmp_path):
    store = str(tmp_path / "nothing.zarr")
    for command, settings in (
        ("efficient", EfficientSettings(store=store)),
        ("causal", CausalSettings(store=store, results=str(tmp_path / "r.zarr"))),
        ("report", ReportSettings(results=str(tmp_path / "r.zarr"), out=str(tmp_path / "rep"))),
    ):
        with pytest.raises(ValueError, match="there (is no attention store|are no causal results) at"):
            check_command(command, settings)
    assert os.listdir(tmp_path) == []


def test_view_refuses_a_missing_store_a_bad_port_and_a_busy_port(tmp_path):
    from flows.settings import ViewSettings
    from tests.store_builders import build_text_store

    with pytest.raises(ValueError, match="there is no attention store at"):
        check_command("view", ViewSettings(store=str(tmp_path / "nothing.zarr")))
    store = build_text_store(str(tmp_path / "s.zarr"), ["a", "b"], [0, 1], shard_size=2)
    with pytest.raises(ValueError, match="--port must be 1..65535, got 70000"):
        check_command("view", ViewSettings(store=store, port=70000))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port} .*choose another with --port"):
            check_command("view", ViewSettings(store=store, port=port))
    check_command("view", ViewSettings(store=store, port=port))  # free again


def test_a_max_length_below_two_is_refused():
    preflight.check_max_length(2)
    with pytest.raises(ValueError) as refused:
        preflight.check_max_length(1)
    assert str(refused.value) == (
        "--max-length must be at least 2 tokens, got 1: give a larger --max-length (default 128). Nothing was written"
    )


def test_a_store_folder_that_accepts_no_files_is_refused(tmp_path, monkeypatch):
    store = tmp_path / "store.zarr"
    preflight.check_writable_store(str(store), "--store")  # not there yet: nothing to check here
    store.mkdir()
    preflight.check_writable_store(str(store), "--store")
    assert list(store.iterdir()) == []

    def refuse(prefix, dir):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError) as refused:
        preflight.check_writable_store(str(store), "--store")
    assert str(refused.value) == (
        f"cannot write into --store {store}: the store's folder does not accept new files (Read-only file system; a "
        "read-only disk or mount, or missing permissions): copy the store to a place this user may write to and pass "
        "that as --store, or fix the permissions. Nothing was written"
    )
    preflight.check_writable_store("s3://bucket/s.zarr", "--store")  # remote: the stage finds out


def test_interventions_are_parsed_only_when_named_and_refused_naming_their_flag(tmp_path):
    settings = CausalSettings(store="s.zarr", results="r.zarr")
    assert preflight.check_interventions(settings) is None
    named = settings.model_copy(
        update={
            "interventions": ("replay", "null:simplex", "efficient+null-noise:effective", "minimality:effective:k=2")
        }
    )
    assert preflight.check_interventions(named) == ["effective", "simplex"]  # what they read from the store
    layer_only = settings.model_copy(update={"layer_interventions": ("ablate",)})
    assert preflight.check_interventions(layer_only) is None
    with pytest.raises(ValueError, match=r"^--layer-interventions: cannot read intervention 'a:b:c:d'"):
        preflight.check_interventions(settings.model_copy(update={"layer_interventions": ("a:b:c:d",)}))


def test_extract_into_an_existing_store_compares_what_it_can_without_the_model(tmp_path, tiny_bert_folder):
    from tests.conftest import write_reviews_csv
    from tests.store_builders import build_real_store

    corpus = write_reviews_csv(tmp_path / "reviews.csv")
    store = build_real_store(str(tmp_path / "s.zarr"), tiny_bert_folder, corpus, variants=())
    same = ExtractSettings(store=store, corpus=str(corpus), model=str(tiny_bert_folder), max_length=24)
    preflight.check_existing_store_matches(same)
    preflight.check_existing_store_matches(same.model_copy(update={"store": str(tmp_path / "new.zarr")}))
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{store} was written by a different run (extraction.requested_max_length: store has 24, this run has "
            f"128): use another --store, or delete {store} to start over"
        ),
    ):
        preflight.check_existing_store_matches(same.model_copy(update={"max_length": 128}))
    with pytest.raises(ValueError, match=r"\(extraction.task: store has 'classification', this run has 'next-token'"):
        preflight.check_existing_store_matches(same.model_copy(update={"task": "next-token"}))
