"""Unit tests of storage_schemas.attention_store: no model, a small hand-made layout and random numpy data.

Error messages are pinned exactly (they are part of the user interface: they say what is wrong and what to do).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.attention_store import (
    CHUNK_CODEC_BATCH_SIZE,
    FAST_CODEC_PIPELINE,
    ZARR_DEFAULT_CODEC_PIPELINE,
    AttentionStoreError,
    AttentionStoreLayout,
    AttentionStoreNotFoundError,
    IncompleteInputError,
    abandon_append,
    attention_store_state,
    begin_append,
    check_same_run,
    commit_append,
    completed_shards,
    create_attention_store,
    default_shard_size,
    describe_shards,
    extraction_identities,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    open_store_to_append,
    read_texts,
    readable_by_every_reader,
    recreate_unprepared_store,
    require_extracted,
    store_layout,
    stored_identities,
    unmark_shards,
    write_example_metadata,
    write_shard,
)
from storage_schemas.shard_records import LEGACY_SHARD_IDENTITY, shard_is_current

# 7 examples in shards of 3: shards 0 and 1 hold 3 examples, the last one holds 1.
LAYOUT = AttentionStoreLayout(
    n_examples=7,
    max_length=6,
    n_classes=3,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=3,
    hidden=5,
    shard_size=3,
    dtype="float32",
)

# Schema v2 written out literally: a reader who never installed effattn relies on exactly these names.
EXPECTED_DIMS = {
    "tokens": ("example", "position"),
    "length": ("example",),
    "untruncated_length": ("example",),
    "source_index": ("example",),
    "label": ("example",),
    "text_bytes": ("text_byte",),
    "text_offsets": ("example_boundary",),
    "logits": ("example", "class"),
    "attention": ("example", "layer", "head", "query", "key"),
    "value": ("example", "layer", "kv_head", "position", "head_dim"),
    "w_out": ("layer", "head", "head_dim", "hidden"),
    "out_bias": ("layer", "hidden"),
}
# Schema v1: the texts were one `string` array.
EXPECTED_V1_DIMS = {
    **{name: dims for name, dims in EXPECTED_DIMS.items() if not name.startswith("text_")},
    "text": ("example",),
}

ATTRIBUTES = {
    "model": {"name": "tiny", "weights_digest": "sha256:aaa", "layers": 2},
    "corpus": {"name": "reviews", "digest": "sha256:ccc", "selection": {"limit": None, "seed": 0}},
    "dtype": "float32",
}


def make_data(layout: AttentionStoreLayout, seed: int = 0) -> dict[str, np.ndarray]:
    """Random contents for every array of a store with this layout (zero beyond each length, as extraction does)."""
    rng = np.random.default_rng(seed)
    E, L = layout.n_examples, layout.max_length
    length = np.sort(rng.integers(1, L + 1, size=E)).astype(np.int32)
    length[-1] = L
    real = np.arange(L)[None, :] < length[:, None]
    attention = rng.random((E, layout.layers, layout.heads, L, L)).astype(layout.dtype)
    attention *= (real[:, :, None] & real[:, None, :])[:, None, None]
    value = rng.standard_normal((E, layout.layers, layout.kv_heads, L, layout.head_dim)).astype(layout.dtype)
    value *= real[:, None, None, :, None]
    texts = ["naïve café", "日本語のテキスト", 'a, "quoted" text', "", "tab\there", "x" * 300, "last"]
    return {
        "tokens": np.where(real, rng.integers(1, 30000, size=(E, L)), 0).astype(np.int32),
        "length": length,
        "untruncated_length": (length + rng.integers(0, 3, size=E)).astype(np.int32),
        "source_index": rng.permutation(E + 5)[:E].astype(np.int64),
        "label": rng.integers(-1, layout.n_classes, size=E).astype(np.int64),
        "text": np.array((texts * E)[:E], dtype=object),
        "logits": rng.standard_normal((E, layout.n_classes)).astype(np.float32),
        "attention": attention,
        "value": value,
        "w_out": rng.standard_normal((layout.layers, layout.heads, layout.head_dim, layout.hidden)).astype(np.float32),
        "out_bias": rng.standard_normal((layout.layers, layout.hidden)).astype(np.float32),
    }


def build_store(
    url: str,
    layout: AttentionStoreLayout = LAYOUT,
    data: dict[str, np.ndarray] | None = None,
    prepared: bool = True,
    shards: list[int] | None = None,
    schema_version: int = 2,
) -> tuple[zarr.Group, dict[str, np.ndarray]]:
    """Create a store the way the extraction stage does (in the layout of `schema_version`); `shards` (default:
    all) are written and marked done."""
    data = make_data(layout) if data is None else data
    group = create_attention_store(url, layout, ATTRIBUTES, schema_version=schema_version)
    write_example_metadata(
        group,
        tokens=data["tokens"],
        length=data["length"],
        untruncated_length=data["untruncated_length"],
        source_index=data["source_index"],
        label=data["label"],
        text=data["text"],
    )
    group["w_out"][:] = data["w_out"]
    group["out_bias"][:] = data["out_bias"]
    if not prepared:
        return group, data
    mark_prepared(group)
    for shard in range(layout.n_shards) if shards is None else shards:
        region = layout.shard_slice(shard)
        write_shard(group, shard, data["attention"][region], data["value"][region], data["logits"][region])
        mark_shard_completed(group, shard)
    return group, data


@pytest.fixture()
def url(tmp_path) -> str:
    return str(tmp_path / "store.zarr")


def assert_store_holds(group, data: dict[str, np.ndarray]) -> None:
    for name, expected in data.items():
        if name == "text":
            assert read_texts(group) == list(expected)
        else:
            stored = group[name][:]
            assert stored.dtype == expected.dtype, name
            np.testing.assert_array_equal(stored, expected, err_msg=name)


# ------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_every_array_exactly(url, dtype):
    layout = AttentionStoreLayout(**{**asdict(LAYOUT), "dtype": dtype})
    written, data = build_store(url, layout)
    assert written["attention"].dtype == np.dtype(dtype)

    group = open_attention_store(url)
    assert_store_holds(group, data)
    assert store_layout(group) == layout
    assert completed_shards(group) == [0, 1, 2]
    attributes = group.attrs.asdict()
    assert attributes["schema"] == "effattn.attention_store"
    assert attributes["schema_version"] == 2
    assert attributes["prepared"] is True
    assert attributes["layout"] == asdict(layout)
    for key, value in ATTRIBUTES.items():
        assert attributes[key] == value


def test_round_trip_through_an_fsspec_url(tmp_path):
    """Stores live on object storage through fsspec URLs; the in-memory filesystem stands in for s3://."""
    import fsspec

    url = f"memory://effattn-test-{tmp_path.name}/store.zarr"
    memory = fsspec.filesystem("memory")
    try:
        assert attention_store_state(url) == "absent"
        _, data = build_store(url, prepared=False)
        assert attention_store_state(url) == "unprepared"
        mark_prepared(zarr.open_group(url, mode="r+"))
        assert attention_store_state(url) == "prepared"
        assert_store_holds(open_attention_store(url), {k: v for k, v in data.items() if k not in SHARD_ONLY})
        memory.pipe(f"/effattn-test-{tmp_path.name}/other/file.txt", b"x")
        assert attention_store_state(f"memory://effattn-test-{tmp_path.name}/other") == "something else"
    finally:
        memory.rm(f"/effattn-test-{tmp_path.name}", recursive=True)


