"""storage_schemas.causal_results: create, open, resume checks, whole-shard writes, aggregates, portability."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.portability import portability_problems
from storage_schemas.causal_results import (
    AGGREGATES,
    CausalResultsError,
    causal_completed_shards,
    check_same_settings,
    create_causal_results,
    mark_causal_shard_completed,
    open_causal_results,
    write_aggregates,
    write_causal_shard,
)

METRICS = {"agreement": "share kept", "flipped": "changed"}
INTERVENTIONS = [
    {"name": "replay", "kind": "replay", "variant": "", "removed_directions": 0},
    {"name": "minimality:effective:k=2", "kind": "minimality", "variant": "effective", "removed_directions": 2},
]
TARGETS = [{"name": "all", "scope": "all", "layer": -1, "head": -1},
           {"name": "layer 0 head 1", "scope": "head", "layer": 0, "head": 1}]


def make_results(url: str) -> zarr.Group:
    examples = {"source_index": np.array([4, 0, 2, 1, 3]), "length": np.array([3, 5, 6, 9, 9]),
                "label": np.array([0, 1, -1, 1, 0])}
    return create_causal_results(url, INTERVENTIONS, TARGETS, examples, shard_size=2, metrics=METRICS,
                                 attributes={"settings": {"seed": 0}, "model": {"name": "tiny"}})


def test_results_open_with_plain_xarray_with_labelled_coordinates(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make_results(url)
    shard = {"agreement": np.ones((2, 2, 2)), "flipped": np.zeros((2, 2, 2))}
    write_causal_shard(group, 1, shard, np.full((2, 2), 0.5), np.array([1.0, np.nan]))
    mark_causal_shard_completed(group, 1, {"extraction": "token-of-shard-1"})
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["agreement"].dims == ("intervention", "target", "example")
    assert dataset["intervention"].values.tolist() == ["replay", "minimality:effective:k=2"]
    assert dataset["target_head"].values.tolist() == [-1, 1]
    assert dataset["removed_directions"].sel(intervention="minimality:effective:k=2").values == 2
    agreement = dataset["agreement"].sel(intervention="replay", target="all").values
    assert agreement[2:4].tolist() == [1.0, 1.0] and np.isnan(agreement[[0, 1, 4]]).all()  # NaN: not measured
    assert dataset["source_index"].values.tolist() == [4, 0, 2, 1, 3]
    assert dataset.attrs["model"] == {"name": "tiny"} and dataset.attrs["completed_shards"] == [1]
    assert dataset.attrs["shard_inputs"] == {"1": {"extraction": "token-of-shard-1"}}


def test_every_array_is_portable_zarr_v3(tmp_path):
    url = str(tmp_path / "results.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. zarr's warning about data types without a Zarr v3 specification
        group = make_results(url)
        write_aggregates(group, {name: np.zeros((2, 2)) for name in AGGREGATES})
    names = [name for name, _ in zarr.open_group(url, mode="r").arrays()]
    assert len(names) == 14 + len(METRICS) + len(AGGREGATES)  # 12 coordinates, 2 per-example extras
    for name in names:
        metadata = json.loads((tmp_path / "results.zarr" / name / "zarr.json").read_text())
        assert metadata["dimension_names"], name
        assert metadata["data_type"] in ("string", "int32", "int64", "float32", "float64"), name
        codecs = [codec["name"] for codec in metadata["codecs"]]
        assert codecs in (["bytes", "zstd", "crc32c"], ["vlen-utf8", "zstd", "crc32c"]), (name, codecs)
    assert portability_problems(url) == []


def test_writes_of_the_wrong_shape_or_missing_metrics_are_refused(tmp_path):
    group = make_results(str(tmp_path / "results.zarr"))
    with pytest.raises(ValueError, match=r"shard 2: agreement has shape \(2, 2, 2\), expected \(2, 2, 1\)"):
        write_causal_shard(group, 2, {"agreement": np.ones((2, 2, 2)), "flipped": np.ones((2, 2, 2))},
                           np.ones((2, 1)), np.ones(1))
    with pytest.raises(ValueError, match=r"shard 0: metrics \['flipped'\] are missing"):
        write_causal_shard(group, 0, {"agreement": np.ones((2, 2, 2))}, np.ones((2, 2)), np.ones(2))
    with pytest.raises(IndexError, match=r"shard 3 does not exist: the results have shards 0..2"):
        write_causal_shard(group, 3, {}, np.ones((2, 2)), np.ones(2))
    with pytest.raises(ValueError, match=r"aggregate agreement_rate has shape \(3,\), expected \(2, 2\)"):
        write_aggregates(group, {name: np.zeros(3) for name in AGGREGATES})


def test_open_and_resume_errors_say_what_to_do(tmp_path):
    url = str(tmp_path / "results.zarr")
    with pytest.raises(CausalResultsError, match=r"there are no causal results at .*: create them with `effattn causal"):
        open_causal_results(url)
    group = make_results(url)
    with pytest.raises(CausalResultsError, match="something already exists at .*: choose a new --results path"):
        make_results(url)
    with pytest.raises(CausalResultsError,
                       match=r"holds causal results of another run \(seed: stored 0, requested 1\): use the same"):
        check_same_settings(group, url, {"seed": 1})
    check_same_settings(group, url, {"seed": 0})
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["schema"] = "something"
    with pytest.raises(CausalResultsError, match="is not an effattn causal results dataset"):
        open_causal_results(str(tmp_path / "other.zarr"))
    group.attrs["schema_version"] = 99
    with pytest.raises(CausalResultsError, match="schema version 99, but this effattn reads version 1"):
        open_causal_results(url)
