"""storage_schemas/results_dataset.py: a results dataset declared in this test by its schema record alone is
created, opened with xarray, written shard by shard (durably, a full disk explained), recorded with its inputs,
found stale when an input shard is written again, aggregated and checked by the pipeline; other versions and
foreign datasets are refused with messages that say what to do; results are tied to their store."""

from __future__ import annotations

import errno
import re

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.attention_store import (
    AttentionStoreLayout,
    create_attention_store,
    extraction_identities,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    unmark_shards,
)
from storage_schemas.errors import IncompleteInputError, ResultsDatasetError, StoreFullError
from storage_schemas.results_dataset import (
    NAN,
    ResultArray,
    ResultsSchema,
    check_results_of_store,
    results_store_identity,
)


class DummyResultsError(ResultsDatasetError):
    pass


def _inputs_now(group, store_group):
    """A dummy shard k reads extraction shard k of the store."""
    extracted = extraction_identities(store_group)
    return lambda shard: (["extraction"], {"extraction": extracted.get(shard)})


DUMMY = ResultsSchema(
    kind="dummy",
    name="effattn.dummy_results",
    version=3,
    command="effattn dummy",
    version_advice=": run `effattn dummy` again into a new --results path",
    error=DummyResultsError,
    coordinates={
        "item": ResultArray(("item",), "string", "what was scored", fill=""),
        "example": ResultArray(("example",), "int64", "index of the example in the store"),
    },
    per_example={
        "score": ResultArray(("item", "example"), "float32", "a score per item", fill=NAN),
        "count": ResultArray(("example",), "int32", "a count", fill=-1),
    },
    aggregates={"mean_score": ResultArray(("item",), "float64", "mean of score over the examples", fill=NAN)},
    required=("item", "example", "score", "count"),
    current_inputs=_inputs_now,
    metric_array=ResultArray(("example",), "float32", "", fill=NAN),
)


def dummy_store(url: str) -> zarr.Group:
    """An attention store of 5 examples in shards of 2 (no data needed), every shard extracted."""
    layout = AttentionStoreLayout(
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
    )
    mark_prepared(
        create_attention_store(
            url,
            layout,
            {
                "model": {"causal": False, "name": "tiny", "weights_digest": "sha256:w"},
                "corpus": {"name": "reviews", "digest": "c"},
            },
        )
    )
    group = open_attention_store(url, mode="r+")
    for shard in range(3):
        mark_shard_completed(group, shard)
    return group


def dummy_results(url: str, metrics: dict[str, str] | None = None) -> zarr.Group:
    return DUMMY.create(
        url,
        {"item": ["a", "b"], "example": np.arange(5)},
        shard_size=2,
        attributes={"settings": {"seed": 0}},
        metrics=metrics or {},
    )


def shard_arrays(n: int, value: float) -> dict[str, np.ndarray]:
    return {"score": np.full((2, n), value), "count": np.full(n, 7)}


def test_a_declared_dataset_is_created_as_its_record_says_and_opens_with_xarray(tmp_path):
    url = str(tmp_path / "dummy.zarr")
    group = dummy_results(url, metrics={"loss": "a loss per example"})
    assert group["score"].chunks == (2, 2) and group["count"].chunks == (2,) and group["loss"].chunks == (2,)
    assert group["item"].chunks == (2,) and group["example"].chunks == (5,)
    assert group["loss"].attrs["description"] == "a loss per example"
    assert dict(group.attrs) == {
        "settings": {"seed": 0},
        "schema": "effattn.dummy_results",
        "schema_version": 3,
        "shard_size": 2,
        "metrics": ["loss"],
        "completed_shards": [],
    }
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["score"].dims == ("item", "example") and dataset["loss"].dims == ("example",)
    assert np.isnan(dataset["score"].values).all() and (dataset["count"].values == -1).all()
    assert dataset["item"].values.tolist() == ["a", "b"]
    with pytest.raises(DummyResultsError, match="something already exists at .*: choose a new --results path"):
        dummy_results(url)
    other = tmp_path / "other.zarr"
    with pytest.raises(ValueError, match=re.escape("dummy results: the coordinates ['item'] are missing")):
        DUMMY.create(str(other), {"example": np.arange(5)}, shard_size=2, attributes={})
    assert not other.exists()  # refused before anything is written


