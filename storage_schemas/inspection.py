"""A readable summary of a store: what `effattn inspect` prints."""

from __future__ import annotations

import fsspec
import zarr

from analysis.variants import VARIANTS
from storage_schemas.attention_store import completed_shards, open_attention_store, store_layout
from storage_schemas.efficient_store import efficient_array_path, efficient_completed_shards
from storage_schemas.selection import selection_of_group


def size_on_disk(url: str, storage_options: dict | None = None) -> int:
    """Bytes under `url` (local path or fsspec URL, e.g. s3://bucket/store.zarr), as listed now.

    `storage_options` go to the fsspec filesystem (by default: its configuration from the environment, see
    storage_schemas.remote). The filesystem's cached listings are dropped first, all of them (dropping `path`'s
    alone keeps those of its sub-folders): object-store filesystems cache directory listings, and objects written
    since (by zarr, through another filesystem instance) would be missed or fail to be found.
    """
    filesystem, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    filesystem.invalidate_cache()
    return int(filesystem.du(path, total=True))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _array_line(name: str, array: zarr.Array) -> str:
    dims = ", ".join(f"{dim}={size}" for dim, size in zip(array.metadata.dimension_names, array.shape))
    shards = f" shards={tuple(array.shards)}" if array.shards is not None else ""
    return f"  {name:<20} ({dims}) {array.dtype} chunks={tuple(array.chunks)}{shards}"


def _architecture_lines(model: dict) -> list[str]:
    """The model type and adapter record (analysis/architectures.py) and any sliding windows; stores written before
    the adapter records have none of these."""
    if "adapter" not in model:
        return []
    windows = model.get("sliding_windows") or []
    line = f"         type {model['model_type']}, adapter {model['adapter']}"
    if any(window is not None for window in windows):
        line += f", sliding window per layer {windows}"
    return [line]


def describe_attention_store(url: str, storage_options: dict | None = None) -> str:
    """Model, corpus, examples, shapes, dtypes, chunks/shards, size on disk, completed shards, schema version.

    `url`: a local path or an fsspec URL (s3://...); `storage_options` go to its fsspec filesystem.
    """
    group = open_attention_store(url, mode="r", storage_options=storage_options)
    attributes = group.attrs.asdict()
    layout = store_layout(group)
    model, corpus = attributes["model"], attributes["corpus"]
    done = completed_shards(group)
    size = size_on_disk(url, storage_options)
    lines = [
        f"attention store {url}",
        f"  schema: {attributes['schema']} v{attributes['schema_version']}, created {attributes.get('created')}",
        f"  model: {model['name']} ({model['architecture']}, {model['layers']} layers x {model['heads']} heads, "
        f"{model['kv_heads']} kv heads, head dim {model['head_dim']}, hidden {model['hidden']}, "
        f"{'causal' if model['causal'] else 'bidirectional'})",
        *_architecture_lines(model),
        f"         weights {model['weights_digest'][:23]}...",
        f"  captured: {selection_of_group(group).describe()}",
        f"  corpus: {corpus['name']} ({corpus['source']}), {corpus['example_count']} of {corpus['corpus_size']} "
        f"examples stored, classes {corpus['class_names']}, digest {corpus['digest'][:23]}...",
        f"  max length: {attributes['max_length']} tokens "
        f"({attributes['extraction']['truncated_examples']} examples truncated), dtype {attributes['dtype']}",
        f"  task: {layout.task}"
        + (f" (top {layout.top_k} logits kept per position)" if layout.task == "next-token" else ""),
        f"  shards: {len(done)} of {layout.n_shards} completed ({layout.shard_size} examples each)",
        f"  size on disk: {_human_bytes(size)} ({_human_bytes(size / max(layout.n_examples, 1))} per example)",
        "  arrays:",
    ]
    lines += [_array_line(name, group[name]) for name in sorted(group.array_keys())]
    variants = [variant for variant in VARIANTS if efficient_array_path(variant) in group]
    if variants:
        lines.append("  efficient attention:")
    for variant in variants:
        array = group[efficient_array_path(variant)]
        lines.append(
            f"    {variant:<11} {len(efficient_completed_shards(group, variant))} of {layout.n_shards} shards "
            f"completed, settings {array.attrs.get('settings')}"
        )
        lines.append(_array_line(f"  efficient/{variant}", array))
    return "\n".join(lines)
