"""Durable whole-shard writes, shared by every writer (the attention store's extraction, the efficient store, the
causal and explanation results).

A shard is the unit of work: a writer writes every array of one shard in one go (`write_whole_shard`), and only
after that has returned is the shard recorded as done (storage_schemas.shard_records). The write

* first deletes what an interrupted or damaged earlier write of the same shard left (`discard_shard_files`), since
  Zarr merges a partial write into the file already there and a damaged leftover would make every rewrite fail;
* then makes the shard's files durable (`sync_shard_files`: fsync of each file and of its folder), so that a power
  cut after the shard is recorded cannot lose it;
* and turns a full disk or a store this process may not write into `StoreFullError` / `StoreNotWritableError`,
  whose messages say what happened and what to do (storage_schemas.storage_faults).

An array's shard is the chunk (or Zarr shard) holding the shard's examples along its `example` dimension; every
other dimension is held whole by one chunk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from storage_schemas.storage_faults import storage_errors_explained


def _shard_chunk_key(array: zarr.Array, shard_index: int) -> str:
    """The store key of the chunk (or Zarr shard) of `array` holding shard `shard_index` along `example` (the first
    dimension when the array names none)."""
    dims = tuple(array.metadata.dimension_names or ())
    axis = dims.index("example") if "example" in dims else 0
    coordinates = tuple(shard_index if i == axis else 0 for i in range(array.ndim))
    return f"{array.path}/{array.metadata.encode_chunk_key(coordinates)}"


def shard_file_paths(group: zarr.Group, array_paths: Sequence[str], shard_index: int) -> list[Path]:
    """The files holding shard `shard_index` of each array (arrays chunked or sharded by the shard size along
    `example`), for a store on the local disk; [] for other stores. Files not written (all fill value) are left
    out."""
    store = group.store
    if not isinstance(store, LocalStore):
        return []
    paths = []
    for name in array_paths:
        path = Path(store.root) / _shard_chunk_key(group[name], shard_index)
        if path.is_file():
            paths.append(path)
    return paths


def sync_shard_files(group: zarr.Group, array_paths: Sequence[str], shard_index: int) -> None:
    """Make the shard files of a just-written shard durable (fsync of each file and of its folder, so that the
    rename that put it in place survives a power cut too). Object stores need nothing: a finished upload is durable.
    Call before recording the shard as done."""
    folders = set()
    for path in shard_file_paths(group, array_paths, shard_index):
        _fsync_path(path, os.O_RDONLY)
        folders.add(path.parent)
    for folder in folders:
        _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_path(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def store_location(group: zarr.Group) -> str:
    """Where the store of `group` is, for messages: a local folder, or protocol://path."""
    store = group.store
    if isinstance(store, LocalStore):
        return str(store.root)
    path, filesystem = getattr(store, "path", None), getattr(store, "fs", None)
    protocol = getattr(filesystem, "protocol", None)
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{path}" if path and protocol else str(store)


def discard_shard_files(group: zarr.Group, array_paths: Sequence[str], shard_index: int) -> None:
    """Delete the files of shard `shard_index` of each array, before a writer writes that whole shard again.

    Zarr merges a shard write into the shard already on disk (it reads the old file first), so a damaged leftover
    of an interrupted or corrupted shard would make every rewrite fail. Call only for shards not recorded as done.
    """
    from zarr.core.sync import sync  # zarr's own bridge from sync code to its async store API

    for name in array_paths:
        sync(group.store.delete(_shard_chunk_key(group[name], shard_index)))


def write_whole_shard(
    group: zarr.Group, shard_index: int, writes: Sequence[tuple[str, Any, np.ndarray]], recorded_done: bool
) -> None:
    """Write one whole shard durably: `writes` are (array path, the shard's region of that array, values), every
    array of the shard. Leftovers of an earlier write are deleted first unless the shard is `recorded_done` (a
    shard rewritten in place, e.g. by a repair, keeps its files until overwritten). When this returns the shard's
    files are on disk; a full disk or a store this process may not write raises `StoreFullError` /
    `StoreNotWritableError` (nothing recorded changes, and the shard is written again by the next run)."""
    paths = [path for path, _, _ in writes]
    with storage_errors_explained(store_location(group)):
        if not recorded_done:  # a leftover of an interrupted or damaged write
            discard_shard_files(group, paths, shard_index)
        for path, region, values in writes:
            group[path][region] = values
        sync_shard_files(group, paths, shard_index)  # durable before the driver can record it done