def test_shards_are_written_whole_recorded_with_their_inputs_and_go_stale_when_an_input_is_written_again(tmp_path):
    store = dummy_store(str(tmp_path / "store.zarr"))
    url = str(tmp_path / "dummy.zarr")
    group = dummy_results(url, metrics={"loss": "a loss"})
    with pytest.raises(ValueError, match=re.escape("shard 2: arrays ['count', 'loss'] are missing")):
        DUMMY.write_shard(group, 2, {"score": np.ones((2, 1))})
    with pytest.raises(ValueError, match=re.escape("shard 2: score has shape (2, 2), expected (2, 1)")):
        DUMMY.write_shard(group, 2, {**shard_arrays(2, 1.0), "loss": np.ones(1)})
    for shard, n in ((0, 2), (1, 2), (2, 1)):
        DUMMY.write_shard(group, shard, {**shard_arrays(n, shard), "loss": np.full(n, 0.5)})
        DUMMY.mark_shard_completed(group, shard, {"extraction": extraction_identities(store)[shard]})
    assert DUMMY.shard_count(group) == 3 and DUMMY.shard_region(group, 2) == slice(4, 5)
    assert DUMMY.completed_shards(group, store) == [0, 1, 2]
    assert open_dataset_scores(url) == [[0, 0, 1, 1, 2]] * 2
    with pytest.raises(IndexError, match=r"shard 3 does not exist: the results have shards 0\.\.2"):
        DUMMY.mark_shard_completed(group, 3, {"extraction": "x"})
    with pytest.raises(IncompleteInputError, match="dummy shard 1 cannot be recorded as done: its inputs"):
        DUMMY.mark_shard_completed(group, 1, {"extraction": None})

    group.attrs["claims"] = [{"claim": "something"}]
    mark_shard_completed(store, 1)  # store shard 1 extracted again: a new identity
    unmark_shards(store, [2])  # store shard 2 not complete any more
    assert DUMMY.completed_shards(group, store) == [0]
    assert DUMMY.forget_stale_shards(group, store) == [1, 2]
    reopened = DUMMY.open(url)
    assert reopened.attrs["completed_shards"] == [0] and "claims" not in reopened.attrs
    assert list(reopened.attrs["shard_inputs"]) == ["0"]


def open_dataset_scores(url: str) -> list[list[float]]:
    return xr.open_zarr(url, consolidated=False)["score"].values.tolist()


def test_aggregates_and_the_pipeline_status(tmp_path):
    store_url = str(tmp_path / "store.zarr")
    store = dummy_store(store_url)
    url = str(tmp_path / "dummy.zarr")
    group = dummy_results(url)
    assert DUMMY.status(url, {"seed": 1}, store_url).conflicting
    assert DUMMY.status(url, {"seed": 0}, store_url).reason == f"0 of 3 shards of {url} are done"
    for shard, n in ((0, 2), (1, 2), (2, 1)):
        DUMMY.write_shard(group, shard, shard_arrays(n, 1.0))
        DUMMY.mark_shard_completed(group, shard, {"extraction": extraction_identities(store)[shard]})
    with pytest.raises(ValueError, match=re.escape("aggregate mean_score has shape (3,), expected (2,)")):
        DUMMY.write_aggregates(group, {"mean_score": np.ones(3)})
    DUMMY.write_aggregates(group, {"mean_score": np.array([0.25, 0.5])})
    DUMMY.write_aggregates(group, {"mean_score": np.array([0.5, 0.75])})  # overwritten
    assert xr.open_zarr(url, consolidated=False)["mean_score"].values.tolist() == [0.5, 0.75]
    assert not DUMMY.status(url, {"seed": 0}, store_url).complete  # no claims yet
    group.attrs["claims"] = []
    check = DUMMY.status(url, {"seed": 0}, store_url)
    assert check.complete and check.reason == f"{url} is complete (3 shards, claims written)"
    assert not DUMMY.status(str(tmp_path / "absent.zarr"), {"seed": 0}, store_url).complete


