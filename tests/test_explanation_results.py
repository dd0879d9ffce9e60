"""storage_schemas/explanation_results.py: create, open with xarray, write shards, refuse what does not fit, and
count a shard as done only while the store shards it was computed from keep their identities."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
import zarr

from storage_schemas.explanation_results import (
    PER_EXAMPLE_ARRAYS,
    ExplanationResultsError,
    check_same_explanation_settings,
    create_explanation_results,
    explanation_completed_shards,
    explanation_shard_count,
    explanation_shard_inputs,
    explanation_status,
    forget_stale_explanation_shards,
    mark_explanation_shard_completed,
    open_explanation_results,
    require_explanation_inputs,
    write_explanation_aggregates,
    write_explanation_shard,
)

METHODS = [
    {"name": "attention:rollout", "kind": "matrices", "source": "attention", "aggregation": "rollout"},
    {"name": "effective:rollout", "kind": "matrices", "source": "effective", "aggregation": "rollout"},
    {"name": "random", "kind": "random", "source": "", "aggregation": ""},
]
SIZES = {"explainer": 3, "metric": 2, "k": 3, "reference": 2, "position": 6, "layer": 2}
SETTINGS = {"seed": 0, "methods": ["a"]}


def make(url, examples: int = 5, shard_size: int = 2):
    return create_explanation_results(
        url,
        METHODS,
        ["comprehensiveness", "sufficiency"],
        [1, 10, 50],
        ["leave-one-out", "integrated-gradients"],
        {"store_example": np.arange(examples) * 3, "length": np.full(examples, 6), "label": np.zeros(examples)},
        layers=2,
        positions=6,
        shard_size=shard_size,
        attributes={"settings": SETTINGS},
    )


def store_with_effective(url: str) -> zarr.Group:
    """An attention store of 16 examples in shards of 4 (no data needed), extraction and efficient/effective done.
    The results of `make` explain its examples 0, 3 (store shard 0) | 6, 9 (store shards 1 and 2) | 12 (shard 3)."""
    from storage_schemas.attention_store import (
        AttentionStoreLayout,
        create_attention_store,
        mark_prepared,
        mark_shard_completed,
        open_attention_store,
    )
    from storage_schemas.efficient_store import mark_efficient_shard_completed, prepare_efficient_arrays

    layout = AttentionStoreLayout(
        n_examples=16,
        max_length=6,
        n_classes=2,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=3,
        hidden=8,
        shard_size=4,
        dtype="float32",
    )
    mark_prepared(
        create_attention_store(url, layout, {"model": {"causal": False, "name": "tiny"}, "corpus": {"name": "reviews"}})
    )
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "effective", {"simplex_max_iterations": 1, "simplex_tolerance": 1.0})
    for shard in range(4):
        mark_shard_completed(group, shard)
        mark_efficient_shard_completed(group, "effective", shard)
    return group


def completed_results(tmp_path, store: zarr.Group) -> zarr.Group:
    """`make`'s results with every shard recorded done from `store` as it is now, and claims written."""
    group = make(str(tmp_path / "results.zarr"))
    for shard in range(explanation_shard_count(group)):
        mark_explanation_shard_completed(group, shard, explanation_shard_inputs(group, store, shard))
    group.attrs["claims"] = [{"claim": "simplex supports are minimal"}]
    return group


def shard_arrays(count: int, value: float) -> dict[str, np.ndarray]:
    sizes = {**SIZES, "example": count}
    return {
        name: np.full(tuple(sizes[dim] for dim in dims), value) for name, (dims, _, _, _) in PER_EXAMPLE_ARRAYS.items()
    }


def test_created_results_open_with_xarray_with_named_dims(tmp_path):
    url = str(tmp_path / "results.zarr")
    make(url)
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["faithfulness"].dims == ("explainer", "metric", "k", "example")
    assert dataset["kendall_tau"].dims == ("explainer", "reference", "example")
    assert dataset["explainer"].values.tolist() == ["attention:rollout", "effective:rollout", "random"]
    assert dataset["store_example"].values.tolist() == [0, 3, 6, 9, 12]
    assert np.isnan(dataset["aopc"].values).all()
    assert int(dataset["minimality_tested"].min()) == -1  # not measured until written
    assert dataset.attrs["schema"] == "effattn.explanation_results"
    assert zarr.open_group(url, mode="r")["faithfulness"].chunks[-1] == 2  # chunked by shard


