"""The causal stage (flows/causal.py, tasks/causal.py): results from a real store, resumable, refusing mismatches."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import xarray as xr

from analysis.causal import METRICS, keyed_scope_examples
from flows.causal import causal, recorded_causal_settings
from flows.efficient import efficient
from flows.extract import extract
from flows.settings import CausalSettings, EfficientSettings, ExtractSettings
from storage_schemas.attention_store import open_attention_store, store_layout
from storage_schemas.causal_results import AGGREGATES, CausalResultsError, causal_status, open_causal_results
from tasks import causal as causal_tasks
from tasks.stages import StageRun, run_stage
from tests.conftest import REVIEW_ROWS, write_reviews_csv
from tests.store_builders import build_real_store, grow_real_store, write_corpus

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory, tiny_llama_folder) -> str:
    """Tiny Llama (grouped-query, head dim 8; its logits react visibly to ablation, unlike the tiny BERT's) over 10
    reviews, 3 shards, with all three efficient variants."""
    folder = tmp_path_factory.mktemp("causal")
    url = str(folder / "store.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(folder / "reviews.csv")),
            model=str(tiny_llama_folder),
            store=url,
            shard_size=4,
            batch_size=4,
        )
    )
    efficient(EfficientSettings(store=url, workers=1))
    return url


def test_causal_run_measures_every_intervention_and_answers_the_claims(llama_store, tmp_path, capsys):
    from flows.cli import main

    results = str(tmp_path / "results.zarr")
    assert (
        main(["causal", "--store", llama_store, "--results", results, "--scope-examples", "4", "--minimality-k", "1,2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "sufficient (effective)" in printed and f"results: {results}" in printed
    dataset = xr.open_zarr(results, consolidated=False).load()
    interventions = dataset["intervention"].values.tolist()
    assert interventions[:4] == ["replay", "efficient:effective", "efficient:stochastic", "efficient:simplex"]
    assert "minimality:effective:k=2" in interventions
    everything = dict(intervention="replay", target="all")
    assert float(dataset["stored_logit_difference"].sel(**everything).max()) <= TOLERANCE
    for variant in ("effective", "stochastic", "simplex"):
        kept = dataset.sel(intervention=f"efficient:{variant}")
        measured = kept["agreement"].notnull()
        assert (kept["agreement"].where(measured) == 1).sum() == measured.sum()
        assert float(kept["max_abs_logit_change"].max()) <= TOLERANCE
    # one layer at a time, the null part does exactly what ablation does
    layers = dataset["target_scope"] == "layer"
    null = dataset["max_abs_logit_change"].sel(intervention="null:effective").where(layers)
    ablate = dataset["max_abs_logit_change"].sel(intervention="ablate").where(layers)
    np.testing.assert_allclose(null.values, ablate.values, atol=TOLERANCE)
    assert float(ablate.max()) > 10 * TOLERANCE  # ablation changes the logits, so the check above can fail
    # the head scope measured only the 4 examples its keyed draw picks (a store that grows), and only its interventions
    heads = dataset.sel(target="layer 1 head 3")
    assert int(heads["agreement"].sel(intervention="ablate").notnull().sum()) == 4
    assert int(heads["agreement"].sel(intervention="null:effective").notnull().sum()) == 0  # = ablate, per head
    assert int(heads["agreement"].sel(intervention="efficient:effective").notnull().sum()) == 0
    assert int(heads["agreement"].sel(intervention="uniform").notnull().sum()) == 0
    assert dataset["examples_measured"].sel(intervention="replay", target="all").values == 10
    # aggregates agree with the per-example numbers
    np.testing.assert_allclose(dataset["agreement_rate"].values, dataset["agreement"].mean("example").values)
    claims = dataset.attrs["claims"]
    assert {row["claim"] for row in claims} >= {
        "sufficient (simplex)",
        "necessary (effective)",
        "minimal (effective)",
        "replay reproduces the stored model",
    }
    assert (
        dataset.attrs["model"]["weights_digest"]
        == open_causal_results(results).attrs["settings"]["store_identity"]["weights_digest"]
    )


def test_the_summary_read_in_parts_of_whole_shards_equals_the_summary_read_at_once(llama_store, tmp_path, monkeypatch):
    from storage_schemas.attention_store import open_attention_store, store_layout
    from tasks import causal as causal_tasks

    layout = store_layout(open_attention_store(llama_store))
    monkeypatch.setattr(causal_tasks, "SUMMARY_PART_EXAMPLES", 1)  # one shard per part: 4 + 4 + 2 examples
    assert causal_tasks.summary_parts(layout) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    results = str(tmp_path / "results.zarr")
    causal(CausalSettings(store=llama_store, results=results, scope_examples=4))
    in_parts = xr.open_zarr(results, consolidated=False).load()
    monkeypatch.setattr(causal_tasks, "SUMMARY_PART_EXAMPLES", 10**6)
    assert causal_tasks.summary_parts(layout) == [slice(0, 10)]
    causal_tasks.summarise_results(llama_store, results)
    at_once = xr.open_zarr(results, consolidated=False).load()
    for name in ("agreement_rate", "largest_logit_change", "mean_kl_divergence", "examples_measured"):
        np.testing.assert_allclose(in_parts[name].values, at_once[name].values, rtol=1e-12)
    assert in_parts.attrs["claims"] == at_once.attrs["claims"]
    for variant, summary in at_once.attrs["efficient_diagnostics"].items():
        np.testing.assert_allclose(
            list(in_parts.attrs["efficient_diagnostics"][variant].values()), list(summary.values()), rtol=1e-12
        )


def test_a_rerun_skips_done_shards_and_recomputes_a_lost_one_identically(llama_store, tmp_path):
    results = str(tmp_path / "results.zarr")
    options = dict(
        interventions=["replay", "efficient+null-noise:stochastic", "colspace-noise:effective"],
        scopes=["all", "head"],
        head_interventions=["colspace-noise:effective"],
        scope_examples=3,
    )
    causal(CausalSettings(store=llama_store, results=results, **options))
    group = open_causal_results(results, mode="r+")
    before = {name: group[name][:] for name in ("agreement", "max_abs_logit_change", "injected_change_ratio")}
    # a crash: shard 1 was never recorded as done and holds garbage
    group.attrs["completed_shards"] = [0, 2]
    group["max_abs_logit_change"][:, :, 4:8] = 123.0
    causal(CausalSettings(store=llama_store, results=results, **options))
    for name, values in before.items():
        np.testing.assert_array_equal(group[name][:], values)  # the same noise again: seeded per example
    assert open_causal_results(results).attrs["completed_shards"] == [0, 1, 2]
    with pytest.raises(CausalResultsError, match=r"holds causal results of another run \(seed: stored 0, requested 1"):
        causal(CausalSettings(store=llama_store, results=results, seed=1, **options))


def test_missing_efficient_attention_and_another_model_are_refused(llama_store, tmp_path, tiny_bert_folder):
    store = str(tmp_path / "store.zarr")
    shutil.copytree(llama_store, store)
    shutil.rmtree(f"{store}/efficient/simplex")
    with pytest.raises(
        CausalResultsError,
        match=r"lacks finished efficient attention for the variants \['simplex'\]: "
        r"run `effattn efficient --store .* --variants simplex` first",
    ):
        causal(CausalSettings(store=store, results=str(tmp_path / "r1.zarr"), interventions=["null:simplex"]))
    with pytest.raises(
        CausalResultsError,
        match=r"but the store was extracted with .*: pass --model with the model "
        "that wrote the store",
    ):
        causal(
            CausalSettings(
                store=store,
                results=str(tmp_path / "r2.zarr"),
                interventions=["ablate"],
                scopes=["all"],
                model=str(tiny_bert_folder),
            )
        )


def test_cuda_without_cuda_is_refused_before_a_results_folder_exists(llama_store, tmp_path, monkeypatch):
    """From Python as from the CLI: `device="cuda"` where torch has no CUDA leaves nothing behind."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "results.zarr"
    with pytest.raises(ValueError, match=r"^--device cuda: .*Nothing was written$"):
        causal(
            CausalSettings(
                store=llama_store, results=str(results), interventions=["replay"], scopes=["all"], device="cuda"
            )
        )
    assert list(tmp_path.iterdir()) == []


def test_next_token_store(tmp_path, tiny_llama_folder):
    url = str(tmp_path / "lm.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(tmp_path / "reviews.csv")),
            model=str(tiny_llama_folder),
            store=url,
            task="next-token",
            top_k=4,
            shard_size=5,
            batch_size=5,
        )
    )
    efficient(EfficientSettings(store=url, variants=["stochastic"], workers=1))
    results = str(tmp_path / "results.zarr")
    # the layer scope measures 3 spread examples: batches whose longest example is not among them
    causal(
        CausalSettings(
            store=url,
            results=results,
            interventions=["replay", "efficient:stochastic", "ablate"],
            scopes=["all", "layer"],
            scope_examples=3,
            batch_size=4,
        )
    )
    dataset = xr.open_zarr(results, consolidated=False).load()
    assert int(dataset["agreement"].sel(intervention="ablate", target="layer 1").notnull().sum()) == 3
    assert float(dataset["stored_logit_difference"].sel(intervention="replay").max()) <= TOLERANCE
    kept = dataset["agreement"].sel(intervention="efficient:stochastic")
    assert int((kept == 1).sum()) == int(kept.notnull().sum()) == 10 + 2 * 3  # all: 10 examples, layers: 3
    assert float(dataset["max_abs_logit_change"].sel(intervention="ablate").max()) > 10 * TOLERANCE
    # next-token accuracy: the share of positions whose next token is predicted, in [0, 1]
    correct = dataset["correct"].sel(intervention="replay", target="all")
    assert ((correct >= 0) & (correct <= 1)).all()
    np.testing.assert_allclose(correct.values, dataset["original_correct"].values, atol=1e-6)