def test_other_versions_foreign_and_unfinished_datasets_are_refused_saying_what_to_do(tmp_path):
    url = str(tmp_path / "dummy.zarr")
    with pytest.raises(
        DummyResultsError,
        match=re.escape(
            f"there are no dummy results at {url}: create them with `effattn dummy --store STORE --results {url}`"
        ),
    ):
        DUMMY.open(url)
    group = dummy_results(url, metrics={"loss": "a loss"})
    DUMMY.check_same_settings(group, url, {"seed": 0})
    with pytest.raises(
        DummyResultsError,
        match=re.escape(
            f"{url} holds dummy results of another run (seed: stored 0, requested 1): use the same settings"
        ),
    ):
        DUMMY.check_same_settings(group, url, {"seed": 1})
    group.attrs["schema_version"] = 2
    with pytest.raises(
        DummyResultsError,
        match=re.escape(
            f"{url} has dummy results schema version 2, but this effattn reads version 3: run `effattn dummy` again "
            "into a new --results path"
        ),
    ):
        DUMMY.open(url)
    group.attrs["schema_version"] = 3
    zarr.open_group(url, mode="r+").__delitem__("loss")
    with pytest.raises(
        DummyResultsError,
        match=re.escape(
            f"{url} lacks the arrays ['loss']: it was not completely created; delete it and run `effattn dummy`"
        ),
    ):
        DUMMY.open(url)
    group.attrs["schema"] = "effattn.causal_results"
    with pytest.raises(DummyResultsError, match="is not an effattn dummy results dataset .*'effattn.causal_results'"):
        DUMMY.open(url)
    group.attrs.clear()
    with pytest.raises(DummyResultsError, match="was never completely created .*run `effattn dummy` again"):
        DUMMY.open(url)


def test_a_full_disk_during_a_shard_write_is_explained_and_the_shard_is_not_recorded(tmp_path, monkeypatch):
    import storage_schemas.durable_writes

    url = str(tmp_path / "dummy.zarr")
    group = dummy_results(url)

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_schemas.durable_writes.os, "fsync", full)
    with pytest.raises(
        StoreFullError,
        match=re.escape(
            f"no space left while writing {tmp_path / 'dummy.zarr'} (No space left on device): free space on that disk"
        ),
    ):
        DUMMY.write_shard(group, 0, shard_arrays(2, 1.0))
    assert DUMMY.open(url).attrs["completed_shards"] == []


def test_results_record_the_store_they_came_from_and_a_reader_names_every_difference(tmp_path):
    store = dummy_store(str(tmp_path / "store.zarr"))
    identity = results_store_identity(store, ["effective"])
    assert identity == {
        "weights_digest": "sha256:w",
        "corpus_digest": "c",
        "examples": 5,
        "dtype": "float32",
        "efficient_settings": {},
    }
    assert "dtype" not in results_store_identity(store, [], with_dtype=False)
    attributes = store.attrs.asdict()
    check_results_of_store({"settings": {"store_identity": identity}}, attributes, "r.zarr", "s.zarr", 5)
    # results written before the dtype was recorded stay valid
    legacy = {key: value for key, value in identity.items() if key != "dtype"}
    check_results_of_store({"settings": {"store_identity": legacy}}, attributes, "r.zarr", "s.zarr", 5)
    half = {**attributes, "layout": {**attributes["layout"], "dtype": "float16"}}
    with pytest.raises(
        ResultsDatasetError,
        match=re.escape(
            "r.zarr were not computed from the attention store s.zarr (examples: results 5, store 6; dtype: results "
            "'float32', store 'float16'): pass the store they came from with --store"
        ),
    ):
        check_results_of_store({"settings": {"store_identity": identity}}, half, "r.zarr", "s.zarr", 6)
    with pytest.raises(DummyResultsError):
        check_results_of_store(
            {"settings": {"store_identity": identity}}, half, "r.zarr", "s.zarr", 5, error=DummyResultsError
        )


