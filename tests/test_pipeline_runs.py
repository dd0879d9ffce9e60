"""storage_schemas.pipeline_runs: run names and paths, input fingerprints, and the completeness checks that let
the pipeline skip a stage (on small stores built directly, no model)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from storage_schemas.attention_store import (
    AttentionStoreError,
    AttentionStoreLayout,
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)
from storage_schemas.pipeline_runs import (
    EXTRACTION_INPUTS_ATTRIBUTE,
    efficient_complete,
    efficient_status,
    extraction_complete,
    extraction_status,
    local_input_fingerprint,
    name_part,
    read_diagnostics,
    record_extraction_inputs,
    run_name,
    run_paths,
)
from tests.conftest import write_reviews_csv

LAYOUT = AttentionStoreLayout(
    n_examples=5,
    max_length=6,
    n_classes=2,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=3,
    hidden=8,
    shard_size=2,
    dtype="float32",
)  # 3 shards
SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}
INPUTS = {
    "corpus": "rt-sentiment",
    "corpus_fingerprint": None,
    "model": "minilm",
    "model_fingerprint": None,
    "limit": 5,
    "max_length": 128,
    "split": None,
    "train": True,
}


@pytest.fixture()
def store(tmp_path):
    url = str(tmp_path / "store.zarr")
    mark_prepared(create_attention_store(url, LAYOUT, {"model": {"causal": False}}))
    return url


def complete_extraction(url: str) -> None:
    group = open_attention_store(url, mode="r+")
    for shard in range(LAYOUT.n_shards):
        mark_shard_completed(group, shard)


def compute_variant(url: str, variant: str, shards, settings=SETTINGS) -> None:
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, variant, settings)
    for shard in shards:
        region = LAYOUT.shard_slice(shard)
        n = region.stop - region.start
        efficient = np.full((n, LAYOUT.layers, LAYOUT.heads, LAYOUT.max_length, LAYOUT.max_length), 0.5)
        diagnostics = {
            name: np.full((n, LAYOUT.layers, LAYOUT.heads), shard + 1).astype(dtype)
            for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items()
        }
        write_efficient_shard(group, LAYOUT, variant, shard, efficient, diagnostics)
        mark_efficient_shard_completed(group, variant, shard)


# --- names and paths ---


def test_run_name_from_corpus_model_and_limit(tmp_path):
    assert run_name("rt-sentiment", "minilm", 300) == "rt-sentiment-minilm-300"
    assert run_name("rt-sentiment", "minilm", None) == "rt-sentiment-minilm-all"
    corpus = write_reviews_csv(tmp_path / "my reviews.csv")
    model = tmp_path / "models" / "bert_v2"
    model.mkdir(parents=True)
    assert run_name(str(corpus), str(model) + "/", 10) == "my-reviews-bert_v2-10"


def test_non_default_settings_add_a_digest_that_depends_on_them_only():
    plain = run_name("bbc-topic", "smollm2", 64)
    first = run_name("bbc-topic", "smollm2", 64, {"max_length": 256, "task": "next-token"})
    assert re.fullmatch(r"bbc-topic-smollm2-64-[0-9a-f]{8}", first)
    assert first == run_name("bbc-topic", "smollm2", 64, {"task": "next-token", "max_length": 256})  # key order
    assert first != run_name("bbc-topic", "smollm2", 64, {"max_length": 512, "task": "next-token"})
    assert run_name("bbc-topic", "smollm2", 64, {}) == plain


def test_name_part_keeps_only_safe_characters():
    assert name_part("rt-sentiment") == "rt-sentiment"
    assert name_part("/data/ünïcode & spaces") == "n-code-spaces"
    assert name_part("///") == "input"


def test_run_paths():
    paths = run_paths("runs/", "rt-sentiment-minilm-300")
    assert paths.store == "runs/rt-sentiment-minilm-300.zarr"
    assert paths.results == "runs/rt-sentiment-minilm-300.results.zarr"
    assert paths.report == "runs/rt-sentiment-minilm-300-report"
    labelled = run_paths("s3://bucket/runs", "x-y-3", "effective+simplex")
    assert labelled.store == "s3://bucket/runs/x-y-3.zarr"
    assert labelled.results == "s3://bucket/runs/x-y-3-effective+simplex.results.zarr"
    assert labelled.report == "s3://bucket/runs/x-y-3-effective+simplex-report"


# --- fingerprints of local inputs ---


def test_fingerprint_of_a_file_changes_with_its_content_or_time(tmp_path):
    corpus = write_reviews_csv(tmp_path / "reviews.csv")
    first = local_input_fingerprint(str(corpus))
    assert first.startswith("sha256:") and local_input_fingerprint(str(corpus)) == first
    corpus.write_text(corpus.read_text().replace("quiet", "loud "))  # same size
    os.utime(corpus, ns=(1, 1))
    assert local_input_fingerprint(str(corpus)) != first


def test_fingerprint_of_a_folder_covers_every_file(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    first = local_input_fingerprint(str(folder))
    (folder / "sub" / "weights.safetensors").write_bytes(b"1234")
    second = local_input_fingerprint(str(folder))
    assert second != first
    (folder / "sub" / "weights.safetensors").write_bytes(b"12345")
    assert local_input_fingerprint(str(folder)) != second


def test_no_fingerprint_for_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_input_fingerprint("minilm") is None


# --- extraction ---


def test_extraction_status_absent_partial_unrecorded_and_complete(store, tmp_path):
    missing = str(tmp_path / "missing.zarr")
    assert extraction_status(missing, INPUTS).reason == f"no attention store at {missing} yet"
    assert extraction_status(store, INPUTS).reason == "3 of 3 shards still to extract"
    mark_shard_completed(open_attention_store(store, mode="r+"), 0)
    assert extraction_status(store, INPUTS).reason == "2 of 3 shards still to extract"
    complete_extraction(store)
    check = extraction_status(store, INPUTS)
    assert not check.complete and check.reason == "the store has no record of the pipeline inputs that wrote it"
    record_extraction_inputs(store, INPUTS)
    assert open_attention_store(store).attrs[EXTRACTION_INPUTS_ATTRIBUTE] == INPUTS
    check = extraction_status(store, INPUTS)
    assert check.complete and check.reason == "all 3 shards extracted for the same inputs"
    assert extraction_complete(store, dict(reversed(list(INPUTS.items()))))  # key order does not matter


def test_other_inputs_are_not_complete_and_are_named(store):
    complete_extraction(store)
    record_extraction_inputs(store, INPUTS)
    check = extraction_status(store, {**INPUTS, "limit": 6, "corpus_fingerprint": "sha256:00"})
    assert not check.complete
    assert check.reason == "it was extracted with other inputs (corpus_fingerprint, limit)"
    assert not extraction_complete(store, {**INPUTS, "epochs": 2})  # an input the record does not have


def test_an_input_added_later_matches_a_record_without_it_only_at_its_default(store):
    """A store recorded before `layers` existed was extracted with every layer: the default."""
    complete_extraction(store)
    record_extraction_inputs(store, INPUTS)
    defaults = {"layers": None, "heads": None}
    assert extraction_status(store, {**INPUTS, "layers": None}, defaults).complete
    assert not extraction_status(store, {**INPUTS, "layers": None}).complete  # no default given: another input
    check = extraction_status(store, {**INPUTS, "layers": "0,1"}, defaults)
    assert not check.complete and check.reason == "it was extracted with other inputs (layers)"


def test_record_refuses_an_unfinished_extraction(store):
    mark_shard_completed(open_attention_store(store, mode="r+"), 1)
    expected = (
        f"{store}: shards [0, 2] are not extracted yet, so the store cannot be recorded as complete: "
        "finish the extraction first"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(expected)):
        record_extraction_inputs(store, INPUTS)


def test_something_else_or_an_unfinished_creation_is_not_complete(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    assert extraction_status(str(other), INPUTS).reason == f"{other} holds something that is not an attention store"
    unfinished = str(tmp_path / "unfinished.zarr")
    create_attention_store(unfinished, LAYOUT, {"model": {"causal": False}})  # never marked prepared
    assert extraction_status(unfinished, INPUTS).reason == f"the creation of {unfinished} never finished"


# --- efficient ---


def test_efficient_status_per_variant(store):
    complete_extraction(store)
    check = efficient_status(store, ["effective", "simplex"], SETTINGS)
    assert not check.complete and check.reason == "effective not computed; simplex not computed"
    compute_variant(store, "effective", [0, 1, 2])
    compute_variant(store, "simplex", [0, 2])
    check = efficient_status(store, ["effective", "simplex"], SETTINGS)
    assert not check.complete and check.reason == "simplex: 1 of 3 shards to compute"
    assert efficient_complete(store, ["effective"], SETTINGS)
    assert efficient_status(store, ["effective"], SETTINGS).reason == (
        "effective: all 3 shards computed with the same settings"
    )
    compute_variant(store, "simplex", [1])
    assert efficient_complete(store, ["effective", "simplex"], SETTINGS)


def test_efficient_with_other_settings_is_not_complete(store):
    complete_extraction(store)
    compute_variant(store, "simplex", [0, 1, 2])
    other = {**SETTINGS, "simplex_tolerance": 1e-6}
    check = efficient_status(store, ["simplex"], other)
    assert not check.complete and check.reason == "simplex computed with other settings"


def test_efficient_status_of_a_missing_store(tmp_path):
    missing = str(tmp_path / "missing.zarr")
    check = efficient_status(missing, ["effective"], SETTINGS)
    assert not check.complete and check.reason.startswith(f"there is no attention store at {missing}")


def test_read_diagnostics(store):
    complete_extraction(store)
    compute_variant(store, "effective", [0, 1, 2])
    diagnostics = read_diagnostics(store, "effective")
    assert set(diagnostics) == set(DIAGNOSTIC_ARRAYS)
    assert diagnostics["rank"].shape == (5, 2, 4)
    np.testing.assert_array_equal(diagnostics["rank"][:, 0, 0], [1, 1, 2, 2, 3])  # shard index + 1
    with pytest.raises(
        AttentionStoreError,
        match=re.escape(f"{store} has no efficient attention of variant 'simplex': run `effattn efficient"),
    ):
        read_diagnostics(store, "simplex")


def test_a_report_is_drawn_again_once_the_results_grew_with_their_store(tmp_path):
    from storage_schemas.causal_results import open_causal_results
    from storage_schemas.pipeline_runs import record_report_source, report_status
    from tests.store_builders import build_causal_results, build_text_store

    store = build_text_store(str(tmp_path / "store.zarr"), ["a b", "c d", "e f"], [0, 1, 0], shard_size=2)
    results = build_causal_results(str(tmp_path / "results.zarr"), store, [("replay", "replay", "")], [[0, 0, 1]])
    open_causal_results(results, mode="r+").attrs["store_examples"] = 3
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<html></html>")
    record_report_source(str(report), results)
    assert report_status(str(report), results).complete
    open_causal_results(results, mode="r+").attrs["store_examples"] = 5  # grown: new examples, perhaps equal claims
    assert report_status(str(report), results).reason == f"{report} was drawn from other results"
