"""storage_schemas/explanation_results.py: create, open with xarray, write shards, refuse what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.explanation_results import (
    PER_EXAMPLE_ARRAYS,
    ExplanationResultsError,
    check_same_explanation_settings,
    create_explanation_results,
    explanation_completed_shards,
    explanation_shard_count,
    mark_explanation_shard_completed,
    open_explanation_results,
    write_explanation_aggregates,
    write_explanation_shard,
)

METHODS = [{"name": "attention:rollout", "kind": "matrices", "source": "attention", "aggregation": "rollout"},
           {"name": "random", "kind": "random", "source": "", "aggregation": ""}]
SIZES = {"method": 2, "metric": 2, "k": 3, "reference": 2, "position": 6, "layer": 2}


def make(url, examples: int = 5, shard_size: int = 2):
    return create_explanation_results(
        url, METHODS, ["comprehensiveness", "sufficiency"], [1, 10, 50], ["leave-one-out", "integrated-gradients"],
        {"store_example": np.arange(examples) * 3, "length": np.full(examples, 6), "label": np.zeros(examples)},
        layers=2, positions=6, shard_size=shard_size, attributes={"settings": {"seed": 0, "methods": ["a"]}},
    )


def shard_arrays(count: int, value: float) -> dict[str, np.ndarray]:
    sizes = {**SIZES, "example": count}
    return {name: np.full(tuple(sizes[dim] for dim in dims), value) for name, (dims, _, _, _) in
            PER_EXAMPLE_ARRAYS.items()}


def test_created_results_open_with_xarray_with_named_dims(tmp_path):
    url = str(tmp_path / "results.zarr")
    make(url)
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["faithfulness"].dims == ("method", "metric", "k", "example")
    assert dataset["kendall_tau"].dims == ("method", "reference", "example")
    assert dataset["method"].values.tolist() == ["attention:rollout", "random"]
    assert dataset["store_example"].values.tolist() == [0, 3, 6, 9, 12]
    assert np.isnan(dataset["aopc"].values).all()
    assert int(dataset["minimality_tested"].min()) == -1  # not measured until written
    assert dataset.attrs["schema"] == "effattn.explanation_results"
    assert zarr.open_group(url, mode="r")["faithfulness"].chunks[-1] == 2  # chunked by shard


def test_shards_are_written_whole_and_recorded(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    assert explanation_shard_count(group) == 3
    write_explanation_shard(group, 2, shard_arrays(1, 0.5))  # the last shard holds one example
    mark_explanation_shard_completed(group, 2)
    assert explanation_completed_shards(open_explanation_results(url)) == [2]
    values = open_explanation_results(url)["aopc"][:]
    assert np.isnan(values[..., :4]).all() and (values[..., 4] == 0.5).all()
    with pytest.raises(ValueError, match="faithfulness has shape"):
        arrays = shard_arrays(2, 0.0)
        arrays["faithfulness"] = arrays["faithfulness"][:, :, :1]
        write_explanation_shard(group, 0, arrays)
    with pytest.raises(ValueError, match=r"arrays \['target'\] are missing"):
        write_explanation_shard(group, 0, {k: v for k, v in shard_arrays(2, 0.0).items() if k != "target"})
    with pytest.raises(IndexError, match="shard 3 does not exist"):
        mark_explanation_shard_completed(group, 3)


def test_aggregates_are_written_with_their_dims(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    write_explanation_aggregates(group, {"mean_aopc": np.ones((2, 2)), "mean_kendall_tau": np.zeros((2, 2)),
                                         "minimal_share": np.array([0.5, np.nan])})
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["minimal_share"].dims == ("layer",)
    assert dataset["mean_kendall_tau"].dims == ("method", "reference")
    with pytest.raises(ValueError, match="minimal_share has shape"):
        write_explanation_aggregates(group, {"mean_aopc": np.ones((2, 2)), "mean_kendall_tau": np.zeros((2, 2)),
                                             "minimal_share": np.ones(3)})


def test_other_settings_existing_paths_and_foreign_datasets_are_refused(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    check_same_explanation_settings(group, url, {"seed": 0, "methods": ["a"]})
    with pytest.raises(ExplanationResultsError, match=r"another run \(seed: stored 0, requested 1\)"):
        check_same_explanation_settings(group, url, {"seed": 1, "methods": ["a"]})
    with pytest.raises(ExplanationResultsError, match="something already exists"):
        make(url)
    with pytest.raises(ExplanationResultsError, match="there are no explanation results"):
        open_explanation_results(str(tmp_path / "absent.zarr"))
    foreign = str(tmp_path / "foreign.zarr")
    zarr.open_group(foreign, mode="w").attrs["schema"] = "effattn.causal_results"
    with pytest.raises(ExplanationResultsError, match="is not an effattn explanation results dataset"):
        open_explanation_results(foreign)
    group.attrs["schema_version"] = 99
    with pytest.raises(ExplanationResultsError, match="schema version 99"):
        open_explanation_results(url)
