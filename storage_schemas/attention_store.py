"""The attention store, schema v1: a Zarr v3 group holding per-example attention and value tensors.

Layout (DESIGN.md, "The attention store"): every array carries `dimension_names`, so the group opens with plain
`xarray.open_zarr(url, consolidated=False)` or `zarr.open_group(url)` without this project installed.
Examples are stored in length-sorted order (so that a shard pads little); `source_index` maps each stored
example back to its row in the corpus. Big arrays are chunked one example x one layer (all heads) and sharded
by `shard_size` examples: the shard is the unit of work, and every writer writes whole shards only (concurrent
writes into one shard lose data silently in Zarr). Everything beyond an example's `length` is zero.

Extraction completion is recorded in the root attribute `completed_shards`, written only after a shard's data
has been written, by the single driver process; a shard not listed there is treated as absent. With it, the root
attribute `shard_identities` gives every completed shard a fresh random token (its identity), written in the same
metadata update: a shard written again (extract rerun after `effattn verify --repair`) gets a new identity. The stages
that read a shard (efficient attention, causal results) record the identities of the shards they read in their own
`shard_inputs` attribute, and their shard counts as done only while those still match (`shard_is_current`).
Stores written before identities existed have none: their completed shards have the identity `legacy`.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from storage_schemas.remote import is_storage_access_error
from storage_schemas.selection import SelectionError, selection_of_store

# A shard holds hundreds of small chunks (one example x one layer each). zarr-python passes them through its codec
# pipeline one at a time by default (`codec_pipeline.batch_size` 1), and that per-chunk overhead, not Zstandard,
# dominates reading and writing a shard. Batches of 8 chunks read `value` shards about 1.8x faster and `attention`
# shards about 1.3x faster on 2 cores (same bytes, same codecs). The setting is process-wide (every zarr user in the
# process), so importing this module leaves it alone: the entry points (the CLI, the stage flows, the efficient
# stage's Dask tasks) call `use_chunk_codec_batches`.
CHUNK_CODEC_BATCH_SIZE = 8


def use_chunk_codec_batches() -> None:
    """Pass chunks through zarr's codec pipeline CHUNK_CODEC_BATCH_SIZE at a time in this process (faster whole-shard
    reads and writes; the bytes are the same). Only zarr's default changes: a batch size set through
    ZARR_CODEC_PIPELINE__BATCH_SIZE, or to a value other than 1 in zarr.config, is kept. Safe to call repeatedly."""
    if "ZARR_CODEC_PIPELINE__BATCH_SIZE" not in os.environ and zarr.config.get("codec_pipeline.batch_size") == 1:
        zarr.config.set({"codec_pipeline.batch_size": CHUNK_CODEC_BATCH_SIZE})

SCHEMA_NAME = "effattn.attention_store"
SCHEMA_VERSION = 1

ARRAY_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "tokens": ("example", "position"),
    "length": ("example",),
    "untruncated_length": ("example",),
    "source_index": ("example",),
    "label": ("example",),
    "text": ("example",),
    "logits": ("example", "class"),
    "attention": ("example", "layer", "head", "query", "key"),
    "value": ("example", "layer", "kv_head", "position", "head_dim"),
    "w_out": ("layer", "head", "head_dim", "hidden"),
    "out_bias": ("layer", "hidden"),
}

ARRAY_DESCRIPTIONS: dict[str, str] = {
    "tokens": "token ids, right-padded with the tokenizer's pad id beyond `length`",
    "length": "number of real tokens of each example (after truncation to max_length)",
    "untruncated_length": "number of tokens before truncation (greater than `length` when the text was truncated)",
    "source_index": "row of each stored example in the corpus (examples are stored sorted by length)",
    "label": "class id of each example (see attribute class_names), -1 when unknown",
    "text": "the source text",
    "logits": "the unmodified model's output logits (next-token: the top_k largest logits at every position)",
    "logit_ids": "next-token: the vocabulary ids of the top_k logits at every position (largest first)",
    "logsumexp": "next-token: log-sum-exp of all logits at every position (log-probability = logit - logsumexp)",
    "attention": "attention probabilities; zero outside the real [length x length] block",
    "value": "per-head value vectors (bias included), one per kv head; zero beyond `length`",
    "w_out": "each head's slice W_O^h of the attention output projection: output = sum_h A_h V_h W_O^h + out_bias",
    "out_bias": "bias of the attention output projection (zeros when the model has none)",
}

# Next-token stores replace the (example, class) logits by per-position top-k logits.
NEXT_TOKEN_ARRAY_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "logits": ("example", "position", "top_k"),
    "logit_ids": ("example", "position", "top_k"),
    "logsumexp": ("example", "position"),
}
TASKS = ("classification", "next-token")
FLOAT_DTYPES = ("float32", "float16")


def array_dimensions(task: str) -> dict[str, tuple[str, ...]]:
    """Every array of schema v1 for `task` and its dimension names."""
    if task == "classification":
        return dict(ARRAY_DIMENSIONS)
    if task == "next-token":
        return {**ARRAY_DIMENSIONS, **NEXT_TOKEN_ARRAY_DIMENSIONS}
    raise ValueError(f"unknown task {task!r}: choose from {TASKS}")


class AttentionStoreError(ValueError):
    """A store that is not a valid attention store of this schema, or does not match the run using it."""


class AttentionStoreNotFoundError(AttentionStoreError, FileNotFoundError):
    """Nothing exists at the store's URL."""


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
            raise ValueError(f"a next-token store needs 1 <= top_k <= vocabulary size {self.n_classes}, got {self.top_k}")
        if self.task == "classification" and self.top_k != 0:
            raise ValueError(f"top_k is for next-token stores only; a classification store has top_k 0, got {self.top_k}")
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

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], tuple[int, ...] | None]]:
        """name -> (shape, dtype, chunks, shards or None)."""
        E, L, S = self.n_examples, self.max_length, self.shard_size
        if self.task == "next-token":
            K = self.top_k
            predictions = {
                "logits": ((E, L, K), "float32", (S, L, K), None),
                "logit_ids": ((E, L, K), "int32", (S, L, K), None),
                "logsumexp": ((E, L), "float32", (S, L), None),
            }
        else:
            predictions = {"logits": ((E, self.n_classes), "float32", (S, self.n_classes), None)}
        return {
            "tokens": ((E, L), "int32", (S, L), None),
            "length": ((E,), "int32", (S,), None),
            "untruncated_length": ((E,), "int32", (S,), None),
            "source_index": ((E,), "int64", (S,), None),
            "label": ((E,), "int64", (S,), None),
            "text": ((E,), "string", (S,), None),
            **predictions,
            "attention": (
                (E, self.layers, self.heads, L, L),
                self.dtype,
                (1, 1, self.heads, L, L),
                (S, self.layers, self.heads, L, L),
            ),
            "value": (
                (E, self.layers, self.kv_heads, L, self.head_dim),
                self.dtype,
                (1, 1, self.kv_heads, L, self.head_dim),
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
) -> zarr.Group:
    """Create an empty attention store at `url` (an error if anything exists there).

    `attributes` are provenance (model, tokenizer, corpus, ...) written as root attributes beside the schema name
    and version, the layout and an empty `completed_shards` list.
    """
    group = zarr.open_group(url, mode="w-", zarr_format=3, storage_options=storage_options)
    return _fill_new_store(group, layout, attributes)


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


def _fill_new_store(group: zarr.Group, layout: AttentionStoreLayout, attributes: dict[str, Any]) -> zarr.Group:
    dimensions = array_dimensions(layout.task)
    for name, (shape, dtype, chunks, shards) in layout.array_specs().items():
        group.create_array(
            name,
            shape=shape,
            dtype=str if dtype == "string" else dtype,
            chunks=chunks if chunks is not None else shape,
            shards=shards,
            compressors=_compressors(),
            fill_value="" if dtype == "string" else 0,
            dimension_names=dimensions[name],
            attributes={"description": ARRAY_DESCRIPTIONS[name]},
        )
    group.attrs.update(
        {
            **attributes,
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
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
    except Exception as error:  # noqa: BLE001 - any unreadable thing at the URL is "something else"
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


def validate_attention_store(group: zarr.Group, url: str) -> None:
    """Check schema name and version, the presence, dims, shapes and dtypes of every array of schema v1."""
    attributes = group.attrs.asdict()
    schema = attributes.get("schema")
    if schema != SCHEMA_NAME:
        raise AttentionStoreError(
            f"{url} is not an effattn attention store (its 'schema' attribute is {schema!r}, "
            f"expected {SCHEMA_NAME!r}): point --store at a store written by `effattn extract`"
        )
    version = attributes.get("schema_version")
    if version != SCHEMA_VERSION:
        raise AttentionStoreError(
            f"{url} has attention store schema version {version!r}, but this effattn reads version "
            f"{SCHEMA_VERSION}: extract again into a new store, or use the effattn release that wrote it"
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
    dimensions = array_dimensions(layout.task)
    missing = [name for name in dimensions if name not in present]
    if missing:
        raise AttentionStoreError(
            f"{url} is missing the arrays {missing}: the store is incomplete or damaged; "
            "extract again into a new store"
        )
    for name, (shape, dtype, _, _) in layout.array_specs().items():
        array = group[name]
        dims = tuple(array.metadata.dimension_names or ())
        if dims != dimensions[name]:
            raise AttentionStoreError(
                f"{url}: array '{name}' has dimensions {dims}, but schema v1 expects {dimensions[name]}"
            )
        if tuple(array.shape) != shape:
            raise AttentionStoreError(
                f"{url}: array '{name}' has shape {tuple(array.shape)}, but the store's layout implies {shape}"
            )
        stored_dtype = "string" if array.dtype.kind in ("O", "T", "U") else str(array.dtype)
        if stored_dtype != dtype:
            raise AttentionStoreError(f"{url}: array '{name}' has dtype {stored_dtype}, but schema v1 expects {dtype}")


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


# --------------------------------------------------------------------------------------------------------------
# completion records and shard identities, shared by every store whose writers work shard by shard: an attribute
# set (of a group or an array) holding `completed_shards`, `shard_identities` and, for a stage that reads shards of
# another stage, `shard_inputs`.

LEGACY_SHARD_IDENTITY = "legacy"  # the identity of a shard completed by an effattn that recorded none
# Attributes that differ between two runs writing the same data (fresh tokens): content digests leave them out.
SHARD_IDENTITY_ATTRIBUTES = ("shard_identities", "shard_inputs")


def recorded_identities(attributes: dict[str, Any]) -> dict[int, str]:
    """Every shard of `attributes["completed_shards"]` -> its identity (`legacy` when none is recorded)."""
    tokens = attributes.get("shard_identities") or {}
    return {int(shard): tokens.get(str(int(shard)), LEGACY_SHARD_IDENTITY)
            for shard in attributes.get("completed_shards", [])}


def recorded_inputs(attributes: dict[str, Any], shard_index: int, keys: list[str]) -> dict[str, str]:
    """The identities of the inputs a completed shard was computed from, input name -> identity; a shard completed
    before inputs were recorded was computed from `legacy` inputs (`keys` names them)."""
    inputs = (attributes.get("shard_inputs") or {}).get(str(int(shard_index)))
    return dict(inputs) if inputs is not None else {key: LEGACY_SHARD_IDENTITY for key in keys}


def shard_is_current(recorded: dict[str, str], current: dict[str, str | None]) -> bool:
    """Whether a shard computed from the inputs `recorded` (name -> identity) is still valid now that the inputs'
    identities are `current` (None: that input shard is not complete)."""
    return all(current.get(name) is not None and current.get(name) == identity for name, identity in recorded.items())


def completion_update(attributes: dict[str, Any], shard_index: int,
                      inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The attribute values that record `shard_index` as completed with a fresh identity (and, for a consuming
    stage, the identities of its `inputs`); write them in one update, so that no completed shard lacks them."""
    shard = int(shard_index)
    update: dict[str, Any] = {
        "completed_shards": sorted({*map(int, attributes.get("completed_shards", [])), shard}),
        "shard_identities": {**(attributes.get("shard_identities") or {}), str(shard): uuid.uuid4().hex},
    }
    if inputs is not None:
        update["shard_inputs"] = {**(attributes.get("shard_inputs") or {}), str(shard): dict(inputs)}
    return update


def removal_update(attributes: dict[str, Any], shards) -> dict[str, Any]:
    """The attribute values that record `shards` as not completed (their identities and inputs forgotten)."""
    gone = {int(shard) for shard in shards}
    update: dict[str, Any] = {
        "completed_shards": sorted(set(map(int, attributes.get("completed_shards", []))) - gone),
        "shard_identities": {key: value for key, value in (attributes.get("shard_identities") or {}).items()
                             if int(key) not in gone},
    }
    if "shard_inputs" in attributes:
        update["shard_inputs"] = {key: value for key, value in (attributes.get("shard_inputs") or {}).items()
                                  if int(key) not in gone}
    return update


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
    named = str(shards) if len(shards) <= SHARDS_NAMED else \
        f"[{', '.join(map(str, shards[:SHARDS_NAMED]))}, ... and {len(shards) - SHARDS_NAMED} more]"
    return f"shard{'s' if len(shards) > 1 else ''} {named} (example{'s' if several else ''} {examples})"


class IncompleteInputError(AttentionStoreError):
    """A stage was asked to read shards that their producer has not recorded as complete (or that were written
    again since the stage computed from them)."""


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
    return (f"finish them by running the `effattn extract --corpus {corpus} --model {model} --store {url} ...` command "
            "that created the store again, with the same options (it resumes and writes only the missing shards)")


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
    text: np.ndarray,
) -> None:
    """Write the per-example arrays that are known before any model runs (all examples at once).

    tokens: [example, position] int; length, untruncated_length, source_index, label: [example]; text: [example] str.
    """
    group["tokens"][:] = tokens.astype(np.int32)
    group["length"][:] = length.astype(np.int32)
    group["untruncated_length"][:] = untruncated_length.astype(np.int32)
    group["source_index"][:] = source_index.astype(np.int64)
    group["label"][:] = label.astype(np.int64)
    group["text"][:] = np.asarray(text, dtype=object).astype(str)


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
    `StoreFullError` / `StoreNotWritableError` (storage_schemas.storage_faults).
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
    # imported here: storage_faults builds on this module's AttentionStoreError
    from storage_schemas.storage_faults import (
        discard_shard_files,
        storage_errors_explained,
        store_location,
        sync_shard_files,
    )

    with storage_errors_explained(store_location(group)):
        if shard_index not in completed_shards(group):  # a leftover of an interrupted or damaged write
            discard_shard_files(group, [name for name, _ in arrays], shard_index)
        for name, array in arrays:
            group[name][region] = array
        sync_shard_files(group, [name for name, _ in arrays], shard_index)  # durable before it can be marked done
