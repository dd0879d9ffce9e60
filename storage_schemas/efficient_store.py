"""The efficient stage's part of an attention store: `efficient/<variant>` and `diagnostics/<variant>/<name>`.

`efficient/<variant>` has the layout of `attention` (example, layer, head, query, key; the chunks of `attention`: one
example x all layers, or one layer in a schema v1 store; shards of `shard_size` examples), float32, zero outside each
example's real block. The null part of a variant is `attention - efficient/<variant>`. `diagnostics/<variant>/<name>`
are (example, layer, head) arrays, one chunk per shard. Completion is recorded per variant in the attribute
`completed_shards` of `efficient/<variant>`, written by the driver only after the shard's data is written; the settings
that shaped the numbers (simplex tolerance and iteration limit) are in its attribute `settings`, and a rerun with other
settings is refused.

Every completed shard of a variant records the identity of the extraction shard it was computed from
(`shard_inputs`: shard -> {"extraction": identity}) and gets its own identity (`shard_identities`, read by the causal
stage); see storage_schemas.shard_records. A shard counts as completed (`efficient_completed_shards`) only while
its extraction shard is complete with that same identity: an extraction shard written again makes the efficient
shard stale, and the efficient stage computes it again. Shards completed before inputs were recorded were computed
from `legacy` inputs: they stay completed exactly while their extraction shard keeps its legacy identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from analysis.variants import variant_record
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    _compressors,
    describe_shards,
    extract_again_advice,
    extraction_identities,
    store_layout,
)
from storage_schemas.durable_writes import write_whole_shard
from storage_schemas.errors import AttentionStoreError, IncompleteInputError
from storage_schemas.shard_records import (
    completion_update,
    current_and_stale_shards,
    recorded_identities,
    removal_update,
)

# name -> (storage dtype, description)
DIAGNOSTIC_ARRAYS: dict[str, tuple[str, str]] = {
    "rank": ("int32", "numerical rank of T = V W_O^h over the real tokens"),
    "null_dim": ("int32", "dimension of the left null space removed: L - rank(T) (effective) or L - rank([T|1])"),
    "output_residual": ("float64", "||A_eff T - A T||_F / ||A T||_F (computed in float64 before storage)"),
    "row_sum_error": ("float64", "max over rows of |sum_j A_eff[i, j] - 1|"),
    "negative_mass": ("float64", "sum of |negative entries| of A_eff divided by L (mean per row)"),
    "null_norm_ratio": ("float64", "||A - A_eff||_F / ||A||_F"),
    "iterations": ("int32", "simplex: most solver iterations over the rows; 0 for closed-form variants"),
    "converged": ("bool", "simplex: every row converged without feasibility repair; true for closed-form variants"),
    "support_size": ("float64", "mean number of non-zero entries per row of A_eff"),
    "optimality_residual": ("float64", "simplex: largest relative dual residual over the rows; 0 otherwise"),
}


def efficient_array_path(variant: str) -> str:
    return f"efficient/{variant}"


def diagnostic_array_path(variant: str, name: str) -> str:
    return f"diagnostics/{variant}/{name}"


def prepare_efficient_arrays(group: zarr.Group, url: str, variant: str, settings: dict[str, Any]) -> None:
    """Create the arrays of `variant` if absent; if present, check they were made with the same settings."""
    layout = store_layout(group)
    path = efficient_array_path(variant)
    if path in group:
        stored = group[path].attrs.get("settings")
        if stored != settings:
            raise AttentionStoreError(
                f"{url}: efficient/{variant} was computed with settings {stored}, but this run asks for {settings}: "
                f"use the same settings, or delete {url}/efficient/{variant} and {url}/diagnostics/{variant} "
                "to compute it again"
            )
        return
    E, S = layout.n_examples, layout.shard_size
    for name, (dtype, description) in DIAGNOSTIC_ARRAYS.items():
        group.create_array(
            diagnostic_array_path(variant, name),
            shape=(E, layout.layers, layout.heads),
            dtype=dtype,
            chunks=(S, layout.layers, layout.heads),
            compressors=_compressors(),
            fill_value=0,
            dimension_names=("example", "layer", "head"),
            attributes={"description": description},
        )
    attention_shape = (E, layout.layers, layout.heads, layout.max_length, layout.max_length)
    group.create_array(
        path,
        shape=attention_shape,
        dtype="float32",
        chunks=tuple(group["attention"].chunks),  # as the attention it is read beside (schema v1 or v2)
        shards=(S, *attention_shape[1:]),
        compressors=_compressors(),
        fill_value=0,
        dimension_names=("example", "layer", "head", "query", "key"),
        # written last: an array with attributes `settings` and `completed_shards` means all arrays exist
        attributes={"description": variant_record(variant).description, "settings": settings, "completed_shards": []},
    )


EXTRACTION_INPUT = "extraction"  # the name of an efficient shard's one input: the extraction shard


def _shard_states(group: zarr.Group, variant: str) -> tuple[list[int], list[int]]:
    """(current, stale) recorded shards of `variant`: stale ones were computed from an extraction shard that is not
    complete now, or was written again since."""
    path = efficient_array_path(variant)
    if path not in group:
        return [], []
    extracted = extraction_identities(group)
    return current_and_stale_shards(
        group[path].attrs.asdict(), lambda shard: ([EXTRACTION_INPUT], {EXTRACTION_INPUT: extracted.get(shard)})
    )


def efficient_completed_shards(group: zarr.Group, variant: str) -> list[int]:
    """The shards of `variant` that are computed and still current (from the extraction shards as they are now)."""
    return _shard_states(group, variant)[0]


def efficient_stale_shards(group: zarr.Group, variant: str) -> list[int]:
    """Shards of `variant` recorded as completed but computed from extraction shards that are not complete any more
    or were written again since: they must be computed again."""
    return _shard_states(group, variant)[1]


def efficient_identities(group: zarr.Group, variant: str) -> dict[int, str]:
    """Every current completed shard of `variant` -> its identity (what the causal stage records as its input)."""
    path = efficient_array_path(variant)
    if path not in group:
        return {}
    identities = recorded_identities(group[path].attrs.asdict())
    return {shard: identities[shard] for shard in efficient_completed_shards(group, variant)}


def forget_stale_efficient_shards(group: zarr.Group, variant: str) -> list[int]:
    """Record the stale shards of `variant` as not done (so that readers of `completed_shards` alone, e.g. an older
    effattn, see them missing too); returns them. Only from the driver that holds the store's lock."""
    stale = efficient_stale_shards(group, variant)
    if stale:
        unmark_efficient_shards(group, variant, stale)
    return stale


