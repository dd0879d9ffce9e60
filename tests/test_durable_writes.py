"""storage_schemas/durable_writes.py: a shard's files are found along the array's `example` dim wherever it lies,
synced, discarded alone, and a whole-shard write deletes a damaged leftover first and explains a store it cannot
write."""

from __future__ import annotations

import errno
import re

import numpy as np
import pytest
import zarr

import storage_schemas.durable_writes
from storage_schemas.durable_writes import discard_shard_files, shard_file_paths, store_location, write_whole_shard
from storage_schemas.errors import StoreFullError, StoreNotWritableError


def results_like_group(url: str) -> zarr.Group:
    """Two arrays chunked by shards of 2 examples out of 5: `example` last in one, alone in the other."""
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.create_array(
        "score", shape=(3, 5), dtype="float32", chunks=(3, 2), fill_value=np.nan, dimension_names=("item", "example")
    )
    group.create_array("count", shape=(5,), dtype="int32", chunks=(2,), fill_value=-1, dimension_names=("example",))
    return group


def test_the_files_of_a_shard_are_found_along_the_example_dim_and_discarded_alone(tmp_path):
    group = results_like_group(str(tmp_path / "r.zarr"))
    for shard, region in ((0, slice(0, 2)), (1, slice(2, 4))):
        write_whole_shard(
            group,
            shard,
            [("score", (slice(None), region), np.ones((3, 2))), ("count", region, np.ones(2))],
            recorded_done=False,
        )
    paths = shard_file_paths(group, ["score", "count"], 1)
    assert [path.relative_to(tmp_path / "r.zarr").as_posix() for path in paths] == ["score/c/0/1", "count/c/1"]
    assert shard_file_paths(group, ["score"], 2) == []  # never written
    discard_shard_files(group, ["score", "count"], 1)
    assert shard_file_paths(group, ["score", "count"], 1) == []
    assert len(shard_file_paths(group, ["score", "count"], 0)) == 2
    assert np.isnan(group["score"][:, 2:4]).all() and (group["count"][0:2] == 1).all()
    assert store_location(group) == str(tmp_path / "r.zarr")


def test_a_damaged_leftover_of_an_unrecorded_shard_is_deleted_before_the_shard_is_written_again(tmp_path):
    from storage_schemas.attention_store import ZARR_DEFAULT_CODEC_PIPELINE

    # zarr's own pipeline merges a write into the shard file already there (the reason for the discard)
    with zarr.config.set({"codec_pipeline.path": ZARR_DEFAULT_CODEC_PIPELINE}):
        rewrite_a_damaged_shard(tmp_path)


def rewrite_a_damaged_shard(tmp_path) -> None:
    from storage_schemas.attention_store import _compressors

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    # sharded as the stores' big arrays are
    group.create_array(
        "a",
        shape=(5, 3),
        dtype="float32",
        chunks=(1, 3),
        shards=(2, 3),
        fill_value=0,
        compressors=_compressors(),
        dimension_names=("example", "x"),
    )
    write_whole_shard(group, 1, [("a", slice(2, 4), np.ones((2, 3)))], recorded_done=False)
    (path,) = shard_file_paths(group, ["a"], 1)
    damaged = path.read_bytes()[:-7] + b"damaged"
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match="checksum"):  # a shard recorded done keeps its files: the merge fails
        write_whole_shard(group, 1, [("a", slice(2, 4), np.full((2, 3), 2.0))], recorded_done=True)
    path.write_bytes(damaged)
    write_whole_shard(group, 1, [("a", slice(2, 4), np.full((2, 3), 2.0))], recorded_done=False)
    assert (group["a"][2:4] == 2).all() and (group["a"][:2] == 0).all()


def test_every_file_and_folder_of_the_shard_is_synced(tmp_path, monkeypatch):
    group = results_like_group(str(tmp_path / "r.zarr"))
    synced = []
    real_open = storage_schemas.durable_writes.os.open
    monkeypatch.setattr(
        storage_schemas.durable_writes.os,
        "open",
        lambda path, flags: synced.append(str(path)) or real_open(path, flags),
    )
    write_whole_shard(
        group,
        0,
        [("score", (slice(None), slice(0, 2)), np.ones((3, 2))), ("count", slice(0, 2), np.ones(2))],
        recorded_done=False,
    )
    root = tmp_path / "r.zarr"
    assert sorted(synced) == sorted(
        map(str, [root / "score/c/0/0", root / "count/c/0", root / "score/c/0", root / "count/c"])
    )


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (errno.ENOSPC, StoreFullError, "no space left while writing {url} (No space left on device): free space"),
        (errno.EACCES, StoreNotWritableError, "cannot write to {url} (Permission denied): choose a store location"),
    ],
)
def test_a_store_that_cannot_be_written_is_explained(tmp_path, monkeypatch, code, error, message):
    import os

    group = results_like_group(str(tmp_path / "r.zarr"))

    def failing(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage_schemas.durable_writes.os, "fsync", failing)
    with pytest.raises(error, match=re.escape(message.format(url=tmp_path / "r.zarr"))):
        write_whole_shard(group, 0, [("count", slice(0, 2), np.ones(2))], recorded_done=False)