SHARD_ONLY = ("attention", "value", "logits")


def test_chunks_are_one_example_all_layers_and_shards_whole_units_of_work(url):
    build_store(url)
    group = zarr.open_group(url, mode="r")
    S, L = LAYOUT.shard_size, LAYOUT.max_length
    assert group["attention"].chunks == (1, LAYOUT.layers, LAYOUT.heads, L, L)
    assert group["attention"].shards == (S, LAYOUT.layers, LAYOUT.heads, L, L)
    assert group["value"].chunks == (1, LAYOUT.layers, LAYOUT.kv_heads, L, LAYOUT.head_dim)
    assert group["value"].shards == (S, LAYOUT.layers, LAYOUT.kv_heads, L, LAYOUT.head_dim)
    assert group["tokens"].chunks == (S, L)
    assert group["text_bytes"].dtype == np.uint8 and group["text_bytes"].chunks == (2**20,)
    assert group["text_bytes"].shards is None
    assert group["text_offsets"].dtype == np.int64 and group["text_offsets"].shape == (LAYOUT.n_examples + 1,)
    # One shard file per shard of examples: a writer of shard i touches nothing of shard j.
    shard_files = sorted(os.listdir(Path(url) / "attention" / "c"))
    assert shard_files == ["0", "1", "2"]


def test_plain_xarray_reads_every_array_with_its_dims(url):
    _, data = build_store(url)
    dataset = xr.open_zarr(url, consolidated=False)
    assert set(dataset.data_vars) == set(EXPECTED_DIMS)
    for name, dims in EXPECTED_DIMS.items():
        assert dataset[name].dims == dims, name
        if name not in ("text_bytes", "text_offsets"):
            np.testing.assert_array_equal(dataset[name].values, data[name], err_msg=name)
    offsets, text_bytes = dataset["text_offsets"].values, dataset["text_bytes"].values.tobytes()
    assert [text_bytes[offsets[i] : offsets[i + 1]].decode() for i in range(7)] == list(data["text"])
    total_bytes = sum(len(text.encode()) for text in data["text"])
    assert dict(dataset.sizes) == {
        "example": 7,
        "position": 6,
        "query": 6,
        "key": 6,
        "class": 3,
        "layer": 2,
        "head": 4,
        "kv_head": 2,
        "head_dim": 3,
        "hidden": 5,
        "text_byte": total_bytes,
        "example_boundary": 8,
    }
    assert dataset.attrs["schema"] == "effattn.attention_store"
    assert dataset.attrs["completed_shards"] == [0, 1, 2]


def test_plain_zarr_reads_every_array_with_its_dimension_names(url):
    _, data = build_store(url)
    group = zarr.open_group(url, mode="r")
    assert set(group.array_keys()) == set(EXPECTED_DIMS)
    for name, dims in EXPECTED_DIMS.items():
        assert tuple(group[name].metadata.dimension_names) == dims, name
        assert group[name].attrs["description"], name
    np.testing.assert_array_equal(group["attention"][:], data["attention"])
    np.testing.assert_array_equal(group["value"][2:5], data["value"][2:5])
    assert group.attrs["schema_version"] == 2


def test_a_reader_without_effattn_opens_the_store(url):
    """A fresh interpreter that imports only xarray and zarr (no codec or class registered by effattn)."""
    _, data = build_store(url)
    script = (
        "import json, sys, xarray, zarr\n"
        "url = sys.argv[1]\n"
        "ds = xarray.open_zarr(url, consolidated=False)\n"
        "g = zarr.open_group(url, mode='r')\n"
        "assert not any(m.split('.')[0] in ('storage_schemas', 'analysis', 'tasks', 'flows') for m in sys.modules)\n"
        "b, o = g['text_bytes'][:].tobytes(), g['text_offsets'][:]\n"
        "print(json.dumps({'dims': list(ds['attention'].dims), 'attention': ds['attention'].values.tolist(),\n"
        "                  'value': g['value'][:].tolist(),\n"
        "                  'text': [b[o[i]:o[i + 1]].decode('utf-8') for i in range(len(o) - 1)]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, url], capture_output=True, text=True, cwd=Path(url).parent, check=False
    )
    assert result.returncode == 0, result.stderr
    read = json.loads(result.stdout)
    assert read["dims"] == ["example", "layer", "head", "query", "key"]
    np.testing.assert_array_equal(np.array(read["attention"], dtype=np.float32), data["attention"])
    np.testing.assert_array_equal(np.array(read["value"], dtype=np.float32), data["value"])
    assert read["text"] == list(data["text"])


# ------------------------------------------------------------------------------------------
# layout


def test_shard_slices_cover_the_examples_and_the_last_is_shorter():
    assert LAYOUT.n_shards == 3
    assert LAYOUT.shard_slice(0) == slice(0, 3)
    assert LAYOUT.shard_slice(1) == slice(3, 6)
    assert LAYOUT.shard_slice(2) == slice(6, 7)
    exact = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": 6})
    assert exact.n_shards == 2
    assert exact.shard_slice(1) == slice(3, 6)


@pytest.mark.parametrize("shard", [3, -1, 100])
def test_shard_slice_of_a_missing_shard(shard):
    with pytest.raises(IndexError, match=re.escape(f"shard {shard} does not exist: the store has shards 0..2")):
        LAYOUT.shard_slice(shard)


