"""`effattn verify STORE`: read every chunk of a store, shard by shard, and report exactly what is damaged.

Checks, in order:

* schema: `validate_attention_store` (schema name and version, arrays, dims, shapes, dtypes);
* every chunk of every array decodes: each chunk carries a CRC32C checksum (Zarr v3 `crc32c` codec), so flipped
  bytes show up as a checksum failure, located to the array, the shard and the damaged chunks (by example; v1
  stores, chunked by layer too: by example and layer);
* no file is missing for a shard recorded as done (Zarr reads a missing chunk as zeros, silently);
* no NaN or infinite value in a floating-point array;
* the numeric invariants of analysis.store_checks on every completed shard: attention rows sum to 1 over the real
  tokens, are non-negative and zero outside the real block (and never look ahead in a decoder); values are zero
  beyond the length; for every stored efficient variant zero padding and the invariants its record guarantees
  (analysis/variants.py): `A_eff·T ≈ A·T` (T = V_kv(h)·W_O^h; all three), rows that keep A's row sums
  (stochastic, simplex), non-negative entries (simplex); in a store that records `model.key_bands`
  (analysis.key_bands), no attention or efficient weight on a key outside its layer's band.

The result is a `VerificationReport`: a list of `Problem`s (array, shard, kind, detail) and a readable text.
`unmark_damaged_shards` (`effattn verify --repair`) removes the damaged shards from the completion records, so that
rerunning the same `effattn extract` / `effattn efficient` command writes exactly those shards again; a rewritten
extraction shard gets a new identity, so the efficient shards and causal results computed from the old one count as
not done until the stages compute them again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from tqdm.auto import tqdm

from analysis import key_bands, store_checks
from analysis.variants import VARIANTS, variant_record
from storage_schemas.attention_store import (
    AttentionStoreError,
    AttentionStoreLayout,
    AttentionStoreNotFoundError,
    completed_shards,
    store_array_dimensions,
    unmark_shards,
    validate_attention_store,
)
from storage_schemas.efficient_store import (
    DIAGNOSTIC_ARRAYS,
    diagnostic_array_path,
    efficient_array_path,
    efficient_completed_shards,
    unmark_efficient_shards,
)
from storage_schemas.remote import (
    StoreUnreachableError,
    check_store_reachable,
    is_storage_access_error,
    storage_access_problem,
)
from storage_schemas.selection import SelectionError, selection_of_group
from storage_schemas.shard_records import SHARD_IDENTITY_ATTRIBUTES
from storage_schemas.storage_faults import is_corrupt_chunk_error
from storage_schemas.store_lock import hold_store_lock

# Arrays the extraction writes shard by shard (their shard's completion is `completed_shards`).
SHARD_ARRAYS = ("attention", "value", "logits", "logit_ids", "logsumexp")
# Arrays whose every completed shard must exist on disk (never entirely the fill value in a sound store).
NEVER_EMPTY = ("tokens", "length", "attention", "value")
# Arrays read whole, not by shard of examples: the model constants, and the texts (v2: their bytes and offsets do
# not run along the example dimension).
WHOLE_ARRAYS = ("w_out", "out_bias", "text_bytes", "text_offsets")
# How many damaged chunks a problem lists by name.
CHUNKS_NAMED = 8


@dataclass(frozen=True)
class Problem:
    """One damaged thing: `array` (a path in the store, or "" for the store itself), `shard` (None: the whole
    array), `kind` ("schema", "unreadable", "checksum", "missing", "non-finite" or "invariant") and a detail."""

    array: str
    shard: int | None
    kind: str
    detail: str

    def line(self) -> str:
        where = self.array or "store"
        if self.shard is not None:
            where += f", shard {self.shard}"
        return f"{where}: {self.kind}: {self.detail}"


# `effattn verify`'s exit status per report status (2, as for every command: no store, or it cannot be reached).
VERIFY_EXIT_STATUS = {"ok": 0, "damaged": 1, "incomplete": 3}


@dataclass
class VerificationReport:
    url: str
    problems: list[Problem] = field(default_factory=list)
    arrays_checked: list[str] = field(default_factory=list)
    shards_read: int = 0  # (array, shard) pairs decoded
    notes: list[str] = field(default_factory=list)

    unfinished: list[str] = field(default_factory=list)  # shards no stage has finished yet, one line per array

    @property
    def ok(self) -> bool:
        """No damage found (an unfinished store can be ok: see `status`)."""
        return not self.problems

    @property
    def status(self) -> str:
        """ "damaged" (a problem was found), "incomplete" (sound, but shards of the extraction or of an efficient
        variant are not finished: an interrupted run) or "ok"."""
        if self.problems:
            return "damaged"
        return "incomplete" if self.unfinished else "ok"

    @property
    def exit_status(self) -> int:
        """`effattn verify`'s exit status: 0 ok, 1 damaged, 3 incomplete (2: no store, or it cannot be reached)."""
        return VERIFY_EXIT_STATUS[self.status]

    def damaged(self) -> dict[str, list[int | None]]:
        """array -> its damaged shards (None: the whole array), in report order."""
        found: dict[str, list[int | None]] = {}
        for problem in self.problems:
            shards = found.setdefault(problem.array, [])
            if problem.shard not in shards:
                shards.append(problem.shard)
        return found

    def text(self) -> str:
        if self.status == "ok":
            lines = [
                f"{self.url}: OK: {len(self.arrays_checked)} arrays, {self.shards_read} shards read; checksums, "
                "schema and invariants hold"
            ]
        elif self.status == "incomplete":
            lines = [
                f"{self.url}: INCOMPLETE: {len(self.arrays_checked)} arrays, {self.shards_read} shards read; "
                "the finished shards are sound, but a stage has not finished:"
            ]
            lines += [f"  {line}" for line in self.unfinished]
        else:
            places = "; ".join(
                f"{array or 'store'} "
                + (
                    "(whole array)"
                    if shards == [None]
                    else "shards " + ", ".join(str(s) for s in shards if s is not None)
                )
                for array, shards in self.damaged().items()
            )
            count = f"{len(self.problems)} problem" + ("s" if len(self.problems) > 1 else "")
            lines = [f"{self.url}: DAMAGED: {count} in {places}"]
            lines += [f"  {problem.line()}" for problem in self.problems]
            lines += [f"  unfinished: {line}" for line in self.unfinished]
        lines += [f"  note: {note}" for note in self.notes]
        if not self.ok:
            lines.append(f"  what to do: {advice(self)}")
        return "\n".join(lines)