@pytest.mark.integration
def test_minilm_on_real_reviews(tmp_path):
    """MiniLM (random head, so no training here) on a few rt-sentiment snippets: the exact cases hold."""
    url = str(tmp_path / "rt.zarr")
    extract(ExtractSettings(corpus="rt-sentiment", model="minilm", store=url, limit=6, train=False, batch_size=6))
    efficient(EfficientSettings(store=url, variants=["effective", "stochastic"], workers=1))
    results = str(tmp_path / "results.zarr")
    causal(
        CausalSettings(
            store=url,
            results=results,
            interventions=["replay", "efficient:effective", "efficient:stochastic", "null:effective", "ablate"],
            scopes=["all", "layer"],
        )
    )
    dataset = xr.open_zarr(results, consolidated=False).load()
    assert float(dataset["stored_logit_difference"].sel(intervention="replay").max()) <= TOLERANCE
    for variant in ("effective", "stochastic"):
        assert float(dataset["max_abs_logit_change"].sel(intervention=f"efficient:{variant}").max()) <= TOLERANCE
    layers = dataset["target_scope"] == "layer"
    np.testing.assert_allclose(
        dataset["max_abs_logit_change"].sel(intervention="null:effective").where(layers).values,
        dataset["max_abs_logit_change"].sel(intervention="ablate").where(layers).values,
        atol=TOLERANCE,
    )


