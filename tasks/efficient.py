"""The efficient stage's work: functions run on Dask workers, and the stage's declaration (`efficient_stage`, run
by tasks.stages.run_stage).

A shard is one Dask task (`compute_efficient_shard`): it reads the shard's attention, values and lengths from the
store, computes the requested variants with analysis.efficient_attention and writes whole shards of
`efficient/<variant>` and `diagnostics/<variant>/*` (writes are whole shards only: concurrent writes into one shard
lose data in Zarr). A shard with the simplex variant, whose cost grows steeply with the length, is split: one task
per layer (`compute_efficient_piece`) and one that joins them and writes (`write_efficient_pieces`). The driver
(this process) records completion as writes finish, so a rerun skips finished shards. Workers open the store by
its URL: they can run anywhere that can reach it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.efficient_attention import EfficientAttentionResult, efficient_attention
from analysis.key_bands import store_key_bands
from analysis.variants import ITERATIVE, variant_record
from storage_schemas.attention_store import (
    AttentionStoreError,
    open_attention_store,
    require_extracted,
    store_layout,
    use_fast_codec_pipeline,
)
from storage_schemas.efficient_store import (
    efficient_completed_shards,
    forget_stale_efficient_shards,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
    write_efficient_shard,
)
from storage_schemas.selection import selection_of_group
from storage_schemas.storage_faults import DEFAULT_RETRY_DELAYS, is_corrupt_chunk_error, retry_transient_io
from tasks.dask_cluster import prepare_worker_process, record_shard_futures
from tasks.stages import ShardJob, Stage, StageRun, log_retry

logger = logging.getLogger(__name__)


def _read_piece_inputs(group, store: str, shard_index: int, region: slice, layers: slice) -> tuple:
    """attention [shard examples, layer, head, query, key], value, w_out, length of one shard's chosen layers.
    A chunk that fails its checksum is reported by array and shard, with the command that locates the damage."""
    selections = {"attention": (region, layers), "value": (region, layers), "w_out": layers, "length": region}
    read = []
    for name, selection in selections.items():
        try:
            read.append(group[name][selection])
        except Exception as error:  # only a damaged chunk is reported here; anything else passes unchanged
            if not is_corrupt_chunk_error(error):
                raise
            raise AttentionStoreError(
                f"{store}: array {name}, shard {shard_index} (examples {region.start} to {region.stop - 1}) is "
                f"damaged (a chunk fails its checksum): run `effattn verify {store}` to find every damaged shard, "
                f"then `effattn verify --repair {store}` and the stage that wrote it again"
            ) from None
    return tuple(read)


def compute_efficient_piece(
    store: str,
    shard_index: int,
    layers: tuple[int, int] | None,
    variants: Sequence[str],
    settings: dict,
    torch_threads: int = 1,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
) -> dict[str, EfficientAttentionResult]:
    """Compute `variants` for layers [start, stop) of one shard (all layers when `layers` is None). Runs on a
    worker; writes nothing. Returns {variant: EfficientAttentionResult} with efficient
    [shard examples, piece layers, head, query, key] float32 and diagnostics [shard examples, piece layers, head].

    Reads are retried after `retry_delays` seconds on transient I/O errors only (a flaky disk or network);
    anything else (a damaged store, bad numbers) fails at once. Dask's own `retries` would retry every exception,
    so the selection happens here.
    """
    group, layout, region = _open_shard(store, shard_index, torch_threads, retry_delays)
    first, stop = layers if layers is not None else (0, layout.layers)
    if not 0 <= first < stop <= layout.layers:
        raise ValueError(f"layers ({first}, {stop}) must satisfy 0 <= start < stop <= {layout.layers}")
    inputs = retry_transient_io(
        _read_piece_inputs,
        group,
        store,
        shard_index,
        region,
        slice(first, stop),
        delays=retry_delays,
        on_retry=log_retry,
    )
    return _compute_piece(group, store, shard_index, (first, stop), inputs, variants, settings)


def _open_shard(store: str, shard_index: int, torch_threads: int, retry_delays: Sequence[float]) -> tuple:
    """(group, layout, the shard's examples), with this worker process set up for computing."""
    import torch

    torch.set_num_threads(torch_threads)
    prepare_worker_process()
    group = retry_transient_io(open_attention_store, store, mode="r+", delays=retry_delays, on_retry=log_retry)
    layout = store_layout(group)
    return group, layout, layout.shard_slice(shard_index)


def _compute_piece(
    group, store: str, shard_index: int, layers: tuple[int, int], inputs: tuple, variants: Sequence[str], settings: dict
) -> dict[str, EfficientAttentionResult]:
    """`variants` for layers [start, stop) from `inputs` = (attention, value, w_out, length) of exactly those
    layers (`_read_piece_inputs`)."""
    attention, value, w_out, length = inputs
    layout = store_layout(group)
    region = layout.shard_slice(shard_index)
    first, stop = layers
    where = f"examples {region.start} to {region.stop - 1}"
    if (first, stop) != (0, layout.layers):
        where += (f", layer {first}" if stop == first + 1 else f", layers {first} to {stop - 1}") + (
            f"; indices below count from example {region.start} and layer {first}"
        )
    model = group.attrs["model"]
    try:
        return efficient_attention(
            attention,
            value,
            w_out,
            length,
            causal=bool(model["causal"]),
            # the stored layers' bands (stores without bands: the default rule)
            key_bands=store_key_bands(model, selection_of_group(group).layers)[first:stop],
            variants=variants,
            simplex_max_iterations=settings["simplex_max_iterations"],
            simplex_tolerance=settings["simplex_tolerance"],
            output_dtype=np.float32,  # the stored dtype: no float64 copy of the shard
        )
    except ValueError as error:
        raise ValueError(f"{store}, shard {shard_index} ({where}): {error}") from error


def write_efficient_pieces(
    store: str,
    shard_index: int,
    pieces: Sequence[dict[str, EfficientAttentionResult]],
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
) -> tuple[int, list[str]]:
    """Join the pieces of one shard (in layer order, together covering every layer) and write whole shards of
    each variant; returns (shard_index, variants written). Runs on a worker. Writes are retried on transient I/O
    errors only; a full disk or a store this process may not write fails at once."""
    use_fast_codec_pipeline()
    group = retry_transient_io(open_attention_store, store, mode="r+", delays=retry_delays, on_retry=log_retry)
    layout = store_layout(group)
    covered = sum(next(iter(piece.values())).efficient.shape[1] for piece in pieces)  # layers of every piece
    if covered != layout.layers:
        raise ValueError(
            f"{store}, shard {shard_index}: the pieces cover {covered} layers, the store has "
            f"{layout.layers}; pass one piece per layer range, together covering every layer once"
        )
    variants = list(pieces[0])
    for variant in variants:
        if len(pieces) == 1:  # a whole shard: no copy
            efficient, diagnostics = pieces[0][variant].efficient, pieces[0][variant].diagnostics
        else:
            efficient = np.concatenate([piece[variant].efficient for piece in pieces], axis=1)
            diagnostics = {
                name: np.concatenate([piece[variant].diagnostics[name] for piece in pieces], axis=1)
                for name in pieces[0][variant].diagnostics
            }
        retry_transient_io(
            write_efficient_shard,
            group,
            layout,
            variant,
            shard_index,
            efficient,
            diagnostics,
            delays=retry_delays,
            on_retry=log_retry,
        )
    return shard_index, variants


def shard_pieces(variants: Sequence[str], layers: int) -> list[tuple[int, int] | None]:
    """How a shard is cut for computing: whole ([None]) for the closed-form variants, whose cost per shard is about
    the same (reading and writing dominate); one piece per layer with an iterative variant (simplex; the cost class
    of analysis/variants.py), whose solver's cost grows steeply with the length and gathers in the last shards of a
    length-sorted store, so that those shards spread over the workers. The simplex solver batches matrices and its
    diagnostics can differ in the last bit with the batching: every path cuts a shard the same way."""
    if all(variant_record(name).cost != ITERATIVE for name in variants):
        return [None]
    return [(layer, layer + 1) for layer in range(layers)]


def compute_efficient_shard(
    store: str,
    shard_index: int,
    variants: Sequence[str],
    settings: dict,
    torch_threads: int = 1,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
) -> tuple[int, list[str]]:
    """Compute and write `variants` for one shard in this process, piece after piece (`shard_pieces`); returns
    (shard_index, variants written). Runs on a worker; writes the same as `compute_shards` spreading the pieces.

    The shard is read once, all layers together: an inner chunk holds every layer of an example (schema v2), so
    reading it layer by layer would decode each chunk once per layer."""
    group, layout, region = _open_shard(store, shard_index, torch_threads, retry_delays)
    attention, value, w_out, length = retry_transient_io(
        _read_piece_inputs,
        group,
        store,
        shard_index,
        region,
        slice(0, layout.layers),
        delays=retry_delays,
        on_retry=log_retry,
    )
    pieces = []
    for cut in shard_pieces(variants, layout.layers):
        first, stop = cut if cut is not None else (0, layout.layers)
        inputs = (
            np.ascontiguousarray(attention[:, first:stop]),
            np.ascontiguousarray(value[:, first:stop]),
            np.ascontiguousarray(w_out[first:stop]),
            length,
        )
        pieces.append(_compute_piece(group, store, shard_index, (first, stop), inputs, variants, settings))
    return write_efficient_pieces(store, shard_index, pieces, retry_delays)


def pending_work(group, variants: Sequence[str]) -> dict[int, list[str]]:
    """shard -> variants still to compute there."""
    n_shards = store_layout(group).n_shards
    done = {variant: set(efficient_completed_shards(group, variant)) for variant in variants}
    work = {}
    for shard in range(n_shards):
        missing = [variant for variant in variants if shard not in done[variant]]
        if missing:
            work[shard] = missing
    return work


@dataclass(frozen=True)
class EfficientWork:
    """What the efficient stage computes: `variants` (analysis.variants names) with the recorded `settings`
    (flows.settings.EfficientSettings.recorded): the plan of a run, or of one shard (its variants still to do)."""

    variants: tuple[str, ...]
    settings: dict


def prepare_efficient_output(run: StageRun) -> None:
    """Refuse a store whose extraction is not complete; create (or check) the arrays of every variant of
    `run.plan` (an EfficientWork)."""
    group = open_attention_store(run.store, mode="r+")
    require_extracted(group, run.store, "efficient")
    for variant in run.plan.variants:
        prepare_efficient_arrays(group, run.store, variant, run.plan.settings)


def prepare_variants(store: str, variants: Sequence[str], settings: dict) -> dict[int, list[str]]:
    """Refuse a store whose extraction is not complete; create (or check) the arrays of every variant and forget
    shards computed from extraction shards written again since; returns the pending work, shard -> variants."""
    prepare_efficient_output(StageRun(store=store, results=store, plan=EfficientWork(tuple(variants), settings)))
    group = open_attention_store(store, mode="r+")
    for variant in variants:
        stale = forget_stale_efficient_shards(group, variant)
        if stale:
            logger.warning(
                "%s: efficient/%s shards %s were computed from extraction shards that were unfinished "
                "then or written again since: computing them again",
                store,
                variant,
                stale,
            )
    return pending_work(group, variants)


def shards_by_cost(group, work: dict[int, list[str]]) -> list[int]:
    """The shards of `work`, most expensive first (estimated by Σ length³ of their examples): started first, the
    long shards do not leave the other workers idle at the end."""
    layout = store_layout(group)
    length = group["length"][:].astype(np.float64)
    cost = {shard: float((length[layout.shard_slice(shard)] ** 3).sum()) for shard in work}
    return sorted(work, key=lambda shard: (-cost[shard], shard))


def compute_efficient_job(job: ShardJob) -> tuple[int, list[str]]:
    """`compute_efficient_shard` of one shard's job (its plan an EfficientWork of the shard's pending variants)."""
    return compute_efficient_shard(job.store, job.shard_index, list(job.plan.variants), job.plan.settings)


def submit_efficient_work(client, store: str, work: dict[int, list[str]], settings: dict, group) -> dict[Any, int]:
    """Submit `work` (shard -> variants) to the Dask `client`; returns {future: shard}, each future's result
    (shard, variants written).

    Shards start longest examples first. A shard cut in one piece (`shard_pieces`) is one task
    (`compute_efficient_shard`); a shard cut by layer has a task per piece (`compute_efficient_piece`, reading
    that layer) and one more that joins them and writes the whole shard (`write_efficient_pieces`), at a higher
    priority so that finished shards leave memory first. In a v2 store a layer's read decodes the shard's chunks of
    every layer; next to the simplex solve of the layer that is negligible (measured: 0.02 s against about 10 s per
    example and layer at L = 128), so the pieces stay separate tasks.
    """
    layers = store_layout(group).layers
    futures = {}
    for shard in shards_by_cost(group, work):
        cuts = shard_pieces(work[shard], layers)
        if cuts == [None]:
            job = ShardJob(store, store, EfficientWork(tuple(work[shard]), settings), shard_index=shard)
            futures[client.submit(compute_efficient_job, job, pure=False)] = shard
            continue
        pieces = [
            client.submit(compute_efficient_piece, store, shard, piece_layers, work[shard], settings, pure=False)
            for piece_layers in cuts
        ]
        futures[client.submit(write_efficient_pieces, store, shard, pieces, pure=False, priority=1)] = shard
    return futures


def compute_shards(store: str, work: dict[int, list[str]], settings: dict, client) -> int:
    """Run `work` (shard -> variants) on the Dask `client` (`submit_efficient_work`), recording completion as
    results arrive. Returns the number of shards computed."""
    group = open_attention_store(store, mode="r+")
    futures = submit_efficient_work(client, store, work, settings, group)
    return record_shard_futures(
        futures, lambda shard, result: mark_variants_completed(group, shard, result), "efficient shards"
    )


def submit_efficient_shards(client, run: StageRun, todo: list[int], group) -> dict[Any, int]:
    """The efficient stage's own submission of its pending shards `todo` (`submit_efficient_work`)."""
    work = pending_work(group, run.plan.variants)
    return submit_efficient_work(client, run.store, {shard: work[shard] for shard in todo}, run.plan.settings, group)


def mark_variants_completed(group, shard: int, result: tuple[int, list[str]]) -> None:
    """Record shard `shard` of every variant written (`result`: (shard, variants written))."""
    for variant in result[1]:
        mark_efficient_shard_completed(group, variant, shard)


def completed_for_every_variant(variants: Sequence[str], group, store_group) -> list[int]:
    """The shards every one of `variants` has completed."""
    work = pending_work(group, variants)
    return [shard for shard in range(store_layout(group).n_shards) if shard not in work]


def forget_stale_variant_shards(variants: Sequence[str], group, store_group) -> list[int]:
    """Forget, for every one of `variants`, the shards computed from extraction shards written again since;
    returns the shards forgotten for any of them."""
    return sorted({shard for variant in variants for shard in forget_stale_efficient_shards(group, variant)})


def store_shard_count(group, store_group) -> int:
    return store_layout(group).n_shards


def computed_store(store: str, results: str) -> str:
    """The efficient stage's summary: the store's URL (its diagnostics are summarised by the report)."""
    return store


def efficient_stage(variants: Sequence[str]) -> Stage:
    """The efficient stage for `variants`, declared: it writes into the attention store (its lock is the store's),
    on Dask always, with its own submission (`submit_efficient_shards`); a shard is done when every variant is."""
    return Stage(
        name="efficient",
        shards="efficient shards",
        prepare=prepare_efficient_output,
        open_output=open_attention_store,
        shard_count=store_shard_count,
        completed_shards=functools.partial(completed_for_every_variant, tuple(variants)),
        forget_stale_shards=functools.partial(forget_stale_variant_shards, tuple(variants)),
        compute_shard=compute_efficient_job,
        mark_completed=mark_variants_completed,
        summarise=computed_store,
        runs_in_process=False,
        submit_shards=submit_efficient_shards,
    )