def advice(report: VerificationReport) -> str:
    repairable = {
        problem.array for problem in report.problems if problem.shard is not None and _stage_of(problem.array)
    }
    fatal = sorted({problem.array or "store" for problem in report.problems} - repairable)
    if fatal:
        return (
            f"{', '.join(fatal)} cannot be rewritten shard by shard: extract again into a new store (keep this one "
            "until the new one verifies)"
        )
    return (
        f"run `effattn verify --repair {report.url}` to mark the damaged shards as not done, then run the same "
        "`effattn extract` / `effattn efficient` commands again: they rewrite exactly those shards"
    )


def _stage_of(array: str) -> str | None:
    """'extract' or 'efficient:<variant>' for arrays written shard by shard by a stage, else None."""
    if array in SHARD_ARRAYS:
        return "extract"
    parts = array.split("/")
    if parts[0] == "efficient" and len(parts) == 2:
        return f"efficient:{parts[1]}"
    if parts[0] == "diagnostics" and len(parts) == 3:
        return f"efficient:{parts[1]}"
    return None


# --------------------------------------------------------------------------------------------------------------
# reading


def _shard_regions(layout: AttentionStoreLayout) -> list[slice]:
    return [layout.shard_slice(index) for index in range(layout.n_shards)]


def _damaged_chunks(array: zarr.Array, region: slice) -> tuple[list[str], int]:
    """The chunks of a sharded array's shard that do not decode (all, when the shard index is damaged), named by
    example (and layer, where a chunk holds one layer: schema v1), and how many chunks the shard has."""
    if array.shards is None or array.ndim < 2:
        return [], 0
    layers_per_chunk = array.chunks[1]
    starts = range(0, array.shape[1], layers_per_chunk)
    damaged = []
    for example in range(region.start, region.stop):
        for layer in starts:
            try:
                array[example, layer : layer + layers_per_chunk]
            except Exception:  # noqa: BLE001 - any failure to decode is damage
                if layers_per_chunk >= array.shape[1]:
                    damaged.append(f"example {example}")
                elif layers_per_chunk == 1:
                    damaged.append(f"example {example} layer {layer}")
                else:
                    damaged.append(
                        f"example {example} layers {layer} to {min(layer + layers_per_chunk, array.shape[1]) - 1}"
                    )
    return damaged, (region.stop - region.start) * len(starts)