def test_results_grow_along_example_keeping_current_shards_and_forgetting_the_old_partial_one(tmp_path):
    store_url = str(tmp_path / "store.zarr")
    store = dummy_store(store_url)
    url = str(tmp_path / "dummy.zarr")
    group = dummy_results(url, metrics={"loss": "a loss"})
    group.attrs["store_examples"] = 5
    for shard, n in ((0, 2), (1, 2), (2, 1)):
        DUMMY.write_shard(group, shard, {**shard_arrays(n, shard), "loss": np.full(n, 0.5)})
        DUMMY.mark_shard_completed(group, shard, {"extraction": extraction_identities(store)[shard]})
    group.attrs["claims"] = []
    with pytest.raises(ValueError, match=re.escape("growing them needs the new values of the coordinates ['example']")):
        DUMMY.grow(group, {}, store_examples=8)

    assert DUMMY.grow(group, {"example": np.arange(5, 8)}, store_examples=8) == [2]  # shard 2 gains examples
    group = DUMMY.open(url, mode="r+")
    assert group["example"][:].tolist() == list(range(8)) and DUMMY.shard_count(group) == 4
    assert group["score"].shape == (2, 8) and group["count"].shape == (8,) and group["loss"].shape == (8,)
    assert group.attrs["completed_shards"] == [0, 1] and "claims" not in group.attrs
    assert group.attrs["store_examples"] == 8
    scores = xr.open_zarr(url, consolidated=False)["score"].values
    np.testing.assert_array_equal(scores[:, :4], [[0, 0, 1, 1]] * 2)  # kept
    assert np.isnan(scores[:, 5:]).all() and (group["count"][5:] == -1).all()  # new rows: the fill
    # a grown store whose results have not taken its new examples yet is not complete for the pipeline
    for shard in (2, 3):
        DUMMY.write_shard(group, shard, {**shard_arrays(2, shard), "loss": np.full(2, 0.5)})
        DUMMY.mark_shard_completed(group, shard, {"extraction": "x"})
    group.attrs.update({"claims": [], "store_examples": 4})  # made for 4 examples: the store (5) grew since
    assert DUMMY.status(url, {"seed": 0}, store_url).reason == (
        f"the store {store_url} has grown since {url} was computed: its new examples are due"
    )
    # a full last shard stays done; nothing added changes only the recorded store size
    assert DUMMY.grow(DUMMY.open(url, mode="r+"), {"example": np.arange(8, 8)}, store_examples=9) == []
    assert DUMMY.open(url).attrs["store_examples"] == 9 and DUMMY.open(url).attrs["claims"] == []


def test_results_of_a_store_that_grows_name_its_series_not_its_size(tmp_path):
    store = dummy_store(str(tmp_path / "store.zarr"))
    attributes = store.attrs.asdict()
    store.attrs.update(
        {
            "corpus": {**attributes["corpus"], "selection": {"method": "keyed-hash"}},
            "runs": [{"run_id": "first"}, {"run_id": "second"}],
        }
    )
    identity = results_store_identity(store, [])
    assert identity == {
        "weights_digest": "sha256:w",
        "first_run": "first",
        "dtype": "float32",
        "efficient_settings": {},
    }
    grown = {**store.attrs.asdict(), "corpus": {**store.attrs["corpus"], "digest": "d"}}
    check_results_of_store({"settings": {"store_identity": identity}}, grown, "r.zarr", "s.zarr", 9)  # same series
    other = {**grown, "runs": [{"run_id": "another"}]}
    with pytest.raises(ResultsDatasetError, match="first_run: results 'first', store 'another'"):
        check_results_of_store({"settings": {"store_identity": identity}}, other, "r.zarr", "s.zarr", 9)