def test_shards_are_written_whole_and_recorded(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    assert explanation_shard_count(group) == 3
    store = store_with_effective(str(tmp_path / "store.zarr"))
    write_explanation_shard(group, 2, shard_arrays(1, 0.5))  # the last shard holds one example
    mark_explanation_shard_completed(group, 2, explanation_shard_inputs(group, store, 2))
    assert explanation_completed_shards(open_explanation_results(url), store) == [2]
    values = open_explanation_results(url)["aopc"][:]
    assert np.isnan(values[..., :4]).all() and (values[..., 4] == 0.5).all()
    with pytest.raises(ValueError, match="faithfulness has shape"):
        arrays = shard_arrays(2, 0.0)
        arrays["faithfulness"] = arrays["faithfulness"][:, :, :1]
        write_explanation_shard(group, 0, arrays)
    with pytest.raises(ValueError, match=r"arrays \['target'\] are missing"):
        write_explanation_shard(group, 0, {k: v for k, v in shard_arrays(2, 0.0).items() if k != "target"})
    with pytest.raises(IndexError, match="shard 3 does not exist"):
        mark_explanation_shard_completed(group, 3, {"extraction[3]": "x"})


def test_aggregates_are_written_with_their_dims(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    write_explanation_aggregates(
        group,
        {"mean_aopc": np.ones((3, 2)), "mean_kendall_tau": np.zeros((3, 2)), "minimal_share": np.array([0.5, np.nan])},
    )
    dataset = xr.open_zarr(url, consolidated=False)
    assert dataset["minimal_share"].dims == ("layer",)
    assert dataset["mean_kendall_tau"].dims == ("explainer", "reference")
    with pytest.raises(ValueError, match="minimal_share has shape"):
        write_explanation_aggregates(
            group, {"mean_aopc": np.ones((3, 2)), "mean_kendall_tau": np.zeros((3, 2)), "minimal_share": np.ones(3)}
        )


def test_other_settings_existing_paths_and_foreign_datasets_are_refused(tmp_path):
    url = str(tmp_path / "results.zarr")
    group = make(url)
    check_same_explanation_settings(group, url, SETTINGS)
    with pytest.raises(ExplanationResultsError, match=r"another run \(seed: stored 0, requested 1\)"):
        check_same_explanation_settings(group, url, {"seed": 1, "methods": ["a"]})
    with pytest.raises(ExplanationResultsError, match="something already exists"):
        make(url)
    with pytest.raises(ExplanationResultsError, match="there are no explanation results"):
        open_explanation_results(str(tmp_path / "absent.zarr"))
    foreign = str(tmp_path / "foreign.zarr")
    zarr.open_group(foreign, mode="w").attrs["schema"] = "effattn.causal_results"
    with pytest.raises(ExplanationResultsError, match="is not an effattn explanation results dataset"):
        open_explanation_results(foreign)
    group.attrs["schema_version"] = 99
    with pytest.raises(ExplanationResultsError, match="schema version 99"):
        open_explanation_results(url)


def test_a_shard_counts_as_done_only_while_the_store_shards_of_its_examples_keep_their_identities(tmp_path):
    from storage_schemas.attention_store import mark_shard_completed, unmark_shards
    from storage_schemas.efficient_store import mark_efficient_shard_completed

    store_url = str(tmp_path / "store.zarr")
    store = store_with_effective(store_url)
    results = completed_results(tmp_path, store)
    url = str(tmp_path / "results.zarr")
    inputs = results.attrs["shard_inputs"]
    assert sorted(inputs["1"]) == [
        "efficient/effective[1]",
        "efficient/effective[2]",
        "extraction[1]",
        "extraction[2]",
    ]  # its examples 6 and 9 lie in store shards 1 and 2
    assert inputs["1"]["extraction[2]"] == store.attrs["shard_identities"]["2"]
    assert inputs["1"]["efficient/effective[2]"] == store["efficient/effective"].attrs["shard_identities"]["2"]
    assert explanation_completed_shards(results, store) == [0, 1, 2]
    assert explanation_status(url, SETTINGS, store_url).complete

    mark_efficient_shard_completed(store, "effective", 2)  # efficient shard 2 computed again: a new identity
    assert explanation_completed_shards(results, store) == [0, 2]
    unmark_shards(store, [3])  # extraction shard 3 repaired: not complete
    assert explanation_completed_shards(results, store) == [0]
    mark_shard_completed(store, 3)  # extracted again (efficient shard 3 is stale now, so results shard 2 too)
    assert explanation_completed_shards(results, store) == [0]
    status = explanation_status(url, SETTINGS, store_url)
    assert not status.complete and not status.conflicting and status.reason == f"1 of 3 shards of {url} are done"
    assert forget_stale_explanation_shards(results, store) == [1, 2]
    reopened = open_explanation_results(url)
    assert reopened.attrs["completed_shards"] == [0] and "claims" not in reopened.attrs
    assert list(reopened.attrs["shard_inputs"]) == ["0"] and list(reopened.attrs["shard_identities"]) == ["0"]
    assert forget_stale_explanation_shards(results, store) == []


def test_legacy_results_stay_done_on_a_legacy_store_and_go_stale_when_a_shard_is_written_again(tmp_path):
    from storage_schemas.attention_store import mark_shard_completed

    store = store_with_effective(str(tmp_path / "store.zarr"))
    # as an effattn without identities wrote them: neither the store nor the results record any
    del store.attrs["shard_identities"]
    efficient = store["efficient/effective"]
    del efficient.attrs["shard_identities"]
    del efficient.attrs["shard_inputs"]
    results = make(str(tmp_path / "results.zarr"))
    results.attrs["completed_shards"] = [0, 1, 2]
    assert explanation_completed_shards(results, store) == [0, 1, 2]
    mark_shard_completed(store, 2)  # extraction shard 2 written again: efficient shard 2 and results shard 1 stale
    assert explanation_completed_shards(results, store) == [0, 2]
    assert forget_stale_explanation_shards(results, store) == [1]


def test_a_shard_is_not_recorded_done_from_unfinished_inputs(tmp_path):
    from storage_schemas.attention_store import IncompleteInputError, unmark_shards

    store = store_with_effective(str(tmp_path / "store.zarr"))
    results = make(str(tmp_path / "results.zarr"))
    unmark_shards(store, [1])
    inputs = explanation_shard_inputs(results, store, 1)
    assert inputs["extraction[1]"] is None and inputs["efficient/effective[1]"] is None
    assert inputs["extraction[2]"] is not None
    with pytest.raises(IncompleteInputError, match="explanation shard 1 cannot be recorded as done"):
        mark_explanation_shard_completed(results, 1, inputs)
    assert explanation_completed_shards(results, store) == []


def test_unfinished_or_stale_inputs_of_the_examples_are_refused_naming_shards_and_commands(tmp_path):
    from storage_schemas.attention_store import IncompleteInputError, mark_shard_completed, unmark_shards

    url = str(tmp_path / "store.zarr")
    store = store_with_effective(url)
    examples = [0, 3, 6, 9, 12]
    require_explanation_inputs(store, url, examples, ["effective"])  # complete: no error
    unmark_shards(store, [1, 2])
    with pytest.raises(IncompleteInputError) as refused:
        require_explanation_inputs(store, url, examples, ["effective"])
    assert str(refused.value) == (
        f"{url} is not ready for `effattn explain` (the examples to explain lie in unfinished shards, which read as "
        "zeros, so the results would be wrong): extraction shards [1, 2] (examples 4 to 11) are not complete: finish "
        f"them by running the `effattn extract --corpus reviews --model tiny --store {url} ...` command that created "
        "the store again, with the same options (it resumes and writes only the missing shards); efficient/effective "
        "shards [1, 2] (examples 4 to 11) are not computed (computed from extraction shards that were written again "
        f"since, or are not complete): run `effattn efficient --store {url} --variants effective` after the "
        "extraction is complete; then run `effattn explain` again"
    )
    require_explanation_inputs(store, url, [0, 3, 12], ["effective"])  # no example in the unfinished shards
    mark_shard_completed(store, 1)
    mark_shard_completed(store, 2)
    with pytest.raises(
        IncompleteInputError,
        match=re.escape(
            "efficient/effective shards [1, 2] (examples 4 to 11) are not computed (computed from extraction shards "
            f"that were written again since, or are not complete): run `effattn efficient --store {url} --variants "
            "effective`; then run `effattn explain` again"
        ),
    ):
        require_explanation_inputs(store, url, examples, ["effective"])
    require_explanation_inputs(store, url, examples, [])  # attention alone needs only the extraction