def _read(array: zarr.Array, name: str, region: slice | None, shard: int | None, report: VerificationReport):
    """The decoded data of `array[region]` (all of it for region None), or None after reporting the failure."""
    try:
        data = array[region] if region is not None else array[...]
    except Exception as error:  # noqa: BLE001 - any failure to decode is damage
        kind = "checksum" if is_corrupt_chunk_error(error) else "unreadable"
        detail = f"{type(error).__name__}: {error}"
        if region is not None:
            chunks, in_shard = _damaged_chunks(array, region)
            if chunks and len(chunks) == in_shard:
                detail = f"none of its {len(chunks)} chunks decodes: the shard's index or file is damaged ({detail})"
            elif chunks:
                named = ", ".join(chunks[:CHUNKS_NAMED]) + (
                    f" and {len(chunks) - CHUNKS_NAMED} more" if len(chunks) > CHUNKS_NAMED else ""
                )
                detail = f"chunks {named} do not decode ({detail})"
        report.problems.append(Problem(name, shard, kind, detail))
        return None
    report.shards_read += 1
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            if region is not None:
                first = (first[0] + region.start, *first[1:])
            report.problems.append(
                Problem(
                    name,
                    shard,
                    "non-finite",
                    f"{int((~finite).sum())} NaN or infinite values, the first at index {first}",
                )
            )
    return data


def _shard_file_missing(url: str, storage_options: dict | None, array: zarr.Array, shard: int) -> bool:
    filesystem, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
    return not filesystem.exists(f"{root.rstrip('/')}/{array.path}/{key}")


def _invariant(
    report: VerificationReport,
    name: str,
    shard: int,
    region: slice,
    what: str,
    values: np.ndarray,
    tolerance: float,
    dims: str = "(example, layer, head)",
) -> None:
    """Report when the worst of `values` [shard example, ...] exceeds `tolerance`."""
    if values.size == 0:
        return
    largest, index = store_checks.worst(values)
    if not largest <= tolerance:
        over = int(np.sum(~(values <= tolerance)))
        place = (index[0] + region.start, *index[1:])
        report.problems.append(
            Problem(
                name,
                shard,
                "invariant",
                f"{what} is {largest:.3g} (tolerance {tolerance:g}) at {dims} {place}, {over} such places in the shard",
            )
        )


# --------------------------------------------------------------------------------------------------------------
# the check


