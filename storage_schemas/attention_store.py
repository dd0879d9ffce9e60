"""The attention store, schema v2: a Zarr v3 group holding per-example attention and value tensors.

Layout (DESIGN.md, "The attention store"): every array carries `dimension_names`, so the group opens with plain
`xarray.open_zarr(url, consolidated=False)` or `zarr.open_group(url)` without this project installed.
Examples are stored in length-sorted order (so that a shard pads little); `source_index` maps each stored
example back to its row in the corpus. Big arrays are chunked one example x all layers (all heads) and sharded
by `shard_size` examples: the shard is the unit of work, and every writer writes whole shards only (concurrent
writes into one shard lose data silently in Zarr). Everything beyond an example's `length` is zero. Texts are UTF-8
bytes in the uint8 array `text_bytes`, example i's between `text_offsets[i]` and `text_offsets[i + 1]` (`read_texts`):
only core data types, so that every Zarr v3 reader (TensorStore included) opens every array.

Schema v1 stores (written before v2) stay readable: their `attention` and `value` chunks are one example x one
layer, and their texts are one `string` array `text` (a registered extension TensorStore does not read). A v1
store being extracted again keeps its v1 layout (the arrays exist already). Code outside this module asks the
functions here (`read_texts`, `readable_by_every_reader`) instead of looking at the version.

Extraction completion is recorded in the root attribute `completed_shards`, written only after a shard's data
has been written, by the single driver process; a shard not listed there is treated as absent. With it, the root
attribute `shard_identities` gives every completed shard a fresh random token (its identity), written in the same
metadata update: a shard written again (extract rerun after `effattn verify --repair`) gets a new identity. The stages
that read a shard (efficient attention, causal results) record the identities of the shards they read in their own
`shard_inputs` attribute, and their shard counts as done only while those still match (`storage_schemas.shard_records).
Stores written before identities existed have none: their completed shards have the identity `legacy`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from analysis.example_identities import IDENTITY_BYTES, identity_digests
from storage_schemas.durable_writes import write_whole_shard
from storage_schemas.errors import AttentionStoreError, AttentionStoreNotFoundError, IncompleteInputError
from storage_schemas.remote import is_storage_access_error
from storage_schemas.selection import SelectionError, selection_of_store
from storage_schemas.shard_records import completion_update, recorded_identities, removal_update

# A shard holds hundreds of small chunks (one example x one layer each); per-chunk overhead in zarr-python's codec
# pipeline, not Zstandard, dominates reading and writing a shard (benchmarks/store_codecs.py measures the options).
# These settings are process-wide (every zarr user in the process), so importing this module leaves them alone: the
# entry points (the CLI, the stage flows, the efficient stage's Dask tasks) call `use_fast_codec_pipeline`.
CHUNK_CODEC_BATCH_SIZE = 8
ZARR_DEFAULT_CODEC_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
FAST_CODEC_PIPELINE = "storage_schemas.zarrs_pipeline.ChecksumValidatingZarrsPipeline"
_warned_no_zarrs = False


def use_fast_codec_pipeline() -> None:
    """Read and write chunks through the `zarrs` (Rust) codec pipeline in this process, and pass chunks through
    zarr's own pipeline CHUNK_CODEC_BATCH_SIZE at a time wherever zarr's pipeline still runs (stores zarrs cannot
    open, such as fsspec's S3, fall back to it per array). The bytes written are the same. Only zarr's defaults
    change: a pipeline or batch size set through ZARR_CODEC_PIPELINE__PATH / ZARR_CODEC_PIPELINE__BATCH_SIZE, or to
    another value in zarr.config, is kept. Without zarrs installed, zarr's pipeline stays (warned once). Safe to call
    repeatedly."""
    global _warned_no_zarrs
    if "ZARR_CODEC_PIPELINE__BATCH_SIZE" not in os.environ and zarr.config.get("codec_pipeline.batch_size") == 1:
        zarr.config.set({"codec_pipeline.batch_size": CHUNK_CODEC_BATCH_SIZE})
    if (
        "ZARR_CODEC_PIPELINE__PATH" in os.environ
        or zarr.config.get("codec_pipeline.path") != ZARR_DEFAULT_CODEC_PIPELINE
    ):
        return
    try:
        import storage_schemas.zarrs_pipeline  # noqa: F401 - imports zarrs
    except ImportError as error:
        if not _warned_no_zarrs:
            _warned_no_zarrs = True
            warnings.warn(
                f"zarrs cannot be imported ({error}): stores are read and written with zarr's slower "
                "codec pipeline. Install zarrs (see requirements.txt) for the fast one",
                stacklevel=2,
            )
        return
    zarr.config.set({"codec_pipeline.path": FAST_CODEC_PIPELINE})


SCHEMA_NAME = "effattn.attention_store"
SCHEMA_VERSION = 3  # what new stores are written as
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
# Schema v3 adds what a store that grows needs: each example's identity and the run that added it.
GROWTH_ARRAYS = ("example_identity", "added_by_run", "added_at")
# Root attribute present while examples are being appended (storage_schemas.attention_store.begin_append).
APPEND_ATTRIBUTE = "append_in_progress"
# How a store chose its corpus rows (attribute corpus.selection.method): a seeded permutation of the whole corpus
# (bundled corpora, and every store written before stores could grow), or a keyed hash of each example's identity
# (user files and folders: growth never moves an earlier example; analysis.splits.stable_split_indices).
PERMUTATION_SELECTION = "permutation"
KEYED_SELECTION = "keyed-hash"

# Texts of schema v2: bytes in chunks of 1 MiB (a text is read with one or two chunks; the whole corpus with few).
TEXT_BYTES_CHUNK = 2**20

ARRAY_DIMENSIONS: dict[str, tuple[str, ...]] = {
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
    "example_identity": ("example", "identity_byte"),
    "added_by_run": ("example",),
    "added_at": ("example",),
}

ARRAY_DESCRIPTIONS: dict[str, str] = {
    "tokens": "token ids, right-padded with the tokenizer's pad id beyond `length`",
    "length": "number of real tokens of each example (after truncation to max_length)",
    "untruncated_length": "number of tokens before truncation (greater than `length` when the text was truncated)",
    "source_index": "row of each stored example in the corpus (examples are stored sorted by length)",
    "label": "class id of each example (see attribute class_names), -1 when unknown",
    "text": "the source text (schema v1)",
    "text_bytes": "the source texts, UTF-8 encoded, one after another: example i's text is "
    "text_bytes[text_offsets[i]:text_offsets[i + 1]].decode('utf-8')",
    "text_offsets": "where each example's text starts in text_bytes (example i: text_offsets[i] to "
    "text_offsets[i + 1]); the last entry is the length of text_bytes",
    "logits": "the unmodified model's output logits (next-token: the top_k largest logits at every position)",
    "logit_ids": "next-token: the vocabulary ids of the top_k logits at every position (largest first)",
    "logsumexp": "next-token: log-sum-exp of all logits at every position (log-probability = logit - logsumexp)",
    "attention": "attention probabilities; zero outside the real [length x length] block",
    "value": "per-head value vectors (bias included), one per kv head; zero beyond `length`",
    "w_out": "each head's slice W_O^h of the attention output projection: output = sum_h A_h V_h W_O^h + out_bias",
    "out_bias": "bias of the attention output projection (zeros when the model has none)",
    "example_identity": "the example's identity: the first 16 bytes of sha256 over its text and label name "
    "(analysis.example_identities); a rerun over a grown corpus extracts only identities the store lacks",
    "added_by_run": "which run added the example: an index into the root attribute `runs` (run id, time, counts)",
    "added_at": "when the run that added the example started (UTC)",
}
# Attributes an array carries besides its description: `added_at` decodes to datetime64 in xarray (CF units).
ARRAY_ATTRIBUTES: dict[str, dict[str, str]] = {
    "added_at": {"units": "seconds since 1970-01-01 00:00:00", "calendar": "proleptic_gregorian"},
}

# Next-token stores replace the (example, class) logits by per-position top-k logits.
NEXT_TOKEN_ARRAY_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "logits": ("example", "position", "top_k"),
    "logit_ids": ("example", "position", "top_k"),
    "logsumexp": ("example", "position"),
}
TASKS = ("classification", "next-token")
FLOAT_DTYPES = ("float32", "float16")


# Schema v1 held the texts in one `string` array instead of text_bytes + text_offsets.
V1_TEXT_ARRAY_DIMENSIONS: dict[str, tuple[str, ...]] = {"text": ("example",)}
V2_TEXT_ARRAYS = ("text_bytes", "text_offsets")


def _check_version(schema_version: int) -> None:
    if schema_version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"attention store schema version must be one of {READABLE_SCHEMA_VERSIONS}, got {schema_version!r}"
        )


def array_dimensions(task: str, schema_version: int = SCHEMA_VERSION) -> dict[str, tuple[str, ...]]:
    """Every array of schema `schema_version` for `task` and its dimension names."""
    _check_version(schema_version)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {TASKS}")
    dimensions = dict(ARRAY_DIMENSIONS)
    if schema_version < 3:
        dimensions = {name: dims for name, dims in dimensions.items() if name not in GROWTH_ARRAYS}
    if schema_version == 1:
        dimensions = {}
        for name, dims in ARRAY_DIMENSIONS.items():
            if name == "text_bytes":
                dimensions.update(V1_TEXT_ARRAY_DIMENSIONS)
            elif name != "text_offsets" and name not in GROWTH_ARRAYS:
                dimensions[name] = dims
    if task == "next-token":
        dimensions.update(NEXT_TOKEN_ARRAY_DIMENSIONS)
    return dimensions


@dataclass(frozen=True)
class AttentionStoreLayout:
    """Every size that fixes the shapes of an attention store."""

    n_examples: int
    max_length: int  # size of position / query / key
    n_classes: int  # classes of the classifier, or the vocabulary size for next-token
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    shard_size: int  # examples per shard (the unit of work)
    dtype: str  # storage dtype of attention and value: "float32" or "float16"
    task: str = "classification"  # or "next-token": logits per position, top_k of them
    top_k: int = 0  # next-token: logits kept per position (0 for classification)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name not in ("dtype", "task", "top_k") and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"layout field {name} must be a positive integer, got {value!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "next-token" and not 1 <= self.top_k <= self.n_classes:
            raise ValueError(
                f"a next-token store needs 1 <= top_k <= vocabulary size {self.n_classes}, got {self.top_k}"
            )
        if self.task == "classification" and self.top_k != 0:
            raise ValueError(
                f"top_k is for next-token stores only; a classification store has top_k 0, got {self.top_k}"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_examples / self.shard_size)

    def shard_slice(self, shard_index: int) -> slice:
        """The examples of shard `shard_index` (the last shard may be shorter)."""
        if not 0 <= shard_index < self.n_shards:
            raise IndexError(f"shard {shard_index} does not exist: the store has shards 0..{self.n_shards - 1}")
        start = shard_index * self.shard_size
        return slice(start, min(start + self.shard_size, self.n_examples))

    def array_specs(
        self, schema_version: int = SCHEMA_VERSION
    ) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...] | None, tuple[int, ...] | None]]:
        """name -> (shape, dtype, chunks (None: one chunk), shards or None) of every array of schema
        `schema_version`. `text_bytes` (v2) is created empty: its length, the texts' total bytes, is known only
        when they are written (`write_example_metadata`)."""
        _check_version(schema_version)
        E, L, S = self.n_examples, self.max_length, self.shard_size
        layers_per_chunk = 1 if schema_version == 1 else self.layers
        if schema_version == 1:
            texts = {"text": ((E,), "string", (S,), None)}
        else:
            texts = {
                "text_bytes": ((0,), "uint8", (TEXT_BYTES_CHUNK,), None),
                "text_offsets": ((E + 1,), "int64", (S,), None),
            }
        if self.task == "next-token":
            K = self.top_k
            predictions = {
                "logits": ((E, L, K), "float32", (S, L, K), None),
                "logit_ids": ((E, L, K), "int32", (S, L, K), None),
                "logsumexp": ((E, L), "float32", (S, L), None),
            }
        else:
            predictions = {"logits": ((E, self.n_classes), "float32", (S, self.n_classes), None)}
        growth = (
            {}
            if schema_version < 3
            else {
                "example_identity": ((E, IDENTITY_BYTES), "uint8", (S, IDENTITY_BYTES), None),
                "added_by_run": ((E,), "int32", (S,), None),
                "added_at": ((E,), "int64", (S,), None),
            }
        )
        return {
            "tokens": ((E, L), "int32", (S, L), None),
            "length": ((E,), "int32", (S,), None),
            "untruncated_length": ((E,), "int32", (S,), None),
            "source_index": ((E,), "int64", (S,), None),
            "label": ((E,), "int64", (S,), None),
            **texts,
            **growth,
            **predictions,
            "attention": (
                (E, self.layers, self.heads, L, L),
                self.dtype,
                (1, layers_per_chunk, self.heads, L, L),
                (S, self.layers, self.heads, L, L),
            ),
            "value": (
                (E, self.layers, self.kv_heads, L, self.head_dim),
                self.dtype,
                (1, layers_per_chunk, self.kv_heads, L, self.head_dim),
                (S, self.layers, self.kv_heads, L, self.head_dim),
            ),
            "w_out": ((self.layers, self.heads, self.head_dim, self.hidden), "float32", None, None),
            "out_bias": ((self.layers, self.hidden), "float32", None, None),
        }


def default_shard_size(max_length: int, layers: int, heads: int, dtype: str, budget_bytes: int = 256 * 2**20) -> int:
    """The largest power of two <= 64 whose shard of attention fits in `budget_bytes` (at least 1)."""
    bytes_per_example = layers * heads * max_length * max_length * np.dtype(dtype).itemsize
    shard_size = 64
    while shard_size > 1 and shard_size * bytes_per_example > budget_bytes:
        shard_size //= 2
    return shard_size


def _compressors() -> list:
    """Zstandard plus a CRC32C checksum per chunk: both in the Zarr v3 core codec set."""
    return [ZstdCodec(level=1), Crc32cCodec()]


def create_attention_store(
    url: str,
    layout: AttentionStoreLayout,
    attributes: dict[str, Any],
    storage_options: dict | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> zarr.Group:
    """Create an empty attention store at `url` (an error if anything exists there).

    `attributes` are provenance (model, tokenizer, corpus, ...) written as root attributes beside the schema name
    and version, the layout and an empty `completed_shards` list. `schema_version` 1 writes the earlier layout
    (for compatibility tests; effattn writes new stores as SCHEMA_VERSION).
    """
    _check_version(schema_version)
    group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options)
    return _fill_new_store(group, layout, attributes, schema_version)


def recreate_unprepared_store(
    url: str, layout: AttentionStoreLayout, attributes: dict[str, Any], storage_options: dict | None = None
) -> zarr.Group:
    """Replace a store whose creation never finished (no shard can be in it) by a new empty one.

    Refuses anything at `url` that is not such a store, so that nothing of value is overwritten.
    """
    state = attention_store_state(url, storage_options)
    if state != "unprepared":
        raise AttentionStoreError(f"refusing to overwrite {url}: it is {state}, not an unfinished attention store")
    group = zarr.open_group(url, mode="w", zarr_format=3, storage_options=storage_options)
    return _fill_new_store(group, layout, attributes)


def _fill_new_store(
    group: zarr.Group, layout: AttentionStoreLayout, attributes: dict[str, Any], schema_version: int = SCHEMA_VERSION
) -> zarr.Group:
    dimensions = array_dimensions(layout.task, schema_version)
    for name, (shape, dtype, chunks, shards) in layout.array_specs(schema_version).items():
        group.create_array(
            name,
            shape=shape,
            dtype=str if dtype == "string" else dtype,
            chunks=chunks if chunks is not None else shape,
            shards=shards,
            compressors=_compressors(),
            fill_value="" if dtype == "string" else 0,
            dimension_names=dimensions[name],
            attributes={"description": ARRAY_DESCRIPTIONS[name], **ARRAY_ATTRIBUTES.get(name, {})},
        )
    group.attrs.update(
        {
            **attributes,
            "schema": SCHEMA_NAME,
            "schema_version": schema_version,
            "layout": asdict(layout),
            "completed_shards": [],
            "prepared": False,
        }
    )
    return group


def attention_store_state(url: str, storage_options: dict | None = None) -> str:
    """'absent', 'unprepared' (created, but its per-example arrays were never completely written),
    'prepared', or 'something else' (a path or group that is not an effattn attention store)."""
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except FileNotFoundError:
        # No Zarr group there, but a file or a folder of files is not "absent": creating a store would fail
        # (or mix with someone's files), so the caller must refuse it like any other foreign thing.
        return "something else" if _holds_files(url, storage_options) else "absent"
    except Exception as error:
        if is_storage_access_error(error):
            raise  # an unreachable or forbidden store is not "something else": say so instead of refusing it
        return "something else"
    if group.attrs.get("schema") != SCHEMA_NAME:
        return "something else"
    return "prepared" if group.attrs.get("prepared") else "unprepared"


def _holds_files(url: str, storage_options: dict | None = None) -> bool:
    """Whether anything is at `url`: a file, or a folder (prefix) that is not empty."""
    filesystem, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not filesystem.exists(path):
        return False
    return not filesystem.isdir(path) or bool(filesystem.ls(path, detail=False))


def mark_prepared(group: zarr.Group) -> None:
    """Record that the per-example arrays and model constants are written; shards may be extracted now."""
    group.attrs["prepared"] = True


def open_attention_store(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """Open and validate an attention store; `AttentionStoreError` says what is wrong and what to do."""
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options)
    except FileNotFoundError:
        raise AttentionStoreNotFoundError(
            f"there is no attention store at {url}: create one with `effattn extract --store {url} ...`"
        ) from None
    validate_attention_store(group, url)
    return group


def store_layout(group: zarr.Group) -> AttentionStoreLayout:
    return AttentionStoreLayout(**group.attrs["layout"])


def store_schema_version(group: zarr.Group) -> int:
    """The schema version of a validated store (1 or 2)."""
    return int(group.attrs["schema_version"])


def store_array_dimensions(group: zarr.Group, task: str) -> dict[str, tuple[str, ...]]:
    """Every array of the schema version the store at `group` records, for `task`, and its dimension names; the
    current version's when the store records no readable version (a damaged store: checked against the newest)."""
    version = group.attrs.get("schema_version")
    return array_dimensions(task, version if version in READABLE_SCHEMA_VERSIONS else SCHEMA_VERSION)


def readable_by_every_reader(group: zarr.Group) -> bool:
    """Whether this store's schema keeps to the Zarr v3 core data types, so that every reader opens every array
    (v2; a v1 store's `text` is a `string` array, which TensorStore does not open)."""
    return store_schema_version(group) >= 2


def validate_attention_store(group: zarr.Group, url: str) -> None:
    """Check schema name and version, the presence, dims, shapes and dtypes of every array of the store's schema
    version (READABLE_SCHEMA_VERSIONS), and the chunks and shards of `attention` and `value`."""
    attributes = group.attrs.asdict()
    schema = attributes.get("schema")
    if schema != SCHEMA_NAME:
        raise AttentionStoreError(
            f"{url} is not an effattn attention store (its 'schema' attribute is {schema!r}, "
            f"expected {SCHEMA_NAME!r}): point --store at a store written by `effattn extract`"
        )
    version = attributes.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
        raise AttentionStoreError(
            f"{url} has attention store schema version {version!r}, but this effattn reads versions "
            f"{list(READABLE_SCHEMA_VERSIONS)}: extract again into a new store, or use the effattn release that "
            "wrote it"
        )
    if APPEND_ATTRIBUTE in attributes:
        pending = attributes[APPEND_ATTRIBUTE]
        raise AttentionStoreError(
            f"{url}: an append of examples {pending.get('first_example')} to {pending.get('n_examples', 0) - 1} was "
            "interrupted before it was recorded: run the same `effattn run` / `effattn extract` command again to "
            f"finish it (the {pending.get('first_example')} examples stored before are intact)"
        )
    if not attributes.get("prepared"):
        raise AttentionStoreError(
            f"{url} was never completely created (its extraction stopped before the token arrays were written): "
            "run the same `effattn extract` command again to finish it"
        )
    try:
        layout = AttentionStoreLayout(**attributes["layout"])
    except (KeyError, TypeError, ValueError) as error:
        raise AttentionStoreError(
            f"{url} has a missing or malformed 'layout' attribute ({error}): the store is damaged; "
            "extract again into a new store"
        ) from None
    try:  # the stored layers and heads must be the ones the `selection` attribute names
        selection_of_store(attributes, layout.layers, layout.heads, layout.kv_heads)
    except SelectionError as error:
        raise AttentionStoreError(f"{url}: {error}") from None
    present = set(group.array_keys())
    dimensions = array_dimensions(layout.task, version)
    missing = [name for name in dimensions if name not in present]
    if missing:
        raise AttentionStoreError(
            f"{url} is missing the arrays {missing}: the store is incomplete or damaged; extract again into a new store"
        )
    for name, (shape, dtype, chunks, shards) in layout.array_specs(version).items():
        array = group[name]
        dims = tuple(array.metadata.dimension_names or ())
        if dims != dimensions[name]:
            raise AttentionStoreError(
                f"{url}: array '{name}' has dimensions {dims}, but schema v{version} expects {dimensions[name]}"
            )
        if name == "text_bytes":
            shape = (int(group["text_offsets"][-1]),)  # the texts' total bytes
        if tuple(array.shape) != shape:
            raise AttentionStoreError(
                f"{url}: array '{name}' has shape {tuple(array.shape)}, but the store's layout implies {shape}"
            )
        stored_dtype = "string" if array.dtype.kind in ("O", "T", "U") else str(array.dtype)
        if stored_dtype != dtype:
            raise AttentionStoreError(
                f"{url}: array '{name}' has dtype {stored_dtype}, but schema v{version} expects {dtype}"
            )
        if name in ("attention", "value") and (tuple(array.chunks), array.shards) != (chunks, shards):
            raise AttentionStoreError(
                f"{url}: array '{name}' has chunks {tuple(array.chunks)} and shards {array.shards}, but schema "
                f"v{version} expects chunks {chunks} and shards {shards}: the store is damaged or was written by "
                "another program; extract again into a new store"
            )


def check_same_run(group: zarr.Group, url: str, expected: dict[str, Any]) -> None:
    """Refuse to resume into a store written by a different run.

    `expected` maps dotted attribute paths (e.g. "model.weights_digest") to the values of this run; every
    difference is named in the error.
    """
    attributes = group.attrs.asdict()
    differences = []
    for path, value in expected.items():
        stored: Any = attributes
        for part in path.split("."):
            stored = stored.get(part) if isinstance(stored, dict) else None
        if stored != value:
            differences.append(f"{path}: store has {stored!r}, this run has {value!r}")
    if differences:
        raise AttentionStoreError(
            f"{url} was written by a different run ({'; '.join(differences)}): use another --store, "
            f"or delete {url} to start over"
        )


SHARDS_NAMED = 16  # how many shards a message lists by number


def describe_shards(shards, layout: AttentionStoreLayout) -> str:
    """'shards [2, 3] (examples 4 to 7)': the shards and their examples, runs of neighbours joined."""
    shards = sorted(int(shard) for shard in shards)
    runs: list[list[int]] = []
    for shard in shards:
        if runs and shard == runs[-1][-1] + 1:
            runs[-1].append(shard)
        else:
            runs.append([shard])
    spans = [(layout.shard_slice(run[0]).start, layout.shard_slice(run[-1]).stop - 1) for run in runs]
    examples = ", ".join(f"{first} to {last}" if last > first else f"{first}" for first, last in spans)
    several = len(spans) > 1 or spans[0][1] > spans[0][0]
    named = (
        str(shards)
        if len(shards) <= SHARDS_NAMED
        else f"[{', '.join(map(str, shards[:SHARDS_NAMED]))}, ... and {len(shards) - SHARDS_NAMED} more]"
    )
    return f"shard{'s' if len(shards) > 1 else ''} {named} (example{'s' if several else ''} {examples})"


def completed_shards(group: zarr.Group) -> list[int]:
    return sorted(group.attrs.get("completed_shards", []))


def extraction_identities(group: zarr.Group) -> dict[int, str]:
    """Every completed extraction shard -> its identity (`legacy` for stores written without identities)."""
    return recorded_identities(group.attrs.asdict())


def mark_shard_completed(group: zarr.Group, shard_index: int) -> None:
    """Record a shard as done, with a fresh identity. Call only after its data is written, and only from one
    process (the driver)."""
    store_layout(group).shard_slice(shard_index)  # an IndexError for a shard that does not exist
    group.attrs.update(completion_update(group.attrs.asdict(), shard_index))


def unmark_shards(group: zarr.Group, shards) -> None:
    """Record extraction `shards` as not done (their identities are forgotten: what was computed from them is no
    longer current, and the rewritten shards get new identities)."""
    group.attrs.update(removal_update(group.attrs.asdict(), shards))


def extract_again_advice(group: zarr.Group, url: str) -> str:
    """How to complete an unfinished extraction: the command that created the store, again."""
    attributes = group.attrs.asdict()
    corpus = attributes.get("corpus", {}).get("name", "CORPUS")
    model = attributes.get("model", {}).get("name", "MODEL")
    return (
        f"finish them by running the `effattn extract --corpus {corpus} --model {model} --store {url} ...` command "
        "that created the store again, with the same options (it resumes and writes only the missing shards)"
    )


def require_extracted(group: zarr.Group, url: str, stage: str) -> None:
    """Refuse (`IncompleteInputError`) to run `stage` over a store whose extraction is not complete: its unfinished
    shards read as zeros, and anything computed from them would be silently wrong."""
    layout = store_layout(group)
    missing = sorted(set(range(layout.n_shards)) - set(completed_shards(group)))
    if missing:
        raise IncompleteInputError(
            f"{url}: extraction {describe_shards(missing, layout)} {'is' if len(missing) == 1 else 'are'} not "
            "complete (unwritten shards read as zeros), so "
            f"`effattn {stage}` cannot run on this store yet: {extract_again_advice(group, url)}; then run "
            f"`effattn {stage}` again"
        )


def write_example_metadata(
    group: zarr.Group,
    tokens: np.ndarray,
    length: np.ndarray,
    untruncated_length: np.ndarray,
    source_index: np.ndarray,
    label: np.ndarray,
    text,
    start: int = 0,
    run: int = 0,
    added_at: int | None = None,
) -> None:
    """Write the per-example arrays that are known before any model runs, for examples `start` onwards (all of
    them at creation; the appended ones when a store grows), in the layout of the store's schema version (v2:
    `text_bytes` + `text_offsets`; v1: the `string` array `text`; v3 adds each example's identity, computed from its
    text and its label's name in the store's class names, and the run that added it: `run` indexes the root
    attribute `runs`, `added_at` is that run's start in seconds since 1970 UTC, default now).

    tokens: [example, position] int; length, untruncated_length, source_index, label: [example]; text: [example] str.
    """
    region = slice(start, start + len(length))
    group["tokens"][region] = tokens.astype(np.int32)
    group["length"][region] = length.astype(np.int32)
    group["untruncated_length"][region] = untruncated_length.astype(np.int32)
    group["source_index"][region] = source_index.astype(np.int64)
    group["label"][region] = label.astype(np.int64)
    texts = [str(item) for item in text]
    if "text" in group.array_keys():  # a v1 store
        group["text"][region] = np.asarray(texts, dtype=object).astype(str)
        return
    if "example_identity" in group.array_keys():
        group["example_identity"][region] = identity_digests(texts, label_names(group, label))
        group["added_by_run"][region] = np.full(len(texts), run, dtype=np.int32)
        when = int(datetime.now(UTC).timestamp()) if added_at is None else int(added_at)
        group["added_at"][region] = np.full(len(texts), when, dtype=np.int64)
    encoded, offsets = encode_texts(texts)
    if start + len(offsets) > group["text_offsets"].shape[0]:
        raise ValueError(
            f"{len(offsets) - 1} texts from example {start} for a store of "
            f"{group['text_offsets'].shape[0] - 1} examples"
        )
    first_byte = int(group["text_offsets"][start]) if start else 0
    group["text_bytes"].resize((first_byte + len(encoded),))
    if len(encoded):
        group["text_bytes"][first_byte:] = encoded
    group["text_offsets"][start : start + len(offsets)] = offsets + first_byte


def label_names(group: zarr.Group, label: np.ndarray) -> list[str | None]:
    """The class names of `label` (class ids, -1 unknown: None) in the store's `corpus.class_names`; an id beyond
    them (a store written without class names) is named by its number."""
    names = list(group.attrs.get("corpus", {}).get("class_names", []))
    return [None if int(item) < 0 else names[int(item)] if int(item) < len(names) else str(int(item)) for item in label]


def stored_identities(group: zarr.Group) -> np.ndarray | None:
    """`uint8 [example, IDENTITY_BYTES]` identities of the stored examples (those the layout records), or None for a
    store written before identities (schema v1 and v2: it cannot grow)."""
    if "example_identity" not in group.array_keys():
        return None
    return np.asarray(group["example_identity"][: store_layout(group).n_examples])


def store_grows(store_attributes: dict[str, Any]) -> bool:
    """Whether the store of these root attributes appends what its corpus adds: it is of schema v3 (it holds its
    examples' identities), chose its rows by the keyed split and records the runs that added its examples. Its
    corpus digest and example count change as it grows; its first run's id names it."""
    selection = store_attributes.get("corpus", {}).get("selection", {})
    schema_version = store_attributes.get("schema_version")
    return (
        isinstance(schema_version, int)
        and schema_version >= 3
        and selection.get("method") == KEYED_SELECTION
        and bool(store_attributes.get("runs"))
    )


def store_runs(group: zarr.Group) -> list[dict[str, Any]]:
    """The runs that wrote the store's examples, in order (root attribute `runs`; `added_by_run` indexes it)."""
    return list(group.attrs.get("runs", []))


def example_dimension_arrays(group: zarr.Group) -> list[str]:
    """Every array of the store (the efficient attention's included) whose first dimension is `example`."""
    names = []
    for path, array in group.arrays():
        if tuple(array.metadata.dimension_names or ())[:1] == ("example",):
            names.append(path)
    for subgroup_name, subgroup in group.groups():
        names += [f"{subgroup_name}/{name}" for name in example_dimension_arrays(subgroup)]
    return names


def open_store_to_append(url: str, storage_options: dict | None = None) -> zarr.Group:
    """Open a prepared store for growth, also when an earlier append was interrupted (validation would refuse it:
    its arrays may already have the new length while its layout has the old one)."""
    group = zarr.open_group(url, mode="r+", zarr_format=3, storage_options=storage_options)
    pending = group.attrs.get(APPEND_ATTRIBUTE)
    if pending is None:
        validate_attention_store(group, url)
    return group


def begin_append(group: zarr.Group, n_examples: int) -> None:
    """Start growing the store to `n_examples` examples: record the append (so that readers are told, and a rerun
    finishes it), then resize every array along `example` (the efficient attention's too). The layout, the
    completed shards and the runs change only in `commit_append`: until then the store's examples are the old ones.
    """
    layout = store_layout(group)
    if n_examples <= layout.n_examples:
        raise ValueError(f"an append grows the store: {n_examples} examples is not more than {layout.n_examples}")
    group.attrs[APPEND_ATTRIBUTE] = {"first_example": layout.n_examples, "n_examples": int(n_examples)}
    for name in example_dimension_arrays(group):
        array = group[name]
        array.resize((int(n_examples), *array.shape[1:]))
    group["text_offsets"].resize((int(n_examples) + 1,))


def abandon_append(group: zarr.Group) -> None:
    """Undo an interrupted append that no longer has examples to add (the corpus lost them meanwhile): the arrays
    get the recorded example count back, and the record of the append goes."""
    layout = store_layout(group)
    for name in example_dimension_arrays(group):
        array = group[name]
        array.resize((layout.n_examples, *array.shape[1:]))
    group["text_offsets"].resize((layout.n_examples + 1,))
    group["text_bytes"].resize((int(group["text_offsets"][layout.n_examples]),))
    attributes = group.attrs.asdict()
    group.attrs.put({key: value for key, value in attributes.items() if key != APPEND_ATTRIBUTE})


def commit_append(group: zarr.Group, n_examples: int, run: dict[str, Any], corpus: dict[str, Any]) -> list[int]:
    """Record an append in one metadata write: the layout's new example count, the run (appended to `runs`), the
    corpus facts (`corpus`: keys of the `corpus` attribute to update) and, when the old last shard was partial, that
    shard as not extracted (it is extracted again with its new examples; what was computed from it goes stale).
    Returns the shards to extract: the old partial one, if any, and the new ones."""
    attributes = group.attrs.asdict()
    pending = attributes.get(APPEND_ATTRIBUTE) or {}
    if pending.get("n_examples") != n_examples:
        raise ValueError(f"commit_append of {n_examples} examples, but the append in progress is {pending}")
    old = AttentionStoreLayout(**attributes["layout"])
    new = AttentionStoreLayout(**{**attributes["layout"], "n_examples": int(n_examples)})
    first_new_shard = old.n_shards if old.n_examples % old.shard_size == 0 else old.n_shards - 1
    redone = list(range(first_new_shard, old.n_shards))
    update = {
        "layout": asdict(new),
        **removal_update(attributes, redone),
        "runs": [*attributes.get("runs", []), run],
        "corpus": {**attributes.get("corpus", {}), **corpus},
    }
    group.attrs.put({**{key: value for key, value in attributes.items() if key != APPEND_ATTRIBUTE}, **update})
    return list(range(first_new_shard, new.n_shards))


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (UTF-8 bytes of all of them one after another [total bytes] uint8, offsets [texts + 1] int64)."""
    pieces = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(piece) for piece in pieces], out=offsets[1:])
    return np.frombuffer(b"".join(pieces), dtype=np.uint8), offsets


def read_texts(group: zarr.Group, indices=None) -> list[str]:
    """The source texts of the stored examples `indices` (a sequence of ints, negative ones counting from the end, a
    slice, or None for all), in that order, from a store of any readable schema version."""
    v1 = "text" in group.array_keys()  # a v1 store: one `string` array
    n = group["text"].shape[0] if v1 else group["text_offsets"].shape[0] - 1
    wanted = (
        np.arange(n)[indices if indices is not None else slice(None)]
        if indices is None or isinstance(indices, slice)
        else np.asarray(indices, dtype=np.int64).reshape(-1)
    )
    if not wanted.size:
        return []
    if wanted.min() < -n or wanted.max() >= n:
        raise IndexError(f"example indices must be in 0..{n - 1}, got {wanted.tolist()}")
    wanted = wanted % n
    if v1:
        return [str(item) for item in group["text"].get_orthogonal_selection(wanted)]
    # only the offsets' chunks that hold these examples (a page of a large corpus reads one or two of them)
    bounds = np.unique(np.concatenate([wanted, wanted + 1]))
    offsets = np.asarray(group["text_offsets"].get_orthogonal_selection(bounds), dtype=np.int64)
    starts, stops = offsets[np.searchsorted(bounds, wanted)], offsets[np.searchsorted(bounds, wanted + 1)]
    first, last = int(starts.min()), int(stops.max())
    needed = int((stops - starts).sum())
    data = group["text_bytes"]
    if last - first <= 4 * needed + TEXT_BYTES_CHUNK:  # one read of the span costs little more than the texts
        span = data[first:last].tobytes()
        return [span[start - first : stop - first].decode("utf-8") for start, stop in zip(starts, stops)]
    return [data[int(start) : int(stop)].tobytes().decode("utf-8") for start, stop in zip(starts, stops)]


def write_shard(
    group: zarr.Group,
    shard_index: int,
    attention: np.ndarray,
    value: np.ndarray,
    logits: np.ndarray,
    logit_ids: np.ndarray | None = None,
    logsumexp: np.ndarray | None = None,
) -> None:
    """Write the model outputs of one whole shard.

    attention: [shard examples, layer, head, query, key]; value: [shard examples, layer, kv_head, position,
    head_dim]; logits: [shard examples, class], or for next-token [shard examples, position, top_k] with
    logit_ids [shard examples, position, top_k] and logsumexp [shard examples, position].
    When this returns, the shard's files are on disk; a full disk or a store this process may not write raises
    `StoreFullError` / `StoreNotWritableError` (storage_schemas.durable_writes).
    """
    layout = store_layout(group)
    region = layout.shard_slice(shard_index)
    n = region.stop - region.start
    arrays = [("attention", attention), ("value", value), ("logits", logits)]
    if layout.task == "next-token":
        if logit_ids is None or logsumexp is None:
            raise ValueError(f"shard {shard_index}: a next-token store needs logit_ids and logsumexp too")
        arrays += [("logit_ids", logit_ids), ("logsumexp", logsumexp)]
    for name, array in arrays:  # check every shape before writing anything
        expected = (n, *group[name].shape[1:])
        if array.shape != expected:
            raise ValueError(f"shard {shard_index}: '{name}' has shape {array.shape}, expected {expected}")
    write_whole_shard(
        group,
        shard_index,
        [(name, region, array) for name, array in arrays],
        recorded_done=shard_index in completed_shards(group),
    )
