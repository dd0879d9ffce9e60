"""Everything effattn writes is readable by other Zarr v3 implementations (storage_schemas.portability).

Stores are written through the real storage functions with every warning turned into an error (zarr-python warns,
with UnstableSpecificationWarning, about data types that lack a Zarr v3 specification). Each array's zarr.json is
then checked twice: by `portability_problems`, and by an independent walk over the files that spells the allowed
data types and codecs out literally.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.errors import UnstableSpecificationWarning

from analysis.variants import VARIANTS
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    array_dimensions,
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    read_texts,
    write_example_metadata,
    write_shard,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)
from storage_schemas.portability import (
    READER_EXTENSION_DATA_TYPES,
    array_metadata_problems,
    portability_problems,
    reader_problems,
    with_portable_strings,
)
from tests.conftest import REVIEW_ROWS
from tests.store_builders import build_real_store, build_v1_store, write_corpus

# The Zarr v3 core data types and codecs, written out here rather than taken from the module under test.
CORE_DATA_TYPES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
}
CORE_CODECS = {"bytes", "transpose", "gzip", "blosc", "sharding_indexed", "crc32c", "zstd"}
# Registered extensions an attention store of schema v2 uses: none (v1 had its `text` array of zarr-extensions'
# data-types/string with codecs/vlen-utf8; TensorStore does not open that).
EXTENSION_DATA_TYPES: dict[str, tuple[str, str]] = {}

LAYOUT = AttentionStoreLayout(
    n_examples=5,
    max_length=6,
    n_classes=3,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=3,
    hidden=5,
    shard_size=2,
    dtype="float32",
)
SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}
TEXTS = ["naïve café", "日本語のテキスト", "", 'a "quoted", text', "x" * 200]


def layout_variant(**change) -> AttentionStoreLayout:
    return AttentionStoreLayout(**{**asdict(LAYOUT), **change})


def write_full_store(url: str, layout: AttentionStoreLayout, schema_version: int = 3) -> None:
    """A complete store as extraction + the efficient stage write it (every shard, every variant), random data."""
    rng = np.random.default_rng(0)
    E, L = layout.n_examples, layout.max_length
    group = create_attention_store(
        url, layout, {"model": {"name": "tiny", "causal": False}}, schema_version=schema_version
    )
    write_example_metadata(
        group,
        tokens=rng.integers(0, 1000, (E, L)),
        length=np.array([2, 3, 4, 6, 6]),
        untruncated_length=np.array([2, 3, 4, 6, 9]),
        source_index=np.arange(E),
        label=np.array([0, 1, 2, -1, 0]),
        text=np.array(TEXTS, dtype=object),
    )
    group["w_out"][:] = rng.standard_normal(group["w_out"].shape)
    mark_prepared(group)
    for variant in VARIANTS:
        prepare_efficient_arrays(group, url, variant, SETTINGS)
    for shard in range(layout.n_shards):
        region = layout.shard_slice(shard)
        n = region.stop - region.start
        extra = {}
        if layout.task == "next-token":
            logits = rng.standard_normal((n, L, layout.top_k)).astype(np.float32)
            extra = {
                "logit_ids": rng.integers(0, layout.n_classes, (n, L, layout.top_k)).astype(np.int32),
                "logsumexp": rng.standard_normal((n, L)).astype(np.float32),
            }
        else:
            logits = rng.standard_normal((n, layout.n_classes)).astype(np.float32)
        write_shard(
            group,
            shard,
            rng.random((n, layout.layers, layout.heads, L, L)).astype(layout.dtype),
            rng.random((n, layout.layers, layout.kv_heads, L, layout.head_dim)).astype(layout.dtype),
            logits,
            **extra,
        )
        mark_shard_completed(group, shard)
        for variant in VARIANTS:
            diagnostics = {
                name: rng.integers(0, 2, (n, layout.layers, layout.heads)).astype(dtype)
                for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items()
            }
            write_efficient_shard(
                group, layout, variant, shard, rng.random((n, layout.layers, layout.heads, L, L)), diagnostics
            )
            mark_efficient_shard_completed(group, variant, shard)


def expected_arrays(layout: AttentionStoreLayout) -> dict[str, tuple[str, ...]]:
    """Every array path of a complete store -> its dimension names (schema v2 + the efficient stage)."""
    arrays = dict(array_dimensions(layout.task))
    for variant in VARIANTS:
        arrays[f"efficient/{variant}"] = ("example", "layer", "head", "query", "key")
        arrays.update({f"diagnostics/{variant}/{name}": ("example", "layer", "head") for name in DIAGNOSTIC_ARRAYS})
    return arrays


def metadata_documents(url: str) -> dict[str, dict]:
    """Path inside the store -> parsed zarr.json, for every node, found by walking the files."""
    documents = {}
    for folder, _, files in os.walk(url):
        if "zarr.json" in files:
            path = os.path.relpath(folder, url).replace(os.sep, "/")
            documents["" if path == "." else path] = json.loads(Path(folder, "zarr.json").read_text())
        assert not {".zarray", ".zgroup", ".zattrs", ".zmetadata"} & set(files), f"Zarr v2 metadata in {folder}"
    return documents


def codec_names(codecs: list[dict]) -> list[str]:
    names = []
    for codec in codecs:
        names.append(codec["name"])
        if codec["name"] == "sharding_indexed":
            names += codec_names(codec["configuration"]["codecs"]) + codec_names(codec["configuration"]["index_codecs"])
    return names


@pytest.mark.parametrize(
    "layout",
    [LAYOUT, layout_variant(dtype="float16"), layout_variant(task="next-token", n_classes=50, top_k=3)],
    ids=["classification-float32", "classification-float16", "next-token"],
)
def test_a_complete_store_writes_without_warnings_and_every_array_is_spec_conformant(tmp_path, layout):
    url = str(tmp_path / "store.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # UnstableSpecificationWarning or any other warning fails the test
        write_full_store(url, layout)

    documents = metadata_documents(url)
    arrays = {path: doc for path, doc in documents.items() if doc["node_type"] == "array"}
    expected = expected_arrays(layout)
    assert set(arrays) == set(expected)
    assert {path for path, doc in documents.items() if doc["node_type"] == "group"} == (
        {"", "efficient", "diagnostics"} | {f"diagnostics/{variant}" for variant in VARIANTS}
    )
    for path, doc in documents.items():
        assert doc["zarr_format"] == 3, path
    for path, doc in arrays.items():
        assert doc["dimension_names"] == list(expected[path]), path
        codecs = codec_names(doc["codecs"])
        if path in EXTENSION_DATA_TYPES:
            data_type, codec = EXTENSION_DATA_TYPES[path]
            assert doc["data_type"] == data_type
            assert codec in codecs
            assert set(codecs) - {codec} <= CORE_CODECS, (path, codecs)
        else:
            assert doc["data_type"] in CORE_DATA_TYPES, (path, doc["data_type"])
            assert set(codecs) <= CORE_CODECS, (path, codecs)
        assert doc["chunk_grid"]["name"] == "regular" and doc["chunk_key_encoding"]["name"] == "default"
        assert not doc.get("storage_transformers"), path
    assert arrays["diagnostics/simplex/converged"]["data_type"] == "bool"  # a core type, not numpy's "|b1"
    assert portability_problems(url) == []


def test_the_store_opens_with_plain_xarray_groups(tmp_path):
    url = str(tmp_path / "store.zarr")
    write_full_store(url, LAYOUT)
    root = xr.open_zarr(url, consolidated=False)
    data, offsets = root["text_bytes"].values.tobytes(), root["text_offsets"].values
    assert [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(TEXTS))] == TEXTS
    efficient = xr.open_zarr(url, group="efficient", consolidated=False)
    assert set(efficient.data_vars) == set(VARIANTS)
    diagnostics = xr.open_zarr(url, group="diagnostics/simplex", consolidated=False)
    assert set(diagnostics.data_vars) == set(DIAGNOSTIC_ARRAYS)
    assert diagnostics["converged"].dtype == bool


def test_portability_through_an_fsspec_url(tmp_path):
    url = f"memory://effattn-portability-{tmp_path.name}/store.zarr"
    import fsspec

    try:
        write_full_store(url, LAYOUT)
        assert portability_problems(url) == []
        group = zarr.open_group(url, mode="r+")
        group.create_array("loose", shape=(2,), dtype="int32")  # no dimension names
        assert portability_problems(url) == ["/loose: no dimension_names: give every array named dimensions"]
    finally:
        fsspec.filesystem("memory").rm(f"/effattn-portability-{tmp_path.name}", recursive=True)


# ------------------------------------------------------------------------------------------
# what is not portable is named, with what to do


def test_xarray_unicode_strings_are_unspecified_and_with_portable_strings_fixes_them(tmp_path):
    dataset = xr.Dataset(
        {"score": (("intervention",), np.array([0.5, 1.0, 0.25]))},
        coords={
            "intervention": np.array(["replay", "efficient:simplex", "ablate"]),
            "note": (("intervention",), np.array(["a", "bé", "c"])),
        },
    )
    assert dataset["intervention"].dtype.kind == "U"
    unportable = str(tmp_path / "unicode.zarr")
    with pytest.warns(UnstableSpecificationWarning, match=re.escape("does not have a Zarr V3 specification")):
        dataset.to_zarr(unportable, consolidated=False, zarr_format=3)
    advice = (
        "write strings as variable-length strings (numpy StringDType or object arrays; "
        "storage_schemas.portability.with_portable_strings does it for an xarray Dataset)"
    )
    assert portability_problems(unportable) == [
        f"/{name}: data type 'fixed_length_utf32' has no Zarr v3 specification (neither core nor a registered "
        f"extension this project allows: ['string']): {advice}"
        for name in ("intervention", "note")
    ]

    portable = str(tmp_path / "portable.zarr")
    converted = with_portable_strings(dataset)
    assert converted["intervention"].dtype == object and converted["note"].dtype == object
    assert dataset["intervention"].dtype.kind == "U"  # the input is unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted.to_zarr(portable, consolidated=False, zarr_format=3)
    assert portability_problems(portable) == []
    assert json.loads(Path(portable, "intervention", "zarr.json").read_text())["data_type"] == "string"
    reread = xr.open_zarr(portable, consolidated=False)
    assert [str(value) for value in reread["intervention"].values] == ["replay", "efficient:simplex", "ablate"]
    assert [str(value) for value in reread["note"].values] == ["a", "bé", "c"]
    np.testing.assert_array_equal(reread["score"].values, [0.5, 1.0, 0.25])


def test_with_portable_strings_leaves_a_dataset_without_unicode_alone():
    dataset = xr.Dataset({"x": (("a",), np.arange(3))})
    assert with_portable_strings(dataset) is dataset


def test_a_zarr_v2_store_is_not_portable(tmp_path):
    url = str(tmp_path / "v2.zarr")
    zarr.open_group(url, mode="w", zarr_format=2).create_array("x", shape=(3,), dtype="int32")
    assert portability_problems(url) == ["/: written in Zarr format 2, not 3", "/x: written in Zarr format 2, not 3"]


def test_missing_or_partial_dimension_names_are_named(tmp_path):
    url = str(tmp_path / "dims.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.create_array("named", shape=(2, 3), dtype="float32", dimension_names=("a", "b"))
    group.create_array("anonymous", shape=(2, 3), dtype="float32")
    group.create_array("partly", shape=(2, 3), dtype="float32", dimension_names=("a", None))
    assert portability_problems(url) == [
        "/anonymous: no dimension_names: give every array named dimensions",
        "/partly: dimension_names ['a', None] do not name each of its 2 dimensions",
    ]


def _array_document(**change) -> dict:
    document = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [4, 4],
        "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 4]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, 4],
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
                    "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": ["example", "key"],
    }
    return {**document, **change}


def test_array_metadata_problems_accepts_a_conformant_sharded_array():
    assert array_metadata_problems("/a", _array_document()) == []
    assert array_metadata_problems("/a", _array_document(data_type="r16")) == []  # core raw bits
    assert (
        array_metadata_problems(
            "/t", _array_document(data_type="string", codecs=[{"name": "vlen-utf8"}, {"name": "gzip"}])
        )
        == []
    )


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            {"data_type": {"name": "raw_bytes", "configuration": {"length_bytes": 4}}},
            "/a: data type 'raw_bytes' has no Zarr v3 specification (neither core nor a registered extension this "
            "project allows: ['string']): store the bytes in a uint8 array with an extra dimension",
        ),
        (
            {"data_type": "variable_length_bytes"},
            "/a: data type 'variable_length_bytes' has no Zarr v3 specification (neither core nor a registered "
            "extension this project allows: ['string']): store the bytes in a uint8 array with offsets, or as strings",
        ),
        (
            {"codecs": [{"name": "bytes"}, {"name": "numcodecs.lz4"}]},
            "/a: codec 'numcodecs.lz4' is neither a Zarr v3 core codec ['blosc', 'bytes', 'crc32c', 'gzip', "
            "'sharding_indexed', 'transpose', 'zstd'] nor a registered extension this project allows ['vlen-utf8']: "
            "use zstd, gzip or blosc",
        ),
        (
            {"data_type": "string", "codecs": [{"name": "vlen-bytes"}]},
            "/a: codec 'vlen-bytes' is neither a Zarr v3 core codec ['blosc', 'bytes', 'crc32c', 'gzip', "
            "'sharding_indexed', 'transpose', 'zstd'] nor a registered extension this project allows ['vlen-utf8']: "
            "use zstd, gzip or blosc",
        ),
        (
            {"chunk_grid": {"name": "rectilinear", "configuration": {}}},
            "/a: chunk grid 'rectilinear' is not a core chunk grid ['regular']",
        ),
        (
            {"chunk_key_encoding": {"name": "custom"}},
            "/a: chunk key encoding 'custom' is not a core encoding ['default', 'v2']",
        ),
        (
            {"storage_transformers": [{"name": "manifest"}]},
            "/a: storage transformers [{'name': 'manifest'}] are not part of Zarr v3 core",
        ),
        ({"dimension_names": ["example"]}, "/a: dimension_names ['example'] do not name each of its 2 dimensions"),
    ],
)
def test_array_metadata_problems_names_each_unportable_feature(change, problem):
    assert problem in array_metadata_problems("/a", _array_document(**change))


def test_a_non_core_codec_nested_in_a_shard_is_found():
    document = _array_document()
    document["codecs"][0]["configuration"]["codecs"][1] = {"name": "numcodecs.bz2"}
    problems = array_metadata_problems("/a", document)
    assert len(problems) == 1 and problems[0].startswith("/a: codec 'numcodecs.bz2' is neither")


def test_string_without_its_codec_is_named():
    problems = array_metadata_problems("/t", _array_document(data_type="string", codecs=[{"name": "bytes"}]))
    assert problems == ["/t: data type 'string' must be encoded with the 'vlen-utf8' codec, got ['bytes']"]


def test_the_plotting_example_of_docs_datasets_runs(tmp_path):
    """docs/DATASETS.md promises a five-line example that plots one head: it runs on a store of that shape."""
    import subprocess
    import sys

    text = (Path(__file__).resolve().parents[1] / "docs" / "DATASETS.md").read_text(encoding="utf-8")
    section = text.split("## Plotting one head", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) == 5
    # The example reads layer 2, head 5 of example 0 of runs/rt-sentiment-minilm.zarr.
    write_full_store(str(tmp_path / "runs" / "rt-sentiment-minilm.zarr"), layout_variant(layers=3, heads=6, kv_heads=6))
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "head.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------
# named readers: TensorStore opens every array of a v2 store; `string` arrays are named for it


def _tensorstore_read(path: Path) -> np.ndarray:
    """The whole array at `path` (a folder holding its zarr.json), read by TensorStore's zarr3 driver."""
    import tensorstore  # pinned in requirements-test.txt

    opened = tensorstore.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True, read=True
    ).result()
    return opened.read().result()