def verify_store(
    url: str,
    storage_options: dict | None = None,
    output_tolerance: float = store_checks.OUTPUT_TOLERANCE,
    run_shards: ShardRunner | None = None,
) -> VerificationReport:
    """Read every chunk of the store at `url` and check schema, checksums, finiteness and invariants.

    The whole arrays and the store's records are read here; the shards (their chunks and checks, most of the work)
    by `run_shards(verify_shards, submissions)` (see ShardRunner; default `run_in_process`, one shard after the
    other): tasks.verification runs them on Dask workers. The report is the same either way.

    Raises `AttentionStoreNotFoundError` when there is no store at all; everything else is a `Problem` of the
    report (the report is complete: one problem does not stop the other checks).
    """
    check_store_reachable(url, storage_options)  # a silent object store: one error after the time limit, no hang
    report = VerificationReport(url)
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except FileNotFoundError:
        raise AttentionStoreNotFoundError(f"there is no store at {url}: nothing to verify") from None
    except Exception as error:  # noqa: BLE001 - an unreadable root is damage, an unreachable store is not
        if is_storage_access_error(error):
            raise StoreUnreachableError(storage_access_problem(url, error)) from None
        report.problems.append(Problem("", None, "unreadable", f"the group metadata does not load: {error}"))
        return report
    try:
        validate_attention_store(group, url)
    except AttentionStoreError as error:
        report.problems.append(Problem("", None, "schema", str(error)))
    except Exception as error:  # noqa: BLE001 - e.g. an array's metadata that does not load
        report.problems.append(Problem("", None, "schema", f"{type(error).__name__}: {error}"))
    try:
        layout = AttentionStoreLayout(**group.attrs["layout"])
    except Exception:  # noqa: BLE001 - already reported by the schema check
        return report

    try:
        selection = selection_of_group(group)
        if not selection.is_everything:
            report.notes.append(
                f"the store holds {selection.describe()}: the layer and head numbers above count "
                "the stored ones (the `selection` attribute maps them to the model's)"
            )
    except SelectionError:
        pass  # reported by the schema check
    context = _store_context(group, layout, report)
    report.arrays_checked = sorted(context.arrays)

    not_done = sorted(set(range(layout.n_shards)) - context.extracted)
    if not_done:
        report.unfinished.append(
            f"extraction shards {not_done} are not completed: run the `effattn extract` command "
            "that created the store again to finish them"
        )
    for variant in context.variants:
        missing = sorted(set(range(layout.n_shards)) - context.variants_done[variant])
        if missing:
            report.unfinished.append(
                f"efficient/{variant} shards {missing} are not completed: run `effattn "
                f"efficient --store {url} --variants {variant}` to finish them"
            )

    submissions = [(shard, (url, storage_options, output_tolerance, shard)) for shard in range(layout.n_shards)]
    findings = (run_shards or run_in_process)(verify_shards, submissions)
    for shard, _ in submissions:  # in shard order, whatever order the shards finished in
        problems, shards_read = findings[shard]
        report.problems += problems
        report.shards_read += shards_read
    return report


# run_shards(function, [(shard, arguments), ...]) -> {shard: function(*arguments)}: how verify_store runs the
# shards' work (in this process, or on workers: tasks.verification).
ShardRunner = Callable[[Callable, Sequence[tuple[int, tuple]]], dict[int, Any]]


def run_in_process(function: Callable, submissions: Sequence[tuple[int, tuple]]) -> dict[int, Any]:
    """The ShardRunner of one process: one shard after the other, with a progress bar on a terminal."""
    return {
        shard: function(*arguments) for shard, arguments in tqdm(submissions, desc="verify", unit="shard", disable=None)
    }


@dataclass
class _StoreContext:
    """What the check of every shard needs from the store as a whole."""

    layout: AttentionStoreLayout
    arrays: dict[str, zarr.Array]  # name -> array, of those that open
    constants: dict[str, np.ndarray | None]  # the WHOLE_ARRAYS, read (None: damaged)
    extracted: set[int]
    variants: list[str]
    variants_done: dict[str, set[int]]
    causal: bool
    bands: Any  # the recorded key bands (analysis.key_bands), or None


def _store_context(
    group: zarr.Group, layout: AttentionStoreLayout, report: VerificationReport, whole: Sequence[str] = WHOLE_ARRAYS
) -> _StoreContext:
    """The context, its problems added to `report`; of the WHOLE_ARRAYS, `whole` are read."""
    arrays = _open_arrays(group, layout, report)
    bands = _stored_key_bands(group, layout, report)
    variants = [variant for variant in VARIANTS if efficient_array_path(variant) in arrays]
    constants = {name: _read(arrays[name], name, None, None, report) for name in whole if name in arrays}
    return _StoreContext(
        layout=layout,
        arrays=arrays,
        constants=constants,
        extracted=set(completed_shards(group)),
        variants=variants,
        variants_done={variant: set(efficient_completed_shards(group, variant)) for variant in variants},
        causal=bool(group.attrs.get("model", {}).get("causal", False)),
        bands=bands,
    )