def test_a_second_writer_of_the_same_results_is_refused(llama_store, tmp_path):
    from storage_schemas.store_lock import StoreLockedError, hold_store_lock

    results = str(tmp_path / "results.zarr")
    with hold_store_lock(results, "causal"), pytest.raises(StoreLockedError, match=r"is locked by effattn causal"):
        causal(CausalSettings(store=llama_store, results=results, interventions=["ablate"], scopes=["all"]))
    assert not (tmp_path / "results.zarr").exists()  # nothing was written by the refused run


def test_no_forward_pass_exceeds_forward_rows(llama_store, tmp_path, monkeypatch):
    import tasks.causal

    rows = []
    original = tasks.causal.intervened_logits

    def counting(loaded, tokens, length, replacement, target_masks, *selection):  # selection: layers, heads
        rows.append(len(length) * len(target_masks))
        return original(loaded, tokens, length, replacement, target_masks, *selection)

    monkeypatch.setattr(tasks.causal, "intervened_logits", counting)
    causal(
        CausalSettings(
            store=llama_store,
            results=str(tmp_path / "results.zarr"),
            interventions=["ablate"],
            scopes=["all", "head"],
            scope_examples=None,
            batch_size=4,
            forward_rows=3,
        )
    )
    assert max(rows) <= 3 and sum(rows) == 10 * (1 + 2 * 4)  # every example at every target, once


