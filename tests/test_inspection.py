"""Tests of storage_schemas.inspection: the summary `effattn inspect` prints, on a small hand-made store."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage_schemas.attention_store import (
    AttentionStoreError,
    AttentionStoreLayout,
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    write_example_metadata,
    write_shard,
)
from storage_schemas.inspection import describe_attention_store, size_on_disk

# 5 examples in shards of 3: two shards, of which only the first is written.
LAYOUT = AttentionStoreLayout(
    n_examples=5,
    max_length=6,
    n_classes=3,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=3,
    hidden=5,
    shard_size=3,
    dtype="float16",
)

ATTRIBUTES = {
    "model": {
        "name": "tiny-llama",
        "source": "/models/tiny-llama",
        "architecture": "LlamaForSequenceClassification",
        "family": "llama",
        "causal": True,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 3,
        "hidden": 5,
        "num_labels": 3,
        "weights_digest": "sha256:0123456789abcdef0123456789abcdef",
    },
    "corpus": {
        "name": "reviews.csv",
        "source": "user file reviews.csv (text column 'text', label column 'label')",
        "digest": "sha256:fedcba9876543210fedcba9876543210",
        "split": "all",
        "corpus_size": 12,
        "class_names": ["bad", "good", "meh"],
        "example_count": 5,
    },
    "extraction": {"requested_max_length": 6, "truncated_examples": 2},
    "max_length": 6,
    "dtype": "float16",
    "created": "2026-01-02T03:04:05+00:00",
}


@pytest.fixture()
def store(tmp_path) -> str:
    return make_store(str(tmp_path / "store.zarr"))


def make_store(url: str, schema_version: int = 2) -> str:
    rng = np.random.default_rng(0)
    E, L = LAYOUT.n_examples, LAYOUT.max_length
    group = create_attention_store(url, LAYOUT, ATTRIBUTES, schema_version=schema_version)
    write_example_metadata(
        group,
        tokens=rng.integers(0, 1000, size=(E, L)),
        length=np.array([2, 3, 4, 6, 6]),
        untruncated_length=np.array([2, 3, 4, 8, 9]),
        source_index=np.array([4, 0, 11, 7, 2]),
        label=np.array([0, 1, 2, -1, 0]),
        text=np.array(["a", "b", "c", "d", "e"], dtype=object),
    )
    group["w_out"][:] = rng.standard_normal(group["w_out"].shape)
    mark_prepared(group)
    write_shard(
        group,
        0,
        rng.random((3, 2, 4, L, L)).astype(np.float16),
        rng.random((3, 2, 2, L, 3)).astype(np.float16),
        rng.random((3, 3)).astype(np.float32),
    )
    mark_shard_completed(group, 0)
    return url


def _files_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def test_size_on_disk_is_the_sum_of_file_sizes(store):
    size = size_on_disk(store)
    assert size == _files_size(store)
    assert size > 0


def test_size_on_disk_grows_with_written_shards(store):
    before = size_on_disk(store)
    group = zarr.open_group(store, mode="r+")
    write_shard(
        group,
        1,
        np.ones((2, 2, 4, 6, 6), np.float16),
        np.ones((2, 2, 2, 6, 3), np.float16),
        np.ones((2, 3), np.float32),
    )
    after = size_on_disk(store)
    assert after > before
    assert after == _files_size(store)


def test_describe_names_model_corpus_shards_and_schema(store):
    text = describe_attention_store(store)
    lines = text.splitlines()
    assert lines[0] == f"attention store {store}"
    assert "  schema: effattn.attention_store v2, created 2026-01-02T03:04:05+00:00" in lines
    assert (
        "  model: tiny-llama (LlamaForSequenceClassification, 2 layers x 4 heads, 2 kv heads, head dim 3, "
        "hidden 5, causal)"
    ) in lines
    assert "         weights sha256:0123456789abcdef..." in lines
    assert (
        "  corpus: reviews.csv (user file reviews.csv (text column 'text', label column 'label')), "
        "5 of 12 examples stored, classes ['bad', 'good', 'meh'], digest sha256:fedcba9876543210..."
    ) in lines
    assert "  max length: 6 tokens (2 examples truncated), dtype float16" in lines
    assert "  shards: 1 of 2 completed (3 examples each)" in lines
    assert "  captured: all 2 layers, all 4 heads" in lines  # a store without a selection holds everything


def test_describe_says_which_layers_and_heads_a_store_holds(store):
    import zarr

    group = zarr.open_group(store, mode="r+")
    # the fixture's 2 stored layers x 4 heads x 2 kv heads are model layers 1, 3 of 4 and heads 0-3 of 8 (4 kv)
    group.attrs["selection"] = {
        "layers": [1, 3],
        "heads": [0, 1, 2, 3],
        "kv_heads": [0, 1],
        "model_layers": 4,
        "model_heads": 8,
        "model_kv_heads": 4,
    }
    assert "  captured: 2 of 4 layers (1, 3), 4 of 8 heads (0, 1, 2, 3)" in describe_attention_store(store).splitlines()


def test_describe_names_the_architecture_record_of_newer_stores(store):
    """Stores written with adapter records name the model type, the record and any sliding windows; the fixture's
    store (as written before the records) has no such line."""
    assert not any(line.strip().startswith("type ") for line in describe_attention_store(store).splitlines())
    group = zarr.open_group(store, mode="r+")
    group.attrs["model"] = {
        **ATTRIBUTES["model"],
        "model_type": "mistral",
        "adapter": "llama-decoder",
        "sliding_windows": [4, None],
    }
    assert "         type mistral, adapter llama-decoder, sliding window per layer [4, None]" in (
        describe_attention_store(store).splitlines()
    )
    group.attrs["model"] = {
        **ATTRIBUTES["model"],
        "model_type": "llama",
        "adapter": "llama-decoder",
        "sliding_windows": [None, None],
    }
    assert "         type llama, adapter llama-decoder" in describe_attention_store(store).splitlines()


def test_describe_lists_every_array_with_dims_dtype_chunks_and_shards(store):
    lines = describe_attention_store(store).splitlines()
    arrays = lines[lines.index("  arrays:") + 1 :]
    assert [line.split()[0] for line in arrays] == sorted(
        [
            "tokens",
            "length",
            "untruncated_length",
            "source_index",
            "label",
            "text_bytes",
            "text_offsets",
            "logits",
            "attention",
            "value",
            "w_out",
            "out_bias",
        ]
    )
    by_name = {line.split()[0]: line for line in arrays}
    assert by_name["attention"] == (
        "  attention            (example=5, layer=2, head=4, query=6, key=6) float16 "
        "chunks=(1, 2, 4, 6, 6) shards=(3, 2, 4, 6, 6)"
    )
    assert by_name["value"] == (
        "  value                (example=5, layer=2, kv_head=2, position=6, head_dim=3) float16 "
        "chunks=(1, 2, 2, 6, 3) shards=(3, 2, 2, 6, 3)"
    )
    assert by_name["tokens"] == "  tokens               (example=5, position=6) int32 chunks=(3, 6)"
    assert by_name["length"] == "  length               (example=5) int32 chunks=(3,)"
    assert by_name["logits"] == "  logits               (example=5, class=3) float32 chunks=(3, 3)"
    assert by_name["w_out"] == (
        "  w_out                (layer=2, head=4, head_dim=3, hidden=5) float32 chunks=(2, 4, 3, 5)"
    )
    assert by_name["out_bias"] == "  out_bias             (layer=2, hidden=5) float32 chunks=(2, 5)"
    assert re.fullmatch(r"  text_bytes           \(text_byte=\d+\) uint8 chunks=\(1048576,\)", by_name["text_bytes"])
    assert by_name["text_offsets"] == "  text_offsets         (example_boundary=6) int64 chunks=(3,)"


def test_describe_reports_the_size_on_disk(store):
    text = describe_attention_store(store)
    match = re.search(r"^  size on disk: ([\d.]+) (B|KiB|MiB) \(([\d.]+) (B|KiB|MiB) per example\)$", text, re.M)
    assert match, text
    unit = {"B": 1, "KiB": 1024, "MiB": 1024**2}
    size = _files_size(store)
    assert float(match.group(1)) * unit[match.group(2)] == pytest.approx(size, abs=0.05 * unit[match.group(2)])
    assert float(match.group(3)) * unit[match.group(4)] == pytest.approx(size / 5, abs=0.05 * unit[match.group(4)])


def test_describe_counts_every_completed_shard(store):
    mark_shard_completed(zarr.open_group(store, mode="r+"), 1)
    assert "  shards: 2 of 2 completed (3 examples each)" in describe_attention_store(store).splitlines()


def test_describe_refuses_an_invalid_store(store):
    zarr.open_group(store, mode="r+").attrs["schema_version"] = 99
    with pytest.raises(AttentionStoreError, match=re.escape(f"{store} has attention store schema version 99")):
        describe_attention_store(store)


def test_describe_of_nothing(tmp_path):
    url = str(Path(tmp_path) / "missing.zarr")
    with pytest.raises(FileNotFoundError, match=re.escape(f"there is no attention store at {url}")):
        describe_attention_store(url)


def test_describe_a_v1_store_names_its_version_text_array_and_chunks(tmp_path):
    url = make_store(str(tmp_path / "v1.zarr"), schema_version=1)
    lines = describe_attention_store(url).splitlines()
    assert "  schema: effattn.attention_store v1, created 2026-01-02T03:04:05+00:00" in lines
    by_name = {line.split()[0]: line for line in lines[lines.index("  arrays:") + 1 :]}
    assert "text_bytes" not in by_name and by_name["text"].startswith("  text                 (example=5) ")
    assert by_name["attention"].endswith("chunks=(1, 1, 4, 6, 6) shards=(3, 2, 4, 6, 6)")