def verify_shards(
    url: str, storage_options: dict | None, output_tolerance: float, shard: int
) -> tuple[list[Problem], int]:
    """Read and check every finished array of shard `shard` (its chunks, missing files, finiteness, invariants);
    returns its problems and how many (array, shard) pairs were decoded. Opens the store itself, so that it runs in
    any process; what the store as a whole holds is checked (and reported) by verify_store, not here."""
    group = zarr.open_group(url, mode="r", storage_options=storage_options)
    layout = AttentionStoreLayout(**group.attrs["layout"])
    # its problems are verify_store's to report; of the whole arrays only w_out is needed (not the texts)
    context = _store_context(group, layout, VerificationReport(url), whole=("w_out",))
    report = VerificationReport(url)
    region = layout.shard_slice(shard)
    data = {}
    for name, array in context.arrays.items():
        if name in WHOLE_ARRAYS:
            continue  # read whole by verify_store
        stage = _stage_of(name)
        if stage == "extract" and shard not in context.extracted:
            continue  # unfinished work is not damage: a rerun rewrites the whole shard
        if stage and stage != "extract" and shard not in context.variants_done[stage.split(":")[1]]:
            continue
        if name in (*NEVER_EMPTY, *(efficient_array_path(v) for v in context.variants)) and _shard_file_missing(
            url, storage_options, array, shard
        ):
            report.problems.append(
                Problem(name, shard, "missing", "the shard is recorded as done but its file is missing")
            )
            continue
        data[name] = _read(array, name, region, shard, report)
    # what the checks below share, computed once per shard
    if data.get("attention") is not None:
        data["attention row sums"] = store_checks.row_sums(data["attention"])  # [example, layer, head, query]
    w_out = context.constants.get("w_out")
    done = [variant for variant in context.variants if shard in context.variants_done[variant]]
    non_finite = {problem.array for problem in report.problems if problem.kind == "non-finite"}  # found by _read
    inputs_sound = (
        bool(done)
        and all(data.get(name) is not None and name not in non_finite for name in ("attention", "value"))
        and w_out is not None
        and bool(np.isfinite(w_out).all())
    )
    factors = store_checks.output_factors(w_out) if inputs_sound else None  # [layer, head, head_dim, m]
    if shard in context.extracted:
        _check_extracted_shard(report, shard, region, data, layout, context.causal, context.bands)
    for variant in done:
        _check_efficient_shard(
            report, variant, shard, region, data, w_out, context.causal, output_tolerance, context.bands, factors
        )
    return report.problems, report.shards_read


def _open_arrays(group: zarr.Group, layout: AttentionStoreLayout, report: VerificationReport) -> dict:
    """name -> array for every array of the schema and of the efficient stage that opens."""
    names = list(store_array_dimensions(group, layout.task))
    for variant in VARIANTS:
        try:
            present = efficient_array_path(variant) in group
        except Exception:  # noqa: BLE001 - reported when opening below
            present = True
        if present:
            names.append(efficient_array_path(variant))
            names += [diagnostic_array_path(variant, name) for name in DIAGNOSTIC_ARRAYS]
    arrays = {}
    for name in names:
        try:
            arrays[name] = group[name]
        except KeyError:
            continue  # a missing schema array is a schema problem, reported already
        except Exception as error:  # noqa: BLE001 - metadata that does not load
            report.problems.append(Problem(name, None, "unreadable", f"its metadata does not load: {error}"))
    return arrays