def test_the_head_scope_measures_ablate_or_else_a_null_part(llama_store):
    from flows.causal import recorded_causal_settings

    settings = CausalSettings(store=llama_store, results="unused.zarr")
    assert recorded_causal_settings(settings)["scope_interventions"]["head"] == ["ablate"]
    chosen = recorded_causal_settings(
        settings.model_copy(update={"interventions": ("efficient:effective", "null:effective")})
    )
    assert chosen["scope_interventions"]["head"] == ["null:effective"]


def test_read_causal_batch_trims_to_the_longest_example_and_reads_the_named_variants(llama_store):
    from storage_schemas.attention_store import open_attention_store
    from tasks.causal import read_causal_batch

    rng = np.random.default_rng(0)
    arrays = {
        "length": np.array([5, 3, 7, 2]),
        "tokens": rng.integers(0, 9, (4, 8)),
        "attention": rng.random((4, 1, 2, 8, 8)),
        "value": rng.random((4, 1, 1, 8, 2)),
        "logits": rng.random((4, 8, 3)),
        "logit_ids": rng.integers(0, 9, (4, 8, 3)),
        "label": np.arange(4),
        "efficient/effective": rng.random((4, 1, 2, 8, 8)),
        "efficient/simplex": rng.random((4, 1, 2, 8, 8)),
    }
    batch = read_causal_batch(arrays, 1, 3, "next-token", ["effective"])
    assert batch.start == 1 and batch.example_indices.tolist() == [1, 2]
    np.testing.assert_array_equal(batch.attention, arrays["attention"][1:3, :, :, :7, :7])  # Lb = 7
    np.testing.assert_array_equal(batch.value, arrays["value"][1:3, :, :, :7])
    np.testing.assert_array_equal(batch.tokens, arrays["tokens"][1:3])
    np.testing.assert_array_equal(batch.stored_logit_ids, arrays["logit_ids"][1:3])
    assert batch.label is None and list(batch.efficient) == ["effective"]
    np.testing.assert_array_equal(batch.efficient["effective"], arrays["efficient/effective"][1:3, :, :, :7, :7])
    classification = read_causal_batch(arrays, 3, 4, "classification", [])
    assert classification.attention.shape == (1, 1, 2, 2, 2) and classification.label.tolist() == [3]
    assert classification.stored_logit_ids is None and classification.efficient == {}
    # the same from a real store
    group = open_attention_store(llama_store, mode="r")
    stored = read_causal_batch(group, 4, 8, "classification", ["simplex"])
    size = int(group["length"][4:8].max())
    np.testing.assert_array_equal(stored.attention, group["attention"][4:8, :, :, :size, :size])
    np.testing.assert_array_equal(stored.efficient["simplex"], group["efficient/simplex"][4:8, :, :, :size, :size])
    np.testing.assert_array_equal(stored.stored_logits, group["logits"][4:8])