def unmark_efficient_shards(group: zarr.Group, variant: str, shards) -> None:
    """Record `shards` of `variant` as not done (their identities forgotten)."""
    array = group[efficient_array_path(variant)]
    array.attrs.update(removal_update(array.attrs.asdict(), shards))


def mark_efficient_shard_completed(group: zarr.Group, variant: str, shard_index: int) -> None:
    """Record a shard of `variant` as done, computed from the extraction shard as it is recorded in `group` now; only
    after its data is written, only from the driver, which holds the store's lock (so that the extraction shard
    cannot have been written again while the workers read it). Refuses a shard whose extraction is not complete."""
    layout = store_layout(group)
    layout.shard_slice(shard_index)  # an IndexError for a shard that does not exist
    extracted = extraction_identities(group).get(int(shard_index))
    if extracted is None:
        raise IncompleteInputError(
            f"efficient/{variant} {describe_shards([shard_index], layout)} cannot be recorded as done: its "
            "extraction shard is not complete"
        )
    array = group[efficient_array_path(variant)]
    array.attrs.update(completion_update(array.attrs.asdict(), shard_index, {EXTRACTION_INPUT: extracted}))


def write_efficient_shard(
    group: zarr.Group,
    layout: AttentionStoreLayout,
    variant: str,
    shard_index: int,
    efficient: np.ndarray,
    diagnostics: dict[str, np.ndarray],
) -> None:
    """Write one whole shard of a variant: efficient [shard examples, layer, head, query, key] and each
    diagnostic [shard examples, layer, head]. When this returns, the shard's files are on disk; a full disk or a
    store this process may not write raises `StoreFullError` / `StoreNotWritableError`."""
    region = layout.shard_slice(shard_index)
    n = region.stop - region.start
    expected = (n, layout.layers, layout.heads, layout.max_length, layout.max_length)
    if efficient.shape != expected:
        raise ValueError(f"shard {shard_index}: efficient/{variant} has shape {efficient.shape}, expected {expected}")
    missing = sorted(set(DIAGNOSTIC_ARRAYS) - set(diagnostics))
    if missing:
        raise ValueError(f"shard {shard_index}: diagnostics {missing} of {variant} are missing")
    writes = [
        (diagnostic_array_path(variant, name), region, np.asarray(diagnostics[name]).astype(dtype))
        for name, (dtype, _) in DIAGNOSTIC_ARRAYS.items()
    ]
    writes.append((efficient_array_path(variant), region, np.asarray(efficient, dtype=np.float32)))
    write_whole_shard(
        group, shard_index, writes, recorded_done=shard_index in efficient_completed_shards(group, variant)
    )


def store_input_identities(group: zarr.Group, variants) -> dict[int, dict[str, str | None]]:
    """For every shard of the attention store: the current identities of what a consumer of extraction and the
    efficient attention of `variants` reads there, input name ("extraction", "efficient/<variant>") -> identity,
    None where that shard is not complete (or is stale)."""
    layout = store_layout(group)
    extracted = extraction_identities(group)
    efficient = {variant: efficient_identities(group, variant) for variant in variants}
    return {
        shard: {
            EXTRACTION_INPUT: extracted.get(shard),
            **{efficient_array_path(variant): efficient[variant].get(shard) for variant in variants},
        }
        for shard in range(layout.n_shards)
    }


def store_input_problems(group: zarr.Group, url: str, shards, variants) -> list[str]:
    """What keeps a consumer from reading `shards` of the store at `url` (extraction and the efficient attention
    of `variants`): one sentence per unfinished input, naming its shards and the command that completes them."""
    layout = store_layout(group)
    current = store_input_identities(group, variants)
    problems = []
    missing = [shard for shard in shards if current[shard][EXTRACTION_INPUT] is None]
    if missing:
        problems.append(
            f"extraction {describe_shards(missing, layout)} {'is' if len(missing) == 1 else 'are'} not "
            f"complete: {extract_again_advice(group, url)}"
        )
    for variant in variants:
        path = efficient_array_path(variant)
        lacking = [shard for shard in shards if current[shard][path] is None]
        if not lacking:
            continue
        stale = set(lacking) & set(efficient_stale_shards(group, variant))
        why = " (computed from extraction shards that were written again since, or are not complete)" if stale else ""
        problems.append(
            f"{path} {describe_shards(lacking, layout)} {'is' if len(lacking) == 1 else 'are'} not "
            f"computed{why}: run `effattn efficient --store {url} --variants {variant}`"
            + (" after the extraction is complete" if missing else "")
        )
    return problems