def test_tensorstore_opens_every_array_of_a_real_v2_store(tmp_path, tiny_bert_folder):
    """A store written by extraction and the efficient stage from a tiny model: TensorStore reads every array with
    the same values as zarr-python, and the texts decoded from its bytes and offsets are the corpus texts."""
    url = build_real_store(
        str(tmp_path / "store.zarr"),
        tiny_bert_folder,
        write_corpus(tmp_path / "reviews.csv"),
        variants=("effective", "simplex"),
    )
    assert portability_problems(url) == [] and reader_problems(url) == []
    group = zarr.open_group(url, mode="r")
    arrays = sorted(path for path, doc in metadata_documents(url).items() if doc["node_type"] == "array")
    assert {"text_bytes", "text_offsets", "attention", "value", "efficient/simplex"} <= set(arrays)
    for path in arrays:
        by_tensorstore = _tensorstore_read(Path(url) / path)
        by_zarr = group[path][...]
        assert by_tensorstore.dtype == by_zarr.dtype, path
        np.testing.assert_array_equal(by_tensorstore, by_zarr, err_msg=path)
    assert group["attention"][...].any() and group["text_bytes"].shape[0] > 100  # real data, not fill values
    data = _tensorstore_read(Path(url) / "text_bytes").tobytes()
    offsets = _tensorstore_read(Path(url) / "text_offsets")
    source_index = _tensorstore_read(Path(url) / "source_index")
    texts = [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
    assert texts == [REVIEW_ROWS[row][0] for row in source_index]
    assert texts == read_texts(open_attention_store(url))


def test_tensorstore_refuses_the_string_array_of_a_v1_store_and_the_check_names_it(tmp_path, tiny_bert_folder):
    """What a v1 store cannot offer, found by the check before any reader fails on it."""
    url = build_v1_store(
        str(tmp_path / "v1.zarr"), tiny_bert_folder, write_corpus(tmp_path / "reviews.csv"), variants=()
    )
    import tensorstore

    with pytest.raises(ValueError, match=re.escape("string data type is not one of the supported data types")):
        _tensorstore_read(Path(url) / "text")
    np.testing.assert_array_equal(_tensorstore_read(Path(url) / "attention"), zarr.open_group(url)["attention"][...])
    assert tensorstore is not None
    problem = (
        "/text: data type 'string' is a registered extension, not core, and TensorStore cannot open it: store "
        "it with core data types (text: UTF-8 bytes in a uint8 array plus int64 offsets)"
    )
    assert reader_problems(url) == [problem]
    assert reader_problems(url, readers=["zarr-python"]) == []
    assert portability_problems(url) == []  # v1 promised registered data types only
    assert portability_problems(url, readers=["TensorStore"]) == [problem]


def test_a_v2_attention_store_with_a_string_array_is_refused(tmp_path):
    url = str(tmp_path / "store.zarr")
    write_full_store(url, LAYOUT)
    group = zarr.open_group(url, mode="r+")
    group.create_array("notes", shape=(2,), dtype=str, fill_value="", dimension_names=("note",))
    assert portability_problems(url) == [
        "/notes: data type 'string' is a registered extension, not core, and TensorStore cannot open it: store it "
        "with core data types (text: UTF-8 bytes in a uint8 array plus int64 offsets)"
    ]


def test_the_string_coordinates_of_results_datasets_are_named_for_tensorstore(tmp_path):
    """Causal and explanation results keep `string` coordinates (labels for xarray): portable by the spec, but not
    for TensorStore; the report names each of them."""
    from storage_schemas.causal_results import create_causal_results

    url = str(tmp_path / "results.zarr")
    interventions = [{"name": "replay", "kind": "replay", "variant": "", "removed_directions": 0}]
    targets = [{"name": "all", "scope": "all", "layer": -1, "head": -1}]
    examples = {"source_index": np.array([1, 0]), "length": np.array([3, 4]), "label": np.array([0, 1])}
    create_causal_results(
        url,
        interventions,
        targets,
        examples,
        shard_size=2,
        metrics={"agreement": "kept"},
        attributes={"model": {"name": "tiny"}},
    )
    assert portability_problems(url) == []
    named = [problem.split(":")[0] for problem in reader_problems(url)]
    assert named == ["/intervention", "/intervention_kind", "/target", "/target_scope", "/variant"]
    assert reader_problems(url, readers=["zarr-python"]) == []


def test_readers_are_named_from_the_table():
    assert set(READER_EXTENSION_DATA_TYPES) == {"zarr-python", "TensorStore"}
    with pytest.raises(
        ValueError, match=re.escape("unknown readers ['zarrita']: choose from ['TensorStore', 'zarr-python']")
    ):
        reader_problems("unused", readers=["zarrita"])