def _check_extracted_shard(report, shard, region, data, layout, causal, bands=None) -> None:
    length = data.get("length")
    if length is None:
        return
    attention = data.get("attention")
    tolerance = store_checks.ROW_SUM_TOLERANCE[layout.dtype]
    if attention is not None:
        _invariant(
            report,
            "attention",
            shard,
            region,
            "|row sum - 1| over the real tokens",
            store_checks.row_sum_error_of_sums(data["attention row sums"], length),
            tolerance,
        )
        _invariant(
            report,
            "attention",
            shard,
            region,
            "|entry| outside the real block",
            store_checks.outside_block_magnitude(attention, length),
            0.0,
        )
        _invariant(
            report,
            "attention",
            shard,
            region,
            "the most negative entry (negated)",
            store_checks.most_negative(attention),
            store_checks.NEGATIVE_TOLERANCE,
        )
        if causal:
            _invariant(
                report,
                "attention",
                shard,
                region,
                "|weight| on future keys",
                store_checks.future_magnitude(attention),
                1e-6,
            )
        if bands is not None:
            _invariant(
                report,
                "attention",
                shard,
                region,
                "|weight| on keys outside the layer's key band",
                key_bands.outside_band_magnitude(attention, length, bands),
                1e-6,
            )
    if data.get("value") is not None:
        _invariant(
            report,
            "value",
            shard,
            region,
            "|value| beyond the length",
            store_checks.value_padding_magnitude(data["value"], length),
            0.0,
            dims="(example, layer, kv_head)",
        )


def _stored_key_bands(group: zarr.Group, layout: AttentionStoreLayout, report: VerificationReport):
    """The store's recorded key bands (analysis.key_bands), None when it records none (stores written before them,
    whose efficient attention follows the causal / full rule checked apart) or when they do not read (reported)."""
    model = group.attrs.get("model", {})
    if model.get("key_bands") is None:
        return None
    try:
        return key_bands.store_key_bands(model, selection_of_group(group).layers)
    except (ValueError, TypeError) as error:
        report.problems.append(
            Problem("", None, "schema", f"the root attribute model.key_bands does not read: {error}")
        )
        return None


def _check_efficient_shard(
    report, variant, shard, region, data, w_out, causal, output_tolerance, bands=None, factors=None
) -> None:
    """The invariants of `variant`'s efficient attention in the shard; its relations to the attention only with
    `factors` (store_checks.output_factors of w_out), given when the inputs are sound (else damaged, and reported:
    the relations to them cannot be checked)."""
    name = efficient_array_path(variant)
    efficient, attention, value, length = (data.get(key) for key in (name, "attention", "value", "length"))
    if efficient is None or length is None:
        return
    _invariant(
        report,
        name,
        shard,
        region,
        "|entry| outside the real block",
        store_checks.outside_block_magnitude(efficient, length),
        0.0,
    )
    if causal:
        _invariant(
            report, name, shard, region, "|weight| on future keys", store_checks.future_magnitude(efficient), 1e-6
        )
    if bands is not None:  # no weight on a key the model's mask hid from the query
        _invariant(
            report,
            name,
            shard,
            region,
            "|weight| on keys outside the layer's key band",
            key_bands.outside_band_magnitude(efficient, length, bands),
            1e-6,
        )
    guaranteed = variant_record(variant)  # the invariants this variant guarantees
    if guaranteed.non_negative:
        _invariant(
            report,
            name,
            shard,
            region,
            "the most negative entry (negated)",
            store_checks.most_negative(efficient),
            store_checks.NEGATIVE_TOLERANCE,
        )
    if factors is None:
        return  # the inputs are damaged (reported): the relations to them cannot be checked
    if guaranteed.keeps_row_sums:
        _invariant(
            report,
            name,
            shard,
            region,
            "|row sum - row sum of the attention|",
            store_checks.row_sum_error(efficient, length, data["attention row sums"]),
            1e-4,
        )
    if guaranteed.keeps_output:
        _invariant(
            report,
            name,
            shard,
            region,
            "||(A_eff - A) T|| / ||A T||",
            store_checks.output_residual(efficient, attention, value, w_out, factors, length),
            output_tolerance,
        )


