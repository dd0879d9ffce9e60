"""storage_schemas.causal_results: create, open, resume checks, whole-shard writes, aggregates, portability."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.causal_results import (
    AGGREGATES,
    CausalResultsError,
    causal_completed_shards,
    check_same_settings,
    create_causal_results,
    mark_causal_shard_completed,
    open_causal_results,
    write_aggregates,
    write_causal_shard,
)
from storage_schemas.portability import portability_problems

METRICS = {"agreement": "share kept", "flipped": "changed"}
INTERVENTIONS = [
    {"name": "replay", "kind": "replay", "variant": "", "removed_directions": 0},
    {"name": "minimality:effective:k=2", "kind": "minimality", "variant": "effective", "removed_directions": 2},
]
TARGETS = [
    {"name": "all", "scope": "all", "layer": -1, "head": -1},
    {"name": "layer 0 head 1", "scope": "head", "layer": 0, "head": 1},
]


def make_results(url: str) -> zarr.Group:
    examples = {
        "source_index": np.array([4, 0, 2, 1, 3]),
        "length": np.array([3, 5, 6, 9, 9]),
        "label": np.array([0, 1, -1, 1, 0]),
    }
    return create_causal_results(
        url,
        INTERVENTIONS,
        TARGETS,
        examples,
        shard_size=2,
        metrics=METRICS,
        attributes={"settings": {"seed": 0}, "model": {"name": "tiny"}},
    )


def test_results_open_with_plain_xarray_with_labelled_coordinates(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make_results(url)
    shard = {"agreement": np.ones((2, 2, 2)), "flipped": np.zeros((2, 2, 2))}
    write_causal_shard(group, 1, shard, np.full((2, 2), 0.5), np.array([1.0, np.nan]))
    mark_causal_shard_completed(group, 1, {"extraction": "token-of-shard-1"})
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["agreement"].dims == ("intervention", "target", "example")
    assert dataset["intervention"].values.tolist() == ["replay", "minimality:effective:k=2"]
    assert dataset["target_head"].values.tolist() == [-1, 1]
    assert dataset["removed_directions"].sel(intervention="minimality:effective:k=2").values == 2
    agreement = dataset["agreement"].sel(intervention="replay", target="all").values
    assert agreement[2:4].tolist() == [1.0, 1.0] and np.isnan(agreement[[0, 1, 4]]).all()  # NaN: not measured
    assert dataset["source_index"].values.tolist() == [4, 0, 2, 1, 3]
    assert dataset.attrs["model"] == {"name": "tiny"} and dataset.attrs["completed_shards"] == [1]
    assert dataset.attrs["shard_inputs"] == {"1": {"extraction": "token-of-shard-1"}}


def test_every_array_is_portable_zarr_v3(tmp_path):
    url = str(tmp_path / "results.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. zarr's warning about data types without a Zarr v3 specification
        group = make_results(url)
        write_aggregates(group, {name: np.zeros((2, 2)) for name in AGGREGATES})
    names = [name for name, _ in zarr.open_group(url, mode="r").arrays()]
    assert len(names) == 14 + len(METRICS) + len(AGGREGATES)  # 12 coordinates, 2 per-example extras
    for name in names:
        metadata = json.loads((tmp_path / "results.zarr" / name / "zarr.json").read_text())
        assert metadata["dimension_names"], name
        assert metadata["data_type"] in ("string", "int32", "int64", "float32", "float64"), name
        codecs = [codec["name"] for codec in metadata["codecs"]]
        assert codecs in (["bytes", "zstd", "crc32c"], ["vlen-utf8", "zstd", "crc32c"]), (name, codecs)
    assert portability_problems(url) == []


def test_writes_of_the_wrong_shape_or_missing_metrics_are_refused(tmp_path):
    group = make_results(str(tmp_path / "results.zarr"))
    with pytest.raises(ValueError, match=r"shard 2: agreement has shape \(2, 2, 2\), expected \(2, 2, 1\)"):
        write_causal_shard(
            group, 2, {"agreement": np.ones((2, 2, 2)), "flipped": np.ones((2, 2, 2))}, np.ones((2, 1)), np.ones(1)
        )
    with pytest.raises(ValueError, match=r"shard 0: metrics \['flipped'\] are missing"):
        write_causal_shard(group, 0, {"agreement": np.ones((2, 2, 2))}, np.ones((2, 2)), np.ones(2))
    with pytest.raises(IndexError, match=r"shard 3 does not exist: the results have shards 0..2"):
        write_causal_shard(group, 3, {}, np.ones((2, 2)), np.ones(2))
    with pytest.raises(ValueError, match=r"aggregate agreement_rate has shape \(3,\), expected \(2, 2\)"):
        write_aggregates(group, {name: np.zeros(3) for name in AGGREGATES})


def test_open_and_resume_errors_say_what_to_do(tmp_path):
    url = str(tmp_path / "results.zarr")
    with pytest.raises(
        CausalResultsError, match=r"there are no causal results at .*: create them with `effattn causal"
    ):
        open_causal_results(url)
    group = make_results(url)
    with pytest.raises(CausalResultsError, match="something already exists at .*: choose a new --results path"):
        make_results(url)
    with pytest.raises(
        CausalResultsError, match=r"holds causal results of another run \(seed: stored 0, requested 1\): use the same"
    ):
        check_same_settings(group, url, {"seed": 1})
    check_same_settings(group, url, {"seed": 0})
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["schema"] = "something"
    with pytest.raises(CausalResultsError, match="is not an effattn causal results dataset"):
        open_causal_results(str(tmp_path / "other.zarr"))
    group.attrs["schema_version"] = 99
    with pytest.raises(CausalResultsError, match="schema version 99, but this effattn reads version 1"):
        open_causal_results(url)


def store_with_effective(url: str):
    """An attention store of 5 examples in shards of 2 (no data needed), extraction and efficient/effective done."""
    from storage_schemas.attention_store import (
        AttentionStoreLayout,
        create_attention_store,
        mark_prepared,
        mark_shard_completed,
        open_attention_store,
    )
    from storage_schemas.efficient_store import mark_efficient_shard_completed, prepare_efficient_arrays

    layout = AttentionStoreLayout(
        n_examples=5,
        max_length=6,
        n_classes=2,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=3,
        hidden=8,
        shard_size=2,
        dtype="float32",
    )
    mark_prepared(
        create_attention_store(url, layout, {"model": {"causal": False, "name": "tiny"}, "corpus": {"name": "reviews"}})
    )
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "effective", {"simplex_max_iterations": 1, "simplex_tolerance": 1.0})
    for shard in range(3):
        mark_shard_completed(group, shard)
        mark_efficient_shard_completed(group, "effective", shard)
    return group


def effective_results(url: str) -> zarr.Group:
    examples = {"source_index": np.arange(5), "length": np.full(5, 6), "label": np.zeros(5, dtype=int)}
    interventions = [
        {"name": "efficient:effective", "kind": "efficient", "variant": "effective", "removed_directions": 0}
    ]
    return create_causal_results(
        url, interventions, TARGETS[:1], examples, shard_size=2, metrics=METRICS, attributes={"settings": {"seed": 0}}
    )


def test_a_causal_shard_counts_as_done_only_while_its_store_shards_keep_their_identities(tmp_path):
    from storage_schemas.attention_store import mark_shard_completed, unmark_shards
    from storage_schemas.causal_results import causal_input_identities, forget_stale_causal_shards
    from storage_schemas.efficient_store import mark_efficient_shard_completed

    store = store_with_effective(str(tmp_path / "store.zarr"))
    results = effective_results(str(tmp_path / "results.zarr"))
    identities = causal_input_identities(store, ["effective"])
    for shard in range(3):
        mark_causal_shard_completed(results, shard, identities[shard])
    results.attrs["claims"] = [{"claim": "sufficient (effective)"}]
    assert causal_completed_shards(results, store) == [0, 1, 2]

    mark_efficient_shard_completed(store, "effective", 1)  # efficient shard 1 computed again: a new identity
    unmark_shards(store, [2])  # extraction shard 2 repaired: not complete
    assert causal_completed_shards(results, store) == [0]
    mark_shard_completed(store, 2)  # extracted again (efficient shard 2 is stale now, so causal shard 2 too)
    assert causal_completed_shards(results, store) == [0]
    assert forget_stale_causal_shards(results, store) == [1, 2]
    reopened = open_causal_results(str(tmp_path / "results.zarr"))
    assert reopened.attrs["completed_shards"] == [0] and "claims" not in reopened.attrs
    assert list(reopened.attrs["shard_inputs"]) == ["0"]


def test_legacy_results_stay_done_on_a_legacy_store_and_go_stale_when_a_shard_is_written_again(tmp_path):
    from storage_schemas.attention_store import mark_shard_completed

    store = store_with_effective(str(tmp_path / "store.zarr"))
    # as the earlier version wrote them: no identities, no inputs
    del store.attrs["shard_identities"]
    efficient = store["efficient/effective"]
    del efficient.attrs["shard_identities"]
    del efficient.attrs["shard_inputs"]
    assert set(store["efficient/effective"].attrs) == {"description", "settings", "completed_shards"}
    results = effective_results(str(tmp_path / "results.zarr"))
    results.attrs["completed_shards"] = [0, 1, 2]  # the earlier version recorded no inputs
    assert causal_completed_shards(results, store) == [0, 1, 2]
    mark_shard_completed(store, 0)  # extraction shard 0 written again: efficient shard 0 and causal shard 0 stale
    assert causal_completed_shards(results, store) == [1, 2]


def test_unfinished_or_stale_inputs_are_refused_naming_shards_and_commands(tmp_path):
    from storage_schemas.attention_store import IncompleteInputError, mark_shard_completed, unmark_shards
    from storage_schemas.causal_results import require_causal_inputs

    url = str(tmp_path / "store.zarr")
    store = store_with_effective(url)
    require_causal_inputs(store, url, ["effective"])  # complete: no error
    unmark_shards(store, [1])
    with pytest.raises(IncompleteInputError) as refused:
        require_causal_inputs(store, url, ["effective"])
    assert str(refused.value) == (
        f"{url} is not ready for `effattn causal` (unfinished shards read as zeros, so the results would be wrong): "
        f"extraction shard [1] (examples 2 to 3) is not complete: finish them by running the `effattn extract "
        f"--corpus reviews --model tiny --store {url} ...` command that created the store again, with the same "
        "options (it resumes and writes only the missing shards); efficient/effective shard [1] (examples 2 to 3) "
        "is not computed (computed from extraction shards that were written again since, or are not complete): run "
        f"`effattn efficient --store {url} --variants effective` after the extraction is complete; then run "
        "`effattn causal` again"
    )
    mark_shard_completed(store, 1)
    with pytest.raises(
        IncompleteInputError,
        match=re.escape(
            "efficient/effective shard [1] (examples 2 to 3) is not computed (computed from extraction shards that "
            f"were written again since, or are not complete): run `effattn efficient --store {url} --variants "
            "effective`; then"
        ),
    ):
        require_causal_inputs(store, url, ["effective"])
    require_causal_inputs(store, url, [])  # replay alone needs only the extraction


def test_results_of_another_store_are_refused_naming_each_difference():
    from storage_schemas.causal_results import CausalResultsError, check_results_of_store

    store = {
        "model": {"weights_digest": "sha256:a"},
        "corpus": {"digest": "c"},
        "layout": {"layers": 2, "heads": 4, "kv_heads": 4},
    }
    results = {"settings": {"store_identity": {"weights_digest": "sha256:a", "corpus_digest": "c", "examples": 10}}}
    check_results_of_store(results, store, "r.zarr", "s.zarr", 10)  # the same store
    with pytest.raises(
        CausalResultsError,
        match=re.escape(
            "r.zarr were not computed from the attention store s.zarr (corpus_digest: results 'c', store 'd'; "
            "examples: results 10, store 12): pass the store they came from with --store"
        ),
    ):
        check_results_of_store(results, {**store, "corpus": {"digest": "d"}}, "r.zarr", "s.zarr", 12)
    selected = {
        **store,
        "layout": {**store["layout"], "layers": 1},
        "selection": {"layers": [1], "heads": [0, 1, 2, 3], "model_layers": 2, "model_heads": 4, "model_kv_heads": 4},
    }
    with pytest.raises(CausalResultsError, match=r"selection: results None, store .*: give the store"):
        check_results_of_store(results, selected, "r.zarr", "s.zarr", 10, advice="give the store")
    check_results_of_store(results, selected, "r.zarr", "s.zarr", 10, check_selection=False)


def test_the_default_variants_are_the_finished_ones_and_a_variant_never_computed_is_refused(tmp_path):
    from storage_schemas.causal_results import causal_variants, require_causal_inputs
    from storage_schemas.efficient_store import unmark_efficient_shards

    url = str(tmp_path / "store.zarr")
    store = store_with_effective(url)
    assert causal_variants(store, url, None, None) == ["effective"]
    assert causal_variants(store, url, ("simplex",), None) == ["simplex"]  # named: checked by require_causal_inputs
    with pytest.raises(CausalResultsError) as refused:
        require_causal_inputs(store, url, ["effective", "simplex"])
    assert str(refused.value) == (
        f"{url} lacks finished efficient attention for the variants ['simplex']: run "
        f"`effattn efficient --store {url} --variants simplex` first"
    )
    unmark_efficient_shards(store, "effective", [0])
    assert causal_variants(store, url, None, ("replay",)) == []
    with pytest.raises(ValueError) as refused:
        causal_variants(store, url, None, None)
    assert str(refused.value) == (
        f"{url} has no finished efficient attention: run `effattn efficient --store {url}` "
        "first (or name --interventions that need none, e.g. replay,uniform,ablate)"
    )
