"""The shard-record protocol of every store or dataset whose writers work shard by shard.

An attribute set (of a group or an array) records its completed shards: `completed_shards` (written only after a
shard's data is durably written, by the single driver process), `shard_identities` (a fresh random token per
completion: a shard written again gets a new identity) and, for a stage that reads shards of another stage,
`shard_inputs` (shard -> the identities of the input shards it was computed from). A consuming shard counts as
completed only while each of its inputs is still complete with the identity it recorded (`shard_is_current`);
otherwise it is stale and is computed again. Shards completed before identities or inputs were recorded have the
identity `legacy` and `legacy` inputs.

The attention store's extraction, the efficient store and the results datasets (storage_schemas.results_dataset)
all use these records.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

LEGACY_SHARD_IDENTITY = "legacy"  # the identity of a shard completed by an effattn that recorded none
# Attributes that differ between two runs writing the same data (fresh tokens): content digests leave them out.
SHARD_IDENTITY_ATTRIBUTES = ("shard_identities", "shard_inputs")


def recorded_identities(attributes: dict[str, Any]) -> dict[int, str]:
    """Every shard of `attributes["completed_shards"]` -> its identity (`legacy` when none is recorded)."""
    tokens = attributes.get("shard_identities") or {}
    return {
        int(shard): tokens.get(str(int(shard)), LEGACY_SHARD_IDENTITY)
        for shard in attributes.get("completed_shards", [])
    }


def recorded_inputs(attributes: dict[str, Any], shard_index: int, keys: list[str]) -> dict[str, str]:
    """The identities of the inputs a completed shard was computed from, input name -> identity; a shard completed
    before inputs were recorded was computed from `legacy` inputs (`keys` names them)."""
    inputs = (attributes.get("shard_inputs") or {}).get(str(int(shard_index)))
    return dict(inputs) if inputs is not None else {key: LEGACY_SHARD_IDENTITY for key in keys}


def shard_is_current(recorded: dict[str, str], current: dict[str, str | None]) -> bool:
    """Whether a shard computed from the inputs `recorded` (name -> identity) is still valid now that the inputs'
    identities are `current` (None: that input shard is not complete)."""
    return all(current.get(name) is not None and current.get(name) == identity for name, identity in recorded.items())


def completion_update(
    attributes: dict[str, Any], shard_index: int, inputs: dict[str, str] | None = None
) -> dict[str, Any]:
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
        "shard_identities": {
            key: value for key, value in (attributes.get("shard_identities") or {}).items() if int(key) not in gone
        },
    }
    if "shard_inputs" in attributes:
        update["shard_inputs"] = {
            key: value for key, value in (attributes.get("shard_inputs") or {}).items() if int(key) not in gone
        }
    return update


# What a consumer knows about one of its recorded shards now: (the input names a `legacy` shard is taken to have
# read, input name -> its identity now (None: not complete)), or None for a shard that does not exist any more.
InputsNow = tuple[list[str], dict[str, "str | None"]] | None


def current_and_stale_shards(
    attributes: dict[str, Any], inputs_now: Callable[[int], InputsNow]
) -> tuple[list[int], list[int]]:
    """(current, stale) shards of those `attributes` record as completed, in order: a shard is current while every
    input it recorded (or, for a shard that recorded none, every input `inputs_now` names as legacy) is complete
    with that same identity now."""
    current, stale = [], []
    for shard in sorted(recorded_identities(attributes)):
        now = inputs_now(shard)
        valid = now is not None and shard_is_current(recorded_inputs(attributes, shard, now[0]), now[1])
        (current if valid else stale).append(shard)
    return current, stale