def test_stored_settings_and_names_keep_the_layout_of_earlier_results(llama_store, tmp_path, monkeypatch):
    """The `settings` attribute and the intervention names are written as before this code read interventions as
    objects (the literal below is what it wrote), so a rerun of the same command on earlier results resumes them."""
    import json

    import tasks.causal
    from storage_schemas.attention_store import open_attention_store

    results = tmp_path / "results.zarr"
    options = dict(
        interventions=[
            "replay",
            "efficient+null-noise:stochastic",
            "colspace-noise:effective",
            "minimality:effective:k=3",
        ],
        scopes=["all", "head"],
        head_interventions=["colspace-noise:effective"],
        scope_examples=3,
        seed=2,
    )
    causal(CausalSettings(store=llama_store, results=str(results), **options))
    store = open_attention_store(llama_store, mode="r").attrs.asdict()
    group = open_attention_store(llama_store, mode="r")
    names = ["replay", "efficient+null-noise:stochastic", "colspace-noise:effective", "minimality:effective:k=3"]
    expected = {
        "interventions": names,
        "scopes": ["all", "head"],
        "scope_interventions": {"all": names, "layer": [], "head": ["colspace-noise:effective"]},
        "scope_examples": 3,
        "targets": [{"name": "all", "scope": "all", "layer": -1, "head": -1}]
        + [
            {"name": f"layer {layer} head {head}", "scope": "head", "layer": layer, "head": head}
            for layer in range(2)
            for head in range(4)
        ],
        "seed": 2,
        "store_identity": {  # a store that grows (a user CSV) is named by its first run, not its corpus and size
            "weights_digest": store["model"]["weights_digest"],
            "first_run": store["runs"][0]["run_id"],
            "dtype": "float32",
            "efficient_settings": {
                variant: group[f"efficient/{variant}"].attrs["settings"] for variant in ("effective", "stochastic")
            },
        },
    }
    written = json.loads((results / "zarr.json").read_text(encoding="utf-8"))["attributes"]["settings"]
    assert json.dumps(written) == json.dumps(expected)  # the same keys, in the same order
    dataset = xr.open_zarr(results, consolidated=False)
    assert dataset["intervention"].values.tolist() == names
    assert dataset["intervention_kind"].values.tolist() == [
        "replay",
        "efficient+null-noise",
        "colspace-noise",
        "minimality",
    ]
    assert dataset["variant"].values.tolist() == ["", "stochastic", "effective", "effective"]
    assert dataset["removed_directions"].values.tolist() == [0, 0, 0, 3]

    def measured_again(*args, **kwargs):
        raise AssertionError("a rerun of a complete results dataset measured a shard again")

    monkeypatch.setattr(tasks.causal, "compute_causal_shard", measured_again)
    before = (results / "zarr.json").read_bytes()
    causal(CausalSettings(store=llama_store, results=str(results), **options))  # not refused, nothing measured again
    assert (results / "zarr.json").read_bytes() == before


def test_the_plan_parses_the_names_once(llama_store):
    from analysis.variants import variant_record
    from tasks.causal import causal_plan

    plan = causal_plan(
        CausalSettings(
            store=llama_store,
            results="unused.zarr",
            interventions=["null:simplex", "ablate"],
            scopes=["layer"],
            layer_interventions=["null:simplex"],
        )
    )
    assert plan.interventions[0].variant is variant_record("simplex")
    assert plan.layer_interventions == plan.interventions[:1]
    assert plan.head_interventions == plan.interventions[1:]  # ablate where it is run
    assert plan.efficient_variants() == ["simplex"]
    assert [target.name for target in plan.targets] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match=r"^intervention 'ablate' takes no variant, got 'simplex'$"):
        causal_plan(CausalSettings(store=llama_store, results="unused.zarr", interventions=["ablate:simplex"]))


