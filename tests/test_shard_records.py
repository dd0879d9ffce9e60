"""storage_schemas/shard_records.py: completion records with fresh identities and inputs, removal, and which
recorded shards are current or stale."""

from __future__ import annotations

from storage_schemas.shard_records import (
    LEGACY_SHARD_IDENTITY,
    completion_update,
    current_and_stale_shards,
    recorded_identities,
    recorded_inputs,
    removal_update,
)


def test_a_completion_gets_a_fresh_identity_and_records_its_inputs_and_a_removal_forgets_them():
    attributes = {"completed_shards": [0]}  # as an effattn that recorded no identities wrote it
    assert recorded_identities(attributes) == {0: LEGACY_SHARD_IDENTITY}
    attributes.update(completion_update(attributes, 2, {"extraction": "e2"}))
    attributes.update(completion_update(attributes, 1, {"extraction": "e1"}))
    assert attributes["completed_shards"] == [0, 1, 2]
    first = recorded_identities(attributes)
    attributes.update(completion_update(attributes, 1, {"extraction": "e1 again"}))
    assert recorded_identities(attributes)[1] != first[1] and recorded_identities(attributes)[2] == first[2]
    assert recorded_inputs(attributes, 1, ["extraction"]) == {"extraction": "e1 again"}
    assert recorded_inputs(attributes, 0, ["extraction", "efficient/simplex"]) == {
        "extraction": LEGACY_SHARD_IDENTITY,
        "efficient/simplex": LEGACY_SHARD_IDENTITY,
    }
    attributes.update(removal_update(attributes, [1, 0]))
    assert attributes["completed_shards"] == [2] and list(attributes["shard_inputs"]) == ["2"]
    assert list(attributes["shard_identities"]) == ["2"]


def test_a_shard_is_current_while_every_recorded_input_keeps_its_identity():
    attributes = {"completed_shards": [0, 1, 2, 3]}
    for shard in (1, 2, 3):
        attributes.update(completion_update(attributes, shard, {"extraction": f"e{shard}"}))
    now = {
        0: (["extraction"], {"extraction": LEGACY_SHARD_IDENTITY}),  # legacy, its input still legacy
        1: (["extraction"], {"extraction": "e1"}),
        2: (["extraction"], {"extraction": "written again"}),
        3: None,
    }  # the shard does not exist any more
    assert current_and_stale_shards(attributes, now.get) == ([0, 1], [2, 3])
    now[0] = (["extraction"], {"extraction": None})  # the legacy shard's input is not complete now
    assert current_and_stale_shards(attributes, now.get) == ([1], [0, 2, 3])
