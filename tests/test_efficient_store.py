"""storage_schemas.efficient_store: the efficient/<variant> and diagnostics/<variant>/* arrays of a store."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

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
    efficient_completed_shards,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)

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
)
SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}


@pytest.fixture()
def store(tmp_path):
    url = str(tmp_path / "store.zarr")
    group = create_attention_store(url, LAYOUT, {"model": {"causal": False}})
    mark_prepared(group)
    return url, open_attention_store(url, mode="r+")


def shard_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    efficient = rng.random((n, LAYOUT.layers, LAYOUT.heads, LAYOUT.max_length, LAYOUT.max_length))
    diagnostics = {
        name: rng.integers(0, 5, (n, LAYOUT.layers, LAYOUT.heads)).astype(dtype)
        for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items()
    }
    return efficient, diagnostics


def test_prepare_creates_arrays_with_the_attention_layout(store):
    url, group = store
    prepare_efficient_arrays(group, url, "simplex", SETTINGS)
    array = group["efficient/simplex"]
    assert array.shape == group["attention"].shape and array.shards == group["attention"].shards
    assert array.chunks == group["attention"].chunks and str(array.dtype) == "float32"
    assert tuple(array.metadata.dimension_names) == ("example", "layer", "head", "query", "key")
    assert array.attrs["settings"] == SETTINGS and array.attrs["completed_shards"] == []
    for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items():
        diagnostic = group[f"diagnostics/simplex/{name}"]
        assert diagnostic.shape == (5, 2, 4) and str(diagnostic.dtype) == dtype
        assert tuple(diagnostic.metadata.dimension_names) == ("example", "layer", "head")
    prepare_efficient_arrays(group, url, "simplex", SETTINGS)  # idempotent with the same settings


def test_other_settings_are_refused(store):
    url, group = store
    prepare_efficient_arrays(group, url, "simplex", SETTINGS)
    expected = (
        f"{url}: efficient/simplex was computed with settings {SETTINGS}, but this run asks for "
        f"{ {**SETTINGS, 'simplex_tolerance': 1e-06} }: use the same settings, or delete {url}/efficient/simplex "
        f"and {url}/diagnostics/simplex to compute it again"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(expected)):
        prepare_efficient_arrays(group, url, "simplex", {**SETTINGS, "simplex_tolerance": 1e-6})


def test_write_round_trip_and_plain_xarray_reading(store):
    url, group = store
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    written = {}
    for shard in range(LAYOUT.n_shards):
        region = LAYOUT.shard_slice(shard)
        written[shard] = shard_data(region.stop - region.start, seed=shard)
        write_efficient_shard(group, LAYOUT, "effective", shard, *written[shard])
    stored = group["efficient/effective"][:]
    expected = np.concatenate([written[shard][0] for shard in range(LAYOUT.n_shards)]).astype(np.float32)
    np.testing.assert_array_equal(stored, expected)
    dataset = xr.open_zarr(url, group="efficient", consolidated=False)
    assert dataset["effective"].dims == ("example", "layer", "head", "query", "key")
    diagnostics = xr.open_zarr(url, group="diagnostics/effective", consolidated=False)
    assert set(diagnostics.data_vars) == set(DIAGNOSTIC_ARRAYS)
    np.testing.assert_array_equal(diagnostics["rank"].values[:2], written[0][1]["rank"])


def test_write_rejects_wrong_shapes_and_missing_diagnostics(store):
    url, group = store
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    efficient, diagnostics = shard_data(2, seed=0)
    with pytest.raises(
        ValueError, match=re.escape("shard 2: efficient/effective has shape (2, 2, 4, 6, 6), expected (1, 2, 4, 6, 6)")
    ):
        write_efficient_shard(group, LAYOUT, "effective", 2, efficient, diagnostics)
    del diagnostics["rank"]
    with pytest.raises(ValueError, match=re.escape("shard 0: diagnostics ['rank'] of effective are missing")):
        write_efficient_shard(group, LAYOUT, "effective", 0, efficient, diagnostics)
    assert not group["efficient/effective"][:].any()  # nothing was written


def test_completion_is_per_variant_sorted_and_checked(store):
    url, group = store
    assert efficient_completed_shards(group, "effective") == []
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    prepare_efficient_arrays(group, url, "stochastic", SETTINGS)
    for shard in range(LAYOUT.n_shards):
        mark_shard_completed(group, shard)
    for shard in (2, 0, 2):
        mark_efficient_shard_completed(group, "effective", shard)
    assert efficient_completed_shards(group, "effective") == [0, 2]
    assert efficient_completed_shards(group, "stochastic") == []
    with pytest.raises(IndexError, match=re.escape("shard 3 does not exist: the store has shards 0..2")):
        mark_efficient_shard_completed(group, "effective", 3)