def test_a_grown_store_measures_only_its_new_and_redone_shards_and_equals_a_fresh_run(tmp_path, tiny_llama_folder):
    corpus = write_corpus(tmp_path / "feed.csv")  # 10 rows: shards 0, 1 and a partial shard 2
    store = build_real_store(str(tmp_path / "store.zarr"), tiny_llama_folder, corpus, variants=("effective",))
    computed: list[int] = []

    def counted(job):
        computed.append(job.shard_index)
        return causal_tasks.measure_and_write_causal_shard(job)

    stage = dataclasses.replace(causal_tasks.CAUSAL_STAGE, compute_shard=counted)
    options = dict(
        interventions=["replay", "efficient:effective", "colspace-noise:effective", "ablate"],
        scopes=["all", "head"],
        head_interventions=["ablate"],
        scope_examples=4,
    )

    def stage_run(results: str, store: str = store) -> StageRun:
        settings = CausalSettings(store=store, results=results, **options)
        return StageRun(store=store, results=results, plan=causal_tasks.causal_plan(settings))

    def run(results: str, store: str = store) -> list[int]:
        computed.clear()
        run_stage(stage, stage_run(results, store))
        return list(computed)

    def complete(results: str) -> bool:
        settings = recorded_causal_settings(CausalSettings(store=store, results=results, **options))
        return causal_status(results, settings, store).complete

    results = str(tmp_path / "results.zarr")
    assert run(results) == [0, 1, 2]
    share = open_causal_results(results).attrs["scope_share"]
    assert (~np.isnan(open_causal_results(results)["agreement"][3, -1, :])).sum() == 4  # ablate at the last head
    before = {name: open_causal_results(results)[name][:] for name in ("agreement", "max_abs_logit_change")}

    later = [(f"{text} (later)", label) for text, label in REVIEW_ROWS]
    assert grow_real_store(store, tiny_llama_folder, corpus, later, variants=("effective",)) == {
        "extract": [2, 3, 4],  # the old partial shard and the new ones
        "efficient": [2, 3, 4],
    }
    assert store_layout(open_attention_store(store)).n_examples == 20
    assert not complete(results)  # the same settings: not another run, but new examples are due
    assert run(results) == [2, 3, 4]  # shards 0 and 1 are kept
    assert complete(results)
    group = open_causal_results(results)
    assert group["example"].shape == (20,) and group.attrs["scope_share"] == share  # the share is kept
    for name, values in before.items():  # the kept shards are untouched
        np.testing.assert_array_equal(group[name][:, :, :8], values[:, :, :8])
    # at the head scope: in old and new shards, exactly the examples whose keyed draw is below the share
    expected = keyed_scope_examples(open_attention_store(store)["example_identity"][:], 0, share)
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(group["agreement"][3, -1, :])), expected)

    # from scratch over the grown store (with the grown results' share): the same numbers per example
    fresh = str(tmp_path / "fresh.zarr")
    causal_tasks.create_results(stage_run(fresh))
    open_causal_results(fresh, mode="r+").attrs["scope_share"] = share
    assert run(fresh) == [0, 1, 2, 3, 4]
    grown_data = xr.open_zarr(results, consolidated=False).load()
    fresh_data = xr.open_zarr(fresh, consolidated=False).load()
    for name in (*METRICS, "injected_change_ratio", "original_correct", "source_index", "length", "label"):
        np.testing.assert_array_equal(grown_data[name].values, fresh_data[name].values, err_msg=name)
    for name in AGGREGATES:
        np.testing.assert_allclose(grown_data[name].values, fresh_data[name].values, rtol=1e-12, err_msg=name)
    assert grown_data.attrs["claims"] == fresh_data.attrs["claims"]

    # a store made from scratch over the grown corpus sorts the examples otherwise: matched by identity, the same
    # numbers (the noise is seeded by the example's identity; batches padded otherwise: round-off only)
    scratch = build_real_store(str(tmp_path / "scratch.zarr"), tiny_llama_folder, corpus, variants=("effective",))
    scratch_results = str(tmp_path / "scratch-results.zarr")
    causal_tasks.create_results(stage_run(scratch_results, scratch))
    open_causal_results(scratch_results, mode="r+").attrs["scope_share"] = share
    run(scratch_results, scratch)
    order = {bytes(row): index for index, row in enumerate(open_attention_store(scratch)["example_identity"][:])}
    matched = [order[bytes(row)] for row in open_attention_store(store)["example_identity"][:]]
    scratch_data = xr.open_zarr(scratch_results, consolidated=False).load()
    for name in (*METRICS, "injected_change_ratio", "original_correct", "length", "label"):
        np.testing.assert_allclose(
            grown_data[name].values,
            scratch_data[name].isel(example=matched).values,
            rtol=1e-5,
            atol=1e-5,
            err_msg=name,
        )
    for name in AGGREGATES:
        np.testing.assert_allclose(grown_data[name].values, scratch_data[name].values, rtol=1e-5, atol=1e-5)