def test_default_shard_size_known_values():
    # minilm at 128 tokens: 6 * 12 * 128 * 128 * 4 bytes = 4.5 MiB per example -> 56 fit in 256 MiB -> 32.
    assert default_shard_size(128, 6, 12, "float32") == 32
    assert default_shard_size(128, 6, 12, "float16") == 64  # 113 fit -> capped at 64
    # One example alone is over the budget: still 1 (a shard is never empty).
    assert default_shard_size(512, 30, 9, "float32") == 1
    assert default_shard_size(4, 1, 1, "float32") == 64
    assert default_shard_size(128, 6, 12, "float32", budget_bytes=4 * 4718592) == 4
    assert default_shard_size(128, 6, 12, "float32", budget_bytes=4 * 4718592 - 1) == 2


@pytest.mark.parametrize("max_length", [2, 17, 64, 128, 300, 512])
@pytest.mark.parametrize("layers,heads", [(1, 1), (6, 12), (30, 9)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("budget", [2**20, 256 * 2**20])
def test_default_shard_size_is_the_largest_power_of_two_in_budget(max_length, layers, heads, dtype, budget):
    size = default_shard_size(max_length, layers, heads, dtype, budget_bytes=budget)
    per_example = layers * heads * max_length * max_length * np.dtype(dtype).itemsize
    assert 1 <= size <= 64
    assert size & (size - 1) == 0  # a power of two
    if size > 1:
        assert size * per_example <= budget
    if size < 64:
        assert 2 * size * per_example > budget


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dtype": "float64"}, "dtype must be one of ('float32', 'float16'), got 'float64'"),
        ({"dtype": "bfloat16"}, "dtype must be one of ('float32', 'float16'), got 'bfloat16'"),
        ({"heads": 6, "kv_heads": 4}, "heads (6) must be a multiple of kv_heads (4)"),
        ({"heads": 4, "kv_heads": 3}, "heads (4) must be a multiple of kv_heads (3)"),
        ({"shard_size": 0}, "layout field shard_size must be a positive integer, got 0"),
        ({"n_examples": -2}, "layout field n_examples must be a positive integer, got -2"),
        ({"max_length": 2.5}, "layout field max_length must be a positive integer, got 2.5"),
        ({"hidden": "5"}, "layout field hidden must be a positive integer, got '5'"),
    ],
)
def test_layout_validation(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AttentionStoreLayout(**{**asdict(LAYOUT), **change})


def test_layout_accepts_numpy_integers_and_grouped_query_heads():
    layout = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": np.int64(7), "heads": 9, "kv_heads": 3})
    assert layout.n_shards == 3


# ------------------------------------------------------------------------------------------
# validation on open, exact messages


def test_wrong_schema_name(url):
    group, _ = build_store(url)
    group.attrs["schema"] = "someone.elses_store"
    with pytest.raises(AttentionStoreError) as caught:
        open_attention_store(url)
    assert str(caught.value) == (
        f"{url} is not an effattn attention store (its 'schema' attribute is 'someone.elses_store', "
        "expected 'effattn.attention_store'): point --store at a store written by `effattn extract`"
    )


def test_a_selection_that_does_not_match_the_arrays_is_refused(url):
    group, _ = build_store(url)
    open_attention_store(url)  # no selection attribute: the store holds every layer and head
    group.attrs["selection"] = {
        "layers": [0, 3, 5],
        "heads": [0, 1, 2, 3],
        "kv_heads": [0, 1],
        "model_layers": 6,
        "model_heads": 4,
        "model_kv_heads": 2,
    }
    with pytest.raises(
        AttentionStoreError,
        match=re.escape(
            f"{url}: the store's selection (3 of 6 layers (0, 3, 5), all 4 heads, 2 kv heads) does not match its "
            "arrays' counts (layers, heads, kv_heads) = (2, 4, 2)"
        ),
    ):
        open_attention_store(url)
    group.attrs["selection"] = {
        "layers": [0, 5],
        "heads": [0, 1, 2, 3],
        "kv_heads": [0, 1],
        "model_layers": 6,
        "model_heads": 4,
        "model_kv_heads": 2,
    }
    assert open_attention_store(url) is not None  # model layers 0 and 5 of 6


def test_a_foreign_zarr_group_is_not_an_attention_store(url):
    zarr.open_group(url, mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="int32")
    message = (
        f"{url} is not an effattn attention store (its 'schema' attribute is None, "
        "expected 'effattn.attention_store'): point --store at a store written by `effattn extract`"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


def test_wrong_schema_version(url):
    group, _ = build_store(url)
    group.attrs["schema_version"] = 4
    message = (
        f"{url} has attention store schema version 4, but this effattn reads versions [1, 2, 3]: "
        "extract again into a new store, or use the effattn release that wrote it"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url, mode="r+")


@pytest.mark.parametrize("how", ["del", "rmtree"])
def test_missing_array(url, how):
    build_store(url)
    if how == "del":
        del zarr.open_group(url, mode="r+")["value"]
    else:
        shutil.rmtree(Path(url) / "value")
    message = (
        f"{url} is missing the arrays ['value']: the store is incomplete or damaged; extract again into a new store"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


def test_missing_arrays_are_all_named_in_schema_order(url):
    build_store(url)
    group = zarr.open_group(url, mode="r+")
    del group["w_out"]
    del group["tokens"]
    message = (
        f"{url} is missing the arrays ['tokens', 'w_out']: the store is incomplete or damaged; "
        "extract again into a new store"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


def _replace_array(url: str, name: str, **spec) -> None:
    group = zarr.open_group(url, mode="r+")
    group.create_array(name, overwrite=True, **spec)


@pytest.mark.parametrize(
    "name, spec, problem",
    [
        (
            "length",
            dict(shape=(7,), dtype="int32", dimension_names=("sample",)),
            "array 'length' has dimensions ('sample',), but schema v2 expects ('example',)",
        ),
        (
            "attention",
            dict(shape=(7, 2, 4, 6, 6), dtype="float32", dimension_names=("example", "layer", "head", "key", "query")),
            "array 'attention' has dimensions ('example', 'layer', 'head', 'key', 'query'), "
            "but schema v2 expects ('example', 'layer', 'head', 'query', 'key')",
        ),
        (
            "logits",
            dict(shape=(7, 3), dtype="float32"),
            "array 'logits' has dimensions (), but schema v2 expects ('example', 'class')",
        ),
        (
            "tokens",
            dict(shape=(7, 5), dtype="int32", dimension_names=("example", "position")),
            "array 'tokens' has shape (7, 5), but the store's layout implies (7, 6)",
        ),
        (
            "length",
            dict(shape=(7,), dtype="int64", dimension_names=("example",)),
            "array 'length' has dtype int64, but schema v2 expects int32",
        ),
        (
            "value",
            dict(shape=(7, 2, 2, 6, 3), dtype="float16", dimension_names=EXPECTED_DIMS["value"]),
            "array 'value' has dtype float16, but schema v2 expects float32",
        ),
    ],
)
def test_wrong_dims_shape_or_dtype(url, name, spec, problem):
    build_store(url)
    _replace_array(url, name, **spec)
    with pytest.raises(AttentionStoreError, match=re.escape(f"{url}: {problem}")):
        open_attention_store(url)


def test_a_store_never_prepared(url):
    build_store(url, prepared=False)
    message = (
        f"{url} was never completely created (its extraction stopped before the token arrays were written): "
        "run the same `effattn extract` command again to finish it"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_no_store_at_the_path(tmp_path, mode):
    url = str(tmp_path / "nothing-here.zarr")
    message = f"there is no attention store at {url}: create one with `effattn extract --store {url} ...`"
    with pytest.raises(AttentionStoreNotFoundError, match=re.escape(message)) as caught:
        open_attention_store(url, mode=mode)
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, AttentionStoreError)
    assert not os.path.exists(url)  # looking did not create anything


# ------------------------------------------------------------------------------------------
# store state, recreation


def test_state_absent(tmp_path):
    assert attention_store_state(str(tmp_path / "nothing.zarr")) == "absent"


def test_state_of_an_empty_plain_directory_is_absent(tmp_path):
    """Nothing would be lost by creating a store there, and create_attention_store does so."""
    folder = tmp_path / "empty"
    folder.mkdir()
    assert attention_store_state(str(folder)) == "absent"
    create_attention_store(str(folder), LAYOUT, ATTRIBUTES)
    assert attention_store_state(str(folder)) == "unprepared"


def test_state_of_a_plain_directory_with_files_is_something_else(tmp_path):
    """A folder of someone's files is not an absent store: the extract stage must refuse it with a clear error."""
    folder = tmp_path / "my-documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    assert attention_store_state(str(folder)) == "something else"


def test_state_of_a_plain_file_is_something_else(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    assert attention_store_state(str(path)) == "something else"


def test_state_unprepared_then_prepared(url):
    group, _ = build_store(url, prepared=False)
    assert attention_store_state(url) == "unprepared"
    mark_prepared(group)
    assert attention_store_state(url) == "prepared"


def test_state_of_foreign_zarr_data_is_something_else(tmp_path):
    foreign_group = str(tmp_path / "group.zarr")
    zarr.open_group(foreign_group, mode="w", zarr_format=3).attrs["schema"] = "other"
    assert attention_store_state(foreign_group) == "something else"
    bare_group = str(tmp_path / "bare.zarr")
    zarr.open_group(bare_group, mode="w", zarr_format=3)
    assert attention_store_state(bare_group) == "something else"
    array = str(tmp_path / "array.zarr")
    zarr.create_array(array, shape=(3,), dtype="int32")
    assert attention_store_state(array) == "something else"


def test_recreate_replaces_an_unprepared_store(url):
    build_store(url, prepared=False)
    smaller = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": 4})
    group = recreate_unprepared_store(url, smaller, {"model": {"name": "again"}})
    assert attention_store_state(url) == "unprepared"
    assert store_layout(group) == smaller
    assert group.attrs["model"] == {"name": "again"}
    assert group.attrs["completed_shards"] == []
    assert "corpus" not in group.attrs  # the old attributes are gone
    assert group["tokens"].shape == (4, 6)
    assert not group["tokens"][:].any()  # the old data is gone


def test_recreate_refuses_a_prepared_store(url):
    _, data = build_store(url)
    message = f"refusing to overwrite {url}: it is prepared, not an unfinished attention store"
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        recreate_unprepared_store(url, LAYOUT, {})
    group = open_attention_store(url)
    assert_store_holds(group, data)
    assert completed_shards(group) == [0, 1, 2]


def test_recreate_refuses_a_foreign_group(tmp_path):
    url = str(tmp_path / "foreign.zarr")
    foreign = zarr.open_group(url, mode="w", zarr_format=3)
    foreign.attrs["owner"] = "someone else"
    foreign.create_array("measurements", shape=(4,), dtype="float64")[:] = [1.0, 2.0, 3.0, 4.0]
    message = f"refusing to overwrite {url}: it is something else, not an unfinished attention store"
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        recreate_unprepared_store(url, LAYOUT, {})
    after = zarr.open_group(url, mode="r")
    assert after.attrs["owner"] == "someone else"
    np.testing.assert_array_equal(after["measurements"][:], [1.0, 2.0, 3.0, 4.0])
    assert set(after.array_keys()) == {"measurements"}


def test_recreate_refuses_a_folder_of_files(tmp_path):
    folder = tmp_path / "my-documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    message = f"refusing to overwrite {folder}: it is something else, not an unfinished attention store"
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        recreate_unprepared_store(str(folder), LAYOUT, {})
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "precious"


def test_create_refuses_an_existing_store(url):
    _, data = build_store(url)
    with pytest.raises(FileExistsError):
        create_attention_store(url, LAYOUT, {})
    assert_store_holds(open_attention_store(url), data)


# ------------------------------------------------------------------------------------------
# resuming: same run, completed shards


def test_check_same_run_accepts_the_same_run(url):
    group, _ = build_store(url)
    check_same_run(
        group,
        url,
        {
            "model.weights_digest": "sha256:aaa",
            "corpus.digest": "sha256:ccc",
            "corpus.selection": {"limit": None, "seed": 0},
            "dtype": "float32",
        },
    )


def test_check_same_run_names_every_difference(url):
    group, _ = build_store(url)
    expected = {
        "model.weights_digest": "sha256:bbb",
        "corpus.digest": "sha256:ccc",  # the same: not named
        "corpus.selection": {"limit": 5, "seed": 0},
        "dtype": "float16",
        "extraction.requested_max_length": 128,  # absent from the store
        "model.layers.deeper": 1,  # a path through a non-dict
    }
    message = (
        f"{url} was written by a different run ("
        "model.weights_digest: store has 'sha256:aaa', this run has 'sha256:bbb'; "
        "corpus.selection: store has {'limit': None, 'seed': 0}, this run has {'limit': 5, 'seed': 0}; "
        "dtype: store has 'float32', this run has 'float16'; "
        "extraction.requested_max_length: store has None, this run has 128; "
        "model.layers.deeper: store has None, this run has 1"
        f"): use another --store, or delete {url} to start over"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        check_same_run(group, url, expected)


def test_check_same_run_survives_a_reopen(url):
    build_store(url)
    group = open_attention_store(url)
    with pytest.raises(AttentionStoreError, match=re.escape("model.weights_digest: store has 'sha256:aaa'")):
        check_same_run(group, url, {"model.weights_digest": "sha256:zzz"})


def test_mark_shard_completed_is_idempotent_and_sorted(url):
    group, _ = build_store(url, shards=[])
    assert completed_shards(group) == []
    mark_shard_completed(group, 2)
    mark_shard_completed(group, 0)
    mark_shard_completed(group, np.int64(2))
    assert completed_shards(group) == [0, 2]
    assert group.attrs["completed_shards"] == [0, 2]
    reopened = open_attention_store(url)
    assert completed_shards(reopened) == [0, 2]
    mark_shard_completed(group, 1)
    mark_shard_completed(group, 1)
    assert completed_shards(open_attention_store(url)) == [0, 1, 2]


def test_completed_shards_sorts_whatever_is_stored(url):
    group, _ = build_store(url, shards=[])
    group.attrs["completed_shards"] = [2, 0, 1]
    assert completed_shards(group) == [0, 1, 2]
    mark_shard_completed(group, 0)
    assert group.attrs["completed_shards"] == [0, 1, 2]


def test_unwritten_shards_read_as_zero(url):
    group, data = build_store(url, shards=[1])
    assert completed_shards(group) == [1]
    np.testing.assert_array_equal(group["attention"][3:6], data["attention"][3:6])
    assert not group["attention"][0:3].any()
    assert not group["attention"][6:7].any()
    assert not group["logits"][0:3].any()


# ------------------------------------------------------------------------------------------
# writing shards


def _shard_arrays(data, region):
    return data["attention"][region], data["value"][region], data["logits"][region]


@pytest.mark.parametrize(
    "shard, which, shape, expected",
    [
        (2, "attention", (3, 2, 4, 6, 6), (1, 2, 4, 6, 6)),  # a full shard's worth into the short last shard
        (0, "attention", (3, 2, 4, 5, 5), (3, 2, 4, 6, 6)),  # not padded to max_length
        (0, "value", (3, 2, 4, 6, 3), (3, 2, 2, 6, 3)),  # repeated to query heads instead of kv heads
        (1, "logits", (3, 2), (3, 3)),
    ],
)
def test_write_shard_rejects_wrong_shapes(url, shard, which, shape, expected):
    group, data = build_store(url, shards=[])
    arrays = dict(zip(("attention", "value", "logits"), _shard_arrays(data, LAYOUT.shard_slice(shard))))
    arrays[which] = np.ones(shape, dtype=np.float32)
    message = f"shard {shard}: '{which}' has shape {shape}, expected {expected}"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_shard(group, shard, arrays["attention"], arrays["value"], arrays["logits"])


def test_a_rejected_shard_leaves_the_store_unchanged(url):
    """write_shard checks every shape before writing anything: a bad `value` must not leave new attention behind."""
    group, data = build_store(url)
    region = LAYOUT.shard_slice(1)
    garbage = np.full_like(data["attention"][region], 7.0)
    bad_value = np.ones((3, 2, 4, 6, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=re.escape("shard 1: 'value' has shape (3, 2, 4, 6, 3)")):
        write_shard(group, 1, garbage, bad_value, data["logits"][region])
    assert_store_holds(open_attention_store(url), data)


def test_write_shard_of_a_missing_shard(url):
    group, data = build_store(url, shards=[])
    with pytest.raises(IndexError, match=re.escape("shard 3 does not exist: the store has shards 0..2")):
        write_shard(group, 3, *_shard_arrays(data, slice(0, 1)))


def test_write_shard_touches_only_its_shard(url):
    group, data = build_store(url)
    region = LAYOUT.shard_slice(1)
    new = make_data(LAYOUT, seed=1)
    write_shard(group, 1, *_shard_arrays(new, region))
    stored = open_attention_store(url)
    for name in ("attention", "value", "logits"):
        expected = data[name].copy()
        expected[region] = new[name][region]
        np.testing.assert_array_equal(stored[name][:], expected, err_msg=name)


@pytest.mark.end_to_end
def test_the_entry_points_select_the_zarrs_pipeline_unless_the_user_chose_otherwise():
    """The entry points (here the CLI) switch zarr to the zarrs codec pipeline and batch chunks through zarr's own
    pipeline where it still runs; importing the project's modules leaves zarr's process-wide settings alone; a
    pipeline or batch size the user set in the environment is kept, even one equal to zarr's default."""
    imports = "import storage_schemas.attention_store, flows.cli, flows.pipeline, effattn, zarr"
    report = "print(zarr.config.get('codec_pipeline.path'), zarr.config.get('codec_pipeline.batch_size'))"
    root = Path(__file__).parent.parent

    def settings(code: str, **environment) -> str:
        base = {key: value for key, value in os.environ.items() if not key.startswith("ZARR_CODEC_PIPELINE__")}
        return (
            subprocess.run(
                [sys.executable, "-W", "error::UserWarning", "-c", code],
                capture_output=True,
                text=True,
                check=True,
                cwd=root,
                env={**base, **environment},
            )
            .stdout.strip()
            .splitlines()[-1]
        )

    assert CHUNK_CODEC_BATCH_SIZE > 1
    fast = f"{FAST_CODEC_PIPELINE} {CHUNK_CODEC_BATCH_SIZE}"
    assert settings(f"{imports}; {report}") == f"{ZARR_DEFAULT_CODEC_PIPELINE} 1"
    entry_point = f"{imports}; from flows.cli import main; main(['inspect', 'no-such-store.zarr']); {report}"
    assert settings(entry_point) == fast
    users_choice = {"ZARR_CODEC_PIPELINE__BATCH_SIZE": "3", "ZARR_CODEC_PIPELINE__PATH": ZARR_DEFAULT_CODEC_PIPELINE}
    assert settings(entry_point, **users_choice) == f"{ZARR_DEFAULT_CODEC_PIPELINE} 3"
    call = "import zarr, storage_schemas.attention_store; storage_schemas.attention_store.use_fast_codec_pipeline()"
    assert settings(f"{call}; {report}") == fast
    chosen = "zarr.config.set({'codec_pipeline.path': 'zarrs.ZarrsCodecPipeline'})"  # in zarr.config, not the env
    assert settings(f"import zarr; {chosen}; {call}; {report}") == f"zarrs.ZarrsCodecPipeline {CHUNK_CODEC_BATCH_SIZE}"


def test_without_zarrs_zarr_s_pipeline_stays_with_one_warning():
    code = (
        "import sys, warnings; sys.modules['zarrs'] = None; import zarr; "
        "from storage_schemas.attention_store import use_fast_codec_pipeline\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    use_fast_codec_pipeline(); use_fast_codec_pipeline()\n"
        "print(len(caught), zarr.config.get('codec_pipeline.path'))\n"
        "print(caught[0].message)"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("ZARR_CODEC_PIPELINE__")}
    printed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
        env=environment,
    ).stdout.splitlines()
    assert printed[0] == f"1 {ZARR_DEFAULT_CODEC_PIPELINE}"
    assert printed[1].startswith("zarrs cannot be imported (")
    assert printed[1].endswith(
        "stores are read and written with zarr's slower codec pipeline. Install zarrs "
        "(see requirements.txt) for the fast one"
    )


PIPELINES = {"zarrs": FAST_CODEC_PIPELINE, "zarr": ZARR_DEFAULT_CODEC_PIPELINE}


def stored_chunks(url: str) -> dict[str, bytes]:
    """Every encoded chunk of the store at `url` by file and position in the shard (the order of chunks inside a
    shard file is free, and zarr-python's depends on timing), and every other file's bytes; root attributes left
    out (they hold random shard identities)."""
    group = zarr.open_group(url, mode="r")
    sharded = {name: array for name, array in group.arrays() if array.shards is not None}
    found = {}
    for path in sorted(Path(url).rglob("*")):
        key = str(path.relative_to(url))
        if not path.is_file() or key == "zarr.json":
            continue
        content, array = path.read_bytes(), sharded.get(key.split("/c/")[0])
        if array is None or "/c/" not in key:
            found[key] = content
            continue
        n_chunks = int(np.prod([s // c for s, c in zip(array.shards, array.chunks)]))
        index = np.frombuffer(content[-(16 * n_chunks + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
        for position, (offset, size) in enumerate(index):
            found[f"{key}#{position}"] = b"" if offset == 2**64 - 1 else content[offset : offset + size]
    return found


def test_the_pipelines_write_the_same_chunks_and_read_each_other_s_stores(tmp_path):
    """A store stays readable by any Zarr v3 implementation: zarrs and zarr-python encode every chunk to the same
    bytes (only the order of chunks inside a shard file may differ), and each reads what the other wrote."""
    data = make_data(LAYOUT)
    urls = {}
    for name, path in PIPELINES.items():
        with zarr.config.set({"codec_pipeline.path": path}):
            urls[name] = str(tmp_path / f"{name}.zarr")
            group, _ = build_store(urls[name], data=data)
            assert type(group["attention"]._async_array.codec_pipeline).__module__ == path.rsplit(".", 1)[0]
    chunks = {name: stored_chunks(url) for name, url in urls.items()}
    assert chunks["zarr"] == chunks["zarrs"]
    # schema v2: one inner chunk per example, holding all its layers
    assert (
        sum(key.startswith("attention/c/") and len(chunk) > 0 for key, chunk in chunks["zarrs"].items())
        == LAYOUT.n_examples
    )
    for writer, reader in (("zarrs", "zarr"), ("zarr", "zarrs")):
        with zarr.config.set({"codec_pipeline.path": PIPELINES[reader]}):
            group = open_attention_store(urls[writer])
            assert_store_holds(group, data)
            np.testing.assert_array_equal(group["attention"][1:5, 1, :, :3], data["attention"][1:5, 1, :, :3])


def damage_first_chunk(url: str, where: str = "data") -> None:
    """Flip one bit of attention example 0 (the first chunk of shard 0; schema v2: all its layers): in its
    compressed data, or in its stored CRC32C (the data still decode). Either way its checksum fails."""
    path = Path(url) / "attention" / "c" / "0" / "0" / "0" / "0" / "0"
    damaged = bytearray(path.read_bytes())
    attention = open_attention_store(url)["attention"]
    n_chunks = int(np.prod([shard // chunk for shard, chunk in zip(attention.shards, attention.chunks)]))
    offset, size = np.frombuffer(bytes(damaged[-(16 * n_chunks + 4) : -4]), dtype="<u8").reshape(n_chunks, 2)[0]
    damaged[int(offset) + (int(size) // 2 if where == "data" else int(size) - 1)] ^= 0x01
    path.write_bytes(bytes(damaged))


@pytest.mark.parametrize("where", ["data", "checksum"])
@pytest.mark.parametrize(
    "selection",
    [np.s_[0:3], np.s_[0], np.s_[0:3, 0], np.s_[0:3, :, :, :4], np.s_[0, 0, 1]],
    ids=["whole shard", "one example", "one layer", "first positions", "one head"],
)
def test_every_read_of_a_damaged_chunk_fails_its_checksum(url, selection, where):
    """With zarrs selected, whole-shard reads and reads of part of a shard alike raise an error that
    is_corrupt_chunk_error recognises, never the damaged numbers."""
    from storage_schemas.storage_faults import is_corrupt_chunk_error

    build_store(url)
    damage_first_chunk(url, where)
    with zarr.config.set({"codec_pipeline.path": FAST_CODEC_PIPELINE}):
        attention = open_attention_store(url)["attention"]
        with pytest.raises(Exception) as raised:
            attention[selection]
        assert is_corrupt_chunk_error(raised.value), raised.value
        np.testing.assert_array_equal(attention[3:7], make_data(LAYOUT)["attention"][3:7])  # other shards read


def test_plain_zarrs_does_not_check_the_checksum_of_part_of_a_shard(url):
    """Why FAST_CODEC_PIPELINE is not plain `zarrs.ZarrsCodecPipeline`: zarrs 0.2.3 returns the damaged numbers of
    a partial shard read without error. When this test fails, zarrs checks them: ChecksumValidatingZarrsPipeline
    can go."""
    build_store(url)
    damage_first_chunk(url, where="checksum")
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        attention = open_attention_store(url)["attention"]
        with pytest.raises(RuntimeError, match="the checksum is invalid"):
            attention[0:3]
        read = attention[0:3, 0]  # part of shard 0, its damaged chunk included: no error
    np.testing.assert_array_equal(read, make_data(LAYOUT)["attention"][0:3, 0])


def test_every_completed_shard_gets_a_fresh_identity_and_loses_it_when_unmarked(url):
    group, _ = build_store(url, shards=[0, 2])
    identities = extraction_identities(open_attention_store(url))
    assert sorted(identities) == [0, 2] and len(set(identities.values())) == 2
    assert LEGACY_SHARD_IDENTITY not in identities.values()
    mark_shard_completed(group, 0)  # written again: a new identity
    assert extraction_identities(group)[0] != identities[0] and extraction_identities(group)[2] == identities[2]
    unmark_shards(group, [2])
    assert completed_shards(group) == [0] and list(extraction_identities(open_attention_store(url))) == [0]
    assert "2" not in group.attrs["shard_identities"]


def test_a_store_without_identities_has_legacy_ones(url):
    group, _ = build_store(url, shards=[0, 1])
    del group.attrs["shard_identities"]  # as the earlier version wrote it
    assert extraction_identities(open_attention_store(url)) == {0: LEGACY_SHARD_IDENTITY, 1: LEGACY_SHARD_IDENTITY}
    mark_shard_completed(group, 2)
    identities = extraction_identities(open_attention_store(url))
    assert identities[0] == identities[1] == LEGACY_SHARD_IDENTITY != identities[2]


def test_a_consumer_shard_is_current_only_while_every_input_keeps_its_identity():
    assert shard_is_current({"extraction": "a"}, {"extraction": "a"})
    assert not shard_is_current({"extraction": "a"}, {"extraction": "b"})  # written again
    assert not shard_is_current({"extraction": "a"}, {"extraction": None})  # not complete now
    assert not shard_is_current({"extraction": "a", "efficient/simplex": "s"}, {"extraction": "a"})
    assert shard_is_current({"extraction": LEGACY_SHARD_IDENTITY}, {"extraction": LEGACY_SHARD_IDENTITY})


def test_an_unfinished_extraction_is_refused_naming_its_shards_and_the_command(url):
    group, _ = build_store(url, shards=[1])
    with pytest.raises(IncompleteInputError) as refused:
        require_extracted(group, url, "efficient")
    missing = [0, 2]  # 7 examples in shards of 3: the last shard holds example 6 alone
    assert str(refused.value) == (
        f"{url}: extraction shards {missing} (examples 0 to 2, 6) are not complete (unwritten shards "
        "read as zeros), so `effattn efficient` cannot run on this store yet: finish them by running the `effattn "
        f"extract --corpus {ATTRIBUTES['corpus']['name']} --model {ATTRIBUTES['model']['name']} --store {url} ...` "
        "command that created the store again, with the same options (it resumes and writes only the missing "
        "shards); then run `effattn efficient` again"
    )
    for shard in missing:
        mark_shard_completed(group, shard)
    require_extracted(group, url, "efficient")  # complete: no error


def test_describe_shards_joins_neighbours_and_names_single_examples():
    layout = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": 7, "shard_size": 3})  # shards 0..2, last of 1
    assert describe_shards([2], layout) == "shard [2] (example 6)"
    assert describe_shards([1, 0], layout) == "shards [0, 1] (examples 0 to 5)"
    assert describe_shards([0, 2], layout) == "shards [0, 2] (examples 0 to 2, 6)"


# ------------------------------------------------------------------------------------------
# texts (v2: bytes + offsets) and schema v1 stores


def test_read_texts_of_any_examples_in_any_order(url):
    _, data = build_store(url)
    group = open_attention_store(url)
    texts = list(data["text"])
    assert read_texts(group) == texts
    assert read_texts(group, [6, 0, 3, 3]) == [texts[6], texts[0], texts[3], texts[3]]
    assert read_texts(group, np.array([1])) == [texts[1]]
    assert read_texts(group, slice(2, 5)) == texts[2:5]
    assert read_texts(group, []) == []
    assert read_texts(group, [-1]) == [texts[-1]]
    offsets = group["text_offsets"][:]
    assert offsets[0] == 0 and offsets[-1] == group["text_bytes"].shape[0]
    assert (np.diff(offsets) == [len(text.encode("utf-8")) for text in texts]).all()
    with pytest.raises(IndexError, match=re.escape("example indices must be in 0..6, got [7]")):
        read_texts(group, [7])


def test_read_texts_far_apart_reads_each_text_alone(url):
    """Texts far apart in a big corpus are read one by one (not the bytes between them): same result."""
    layout = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": 3, "shard_size": 1})
    data = make_data(layout)
    data["text"] = np.array(["first", "é" * 1_500_000, "last"], dtype=object)  # 3 MB between them
    build_store(url, layout, data)
    group = open_attention_store(url)
    assert read_texts(group, [2, 0]) == ["last", "first"]
    assert read_texts(group, [1]) == ["é" * 1_500_000]


def test_all_empty_texts(url):
    data = make_data(LAYOUT)
    data["text"] = np.array([""] * LAYOUT.n_examples, dtype=object)
    build_store(url, data=data)
    group = open_attention_store(url)
    assert group["text_bytes"].shape == (0,)
    assert read_texts(group) == [""] * LAYOUT.n_examples


def test_text_bytes_not_matching_the_offsets_is_refused(url):
    group, _ = build_store(url)
    group["text_bytes"].resize((group["text_bytes"].shape[0] - 1,))
    total = int(group["text_offsets"][-1])
    message = f"{url}: array 'text_bytes' has shape ({total - 1},), but the store's layout implies ({total},)"
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


def test_a_v1_store_has_the_v1_layout_and_stays_readable(url):
    """A store written by schema v1: texts in a `string` array, chunks of one example x one layer."""
    _, data = build_store(url, schema_version=1)
    group = zarr.open_group(url, mode="r")
    assert set(group.array_keys()) == set(EXPECTED_V1_DIMS)
    for name, dims in EXPECTED_V1_DIMS.items():
        assert tuple(group[name].metadata.dimension_names) == dims, name
    assert json.loads((Path(url) / "text" / "zarr.json").read_text())["data_type"] == "string"
    assert group["attention"].chunks == (1, 1, LAYOUT.heads, 6, 6)
    assert group["value"].chunks == (1, 1, LAYOUT.kv_heads, 6, LAYOUT.head_dim)
    opened = open_attention_store(url)
    assert opened.attrs["schema_version"] == 1
    assert not readable_by_every_reader(opened)
    assert_store_holds(opened, data)
    texts = list(data["text"])
    assert read_texts(opened, [5, 1, -1]) == [texts[5], texts[1], texts[-1]]
    assert read_texts(opened, slice(0, 2)) == texts[:2]
    assert read_texts(opened, []) == []
    with pytest.raises(IndexError, match=re.escape("example indices must be in 0..6, got [7]")):
        read_texts(opened, [7])
    build_store(url + "-v2")
    assert readable_by_every_reader(open_attention_store(url + "-v2"))


def test_the_same_data_reads_the_same_from_v1_and_v2(tmp_path):
    _, data = build_store(str(tmp_path / "v1.zarr"), schema_version=1)
    build_store(str(tmp_path / "v2.zarr"), data=data)
    v1, v2 = open_attention_store(str(tmp_path / "v1.zarr")), open_attention_store(str(tmp_path / "v2.zarr"))
    assert read_texts(v1) == read_texts(v2) == list(data["text"])
    for name in ("attention", "value", "tokens", "logits"):
        np.testing.assert_array_equal(v1[name][:], v2[name][:], err_msg=name)
        np.testing.assert_array_equal(v1[name][1:5, ...], v2[name][1:5, ...], err_msg=name)
    np.testing.assert_array_equal(v1["attention"][:, 1], v2["attention"][:, 1])  # one layer of every example


@pytest.mark.parametrize("version", [1, 2])
def test_validation_checks_the_arrays_of_the_stores_own_version(url, version):
    build_store(url, schema_version=version)
    group = zarr.open_group(url, mode="r+")
    if version == 1:
        group.create_array("text_offsets", shape=(8,), dtype="int64", dimension_names=("example_boundary",))
        open_attention_store(url)  # an extra array is no problem; a missing one is
        del group["text"]
        missing = ["text"]
    else:
        del group["text_offsets"]
        missing = ["text_offsets"]
    message = (
        f"{url} is missing the arrays {missing}: the store is incomplete or damaged; extract again into a new store"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


@pytest.mark.parametrize("version, wrong_layers", [(1, 2), (2, 1)])
def test_attention_chunks_of_the_other_version_are_refused(url, version, wrong_layers):
    build_store(url, schema_version=version)
    S, L = LAYOUT.shard_size, LAYOUT.max_length
    _replace_array(
        url,
        "attention",
        shape=(7, 2, 4, L, L),
        dtype="float32",
        chunks=(1, wrong_layers, 4, L, L),
        shards=(S, 2, 4, L, L),
        dimension_names=EXPECTED_DIMS["attention"],
    )
    expected = (1, 3 - wrong_layers, 4, L, L)
    message = (
        f"{url}: array 'attention' has chunks (1, {wrong_layers}, 4, 6, 6) and shards ({S}, 2, 4, 6, 6), but "
        f"schema v{version} expects chunks {expected} and shards ({S}, 2, 4, 6, 6): the store is damaged or "
        "was written by another program; extract again into a new store"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        open_attention_store(url)


def test_a_v1_store_takes_shards_in_its_own_layout(url):
    """Writing shards into a v1 store (extraction resuming) keeps its v1 chunks and version."""
    group, data = build_store(url, schema_version=1, shards=[0])
    region = LAYOUT.shard_slice(2)
    write_shard(group, 2, *_shard_arrays(data, region))
    mark_shard_completed(group, 2)
    reopened = open_attention_store(url)
    assert reopened.attrs["schema_version"] == 1 and reopened["attention"].chunks[1] == 1
    np.testing.assert_array_equal(reopened["attention"][region], data["attention"][region])


# --- growth (schema v3) -----------------------------------------------------------------------------------------------


def grown_halves(url: str) -> tuple[zarr.Group, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A v3 store of LAYOUT's 7 examples, every shard written, then 4 more examples appended to it (metadata only):
    the old last shard (example 6) was partial. Returns the store and the data of the 7 and of the 4."""
    group, first = build_store(url, schema_version=3)
    grown = AttentionStoreLayout(**{**asdict(LAYOUT), "n_examples": 4})
    second = make_data(grown, seed=1)
    begin_append(group, 11)
    write_example_metadata(
        group,
        tokens=second["tokens"],
        length=second["length"],
        untruncated_length=second["untruncated_length"],
        source_index=second["source_index"],
        label=second["label"],
        text=second["text"],
        start=7,
        run=1,
        added_at=86400,
    )
    return group, first, second


@pytest.mark.unit
def test_an_append_resizes_every_example_array_and_records_the_run_in_one_commit(url):
    group, first, second = grown_halves(url)
    with pytest.raises(AttentionStoreError, match=r"an append of examples 7 to 10 was interrupted"):
        open_attention_store(url)  # not yet recorded: readers are told, nothing is misread
    shards = commit_append(group, 11, {"run_id": "second"}, {"digest": "sha256:ddd", "example_count": 11})
    assert shards == [2, 3]  # the old partial last shard, then the new one
    reopened = open_attention_store(url)
    assert store_layout(reopened).n_examples == 11 and completed_shards(reopened) == [0, 1]
    assert reopened["attention"].shape[0] == 11 and reopened["text_offsets"].shape == (12,)
    np.testing.assert_array_equal(reopened["length"][:], np.concatenate([first["length"], second["length"]]))
    assert read_texts(reopened) == [*map(str, first["text"]), *map(str, second["text"])]
    np.testing.assert_array_equal(reopened["added_by_run"][:], [0] * 7 + [1] * 4)
    assert [run["run_id"] for run in reopened.attrs["runs"][-1:]] == ["second"]
    assert reopened.attrs["corpus"]["digest"] == "sha256:ddd" and reopened.attrs["corpus"]["name"] == "reviews"
    identities = stored_identities(reopened)
    assert identities.shape == (11, 16) and len({bytes(row) for row in identities}) == len(
        {(str(text), int(label)) for text, label in zip([*first["text"], *second["text"]], reopened["label"][:])}
    )
    # the old examples' stored tensors are untouched
    np.testing.assert_array_equal(reopened["attention"][:6], first["attention"][:6])
    # xarray decodes when each example was added
    dataset = xr.open_zarr(url, consolidated=False)
    assert str(dataset["added_at"].values[-1])[:10] == "1970-01-02"


@pytest.mark.unit
def test_an_interrupted_append_is_abandoned_or_redone_from_the_recorded_examples(url):
    group, first, _ = grown_halves(url)
    reopened = open_store_to_append(url)  # refused by validation, opened for the append
    abandon_append(reopened)
    restored = open_attention_store(url)
    assert store_layout(restored).n_examples == 7 and restored["tokens"].shape[0] == 7
    assert read_texts(restored) == list(map(str, first["text"])) and completed_shards(restored) == [0, 1, 2]