# --------------------------------------------------------------------------------------------------------------
# repair and digests


def unmark_damaged_shards(url: str, report: VerificationReport, storage_options: dict | None = None) -> dict:
    """Remove every damaged shard of `report` from its completion record (extraction: also from every efficient
    variant, whose inputs it is), so that rerunning the stage rewrites it. An extraction shard loses its identity,
    and the rewritten one gets a new one: causal results measured on it become stale, and `effattn causal` measures
    those shards again. Returns {"extract": [...],
    "<variant>": [...]} of the shards unmarked. Arrays that no stage rewrites shard by shard are left alone."""
    # the completion records are the stages' too: not while one of them runs
    with hold_store_lock(url, "verify --repair", storage_options):
        return _unmark_damaged_shards(url, report, storage_options)


def _unmark_damaged_shards(url: str, report: VerificationReport, storage_options: dict | None) -> dict:
    group = zarr.open_group(url, mode="r+", storage_options=storage_options)
    variants = [variant for variant in VARIANTS if efficient_array_path(variant) in group]
    undone: dict[str, set[int]] = {}
    for problem in report.problems:
        stage = _stage_of(problem.array)
        if stage is None or problem.shard is None:
            continue
        if stage == "extract":
            undone.setdefault("extract", set()).add(problem.shard)
            for variant in variants:
                undone.setdefault(variant, set()).add(problem.shard)
        else:
            undone.setdefault(stage.split(":")[1], set()).add(problem.shard)
    for key, shards in undone.items():
        if key == "extract":
            unmark_shards(group, shards)
        else:
            unmark_efficient_shards(group, key, shards)
    return {key: sorted(shards) for key, shards in undone.items()}


# What differs between two runs that write the same data: when and by which run the examples were added.
RUN_FACTS_OF_THE_MOMENT = ("run_id", "flow_run_name", "started", "started_seconds")
ARRAYS_OF_THE_MOMENT = ("added_at",)


def content_digests(
    url: str, storage_options: dict | None = None, ignore_attributes: Iterable[str] = ("created",)
) -> dict[str, str]:
    """sha256 of every array's decoded values (dtype, shape and bytes; text as UTF-8) and of every array's and
    group's attributes (less the root's `ignore_attributes`, and everywhere the shard identities, fresh tokens that
    differ between two runs writing the same data), keyed by path: two stores with equal digests hold the same data,
    whatever their chunk files look like. When and by which run examples were added differ between two runs too:
    the values of `added_at` and the ids and times in the root's `runs` are left out."""
    root = zarr.open_group(url, mode="r", storage_options=storage_options)
    digests = {}
    for path, member in [("", root), *sorted(root.members(max_depth=None), key=lambda item: item[0])]:
        attributes = {
            key: value for key, value in member.attrs.asdict().items() if key not in SHARD_IDENTITY_ATTRIBUTES
        }
        if path == "":
            attributes = {key: value for key, value in attributes.items() if key not in set(ignore_attributes)}
            if "runs" in attributes:
                attributes["runs"] = [
                    {key: value for key, value in run.items() if key not in RUN_FACTS_OF_THE_MOMENT}
                    for run in attributes["runs"]
                ]
        digests[f"{path or '/'}@attributes"] = hashlib.sha256(
            json.dumps(attributes, sort_keys=True, default=str).encode()
        ).hexdigest()
        if isinstance(member, zarr.Array):
            values = member[...] if path not in ARRAYS_OF_THE_MOMENT else np.zeros(member.shape, member.dtype)
            hasher = hashlib.sha256(f"{values.dtype.kind}{values.dtype.itemsize} {values.shape}".encode())
            if values.dtype.kind in ("O", "T", "U"):
                for item in values.ravel():
                    hasher.update(str(item).encode() + b"\0")
            else:
                hasher.update(np.ascontiguousarray(values).tobytes())
            digests[path] = hasher.hexdigest()
    return digests
