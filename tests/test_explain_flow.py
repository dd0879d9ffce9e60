"""The explanation stage (flows/explain.py, tasks/explain.py): results from a real store, resumable by shard, refusing
other settings and examples in unfinished store shards, computing again what store shards written again made stale."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError

from flows.explain import explain, recorded_explanation_settings
from flows.settings import ExplainSettings
from storage_schemas.explanation_results import ExplanationResultsError, open_explanation_results
from tasks import explain as explain_tasks
from tasks.explain import choose_examples, examples_where_efficient_differs
from tasks.stages import StageRun, run_stage
from tests.conftest import REVIEW_ROWS, save_model_folder
from tests.store_builders import build_real_store, grow_real_store, write_corpus

FEW_METHODS = ["attention:rollout", "simplex:last-layer", "integrated-gradients", "leave-one-out", "random"]


@pytest.fixture(scope="module")
def bert_store(tmp_path_factory, tiny_bert_folder) -> str:
    """Tiny BERT over 10 reviews (3 store shards of 4), with all three efficient variants."""
    folder = tmp_path_factory.mktemp("explain")
    return build_real_store(str(folder / "store.zarr"), tiny_bert_folder, write_corpus(folder / "reviews.csv"))


def test_the_cli_explains_every_method_and_answers_the_claims(bert_store, tmp_path, capsys):
    from flows.cli import main

    results = str(tmp_path / "results.zarr")
    assert main(["explain", "--store", bert_store, "--results", results, "--examples", "3", "--ig-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "simplex supports are minimal" in printed and f"results: {results}" in printed
    dataset = xr.open_zarr(results, consolidated=False).load()
    methods = dataset["explainer"].values.tolist()
    assert methods[:3] == ["attention:last-layer", "attention:all-layers", "attention:rollout"]
    assert {
        "effective:rollout",
        "stochastic:all-layers",
        "simplex:last-layer",
        "attention-norm:rollout",
        "simplex-norm:last-layer",
        "conservative-lrp",
        "random",
    } <= set(methods)
    assert dataset.sizes["example"] == 3 and dataset.attrs["completed_shards"] == [0]
    # drawn (seeded) from the examples where every variant differs from A, the same on every run
    drawn = dataset["store_example"].values.tolist()
    group = __import__("zarr").open_group(bert_store, mode="r")
    differs = examples_where_efficient_differs(group, ["effective", "stochastic", "simplex"])
    assert (
        differs[drawn].all() and drawn == choose_examples(bert_store, 3, ["effective", "stochastic", "simplex"], 0)[0]
    )
    assert dataset.attrs["draw"]["testable"] == int(differs.sum())  # a store that grows: the draw's record
    efficient = [
        index
        for index, name in enumerate(methods)
        if name.split(":")[0].split("-")[0] in ("effective", "stochastic", "simplex")
    ]
    assert (dataset["testable"].values[efficient] == 1).all()  # E differs from A on every drawn example
    assert (dataset["largest_difference"].values[efficient] > 1e-5).all()
    assert (dataset["testable"].values[methods.index("attention:rollout")] == -1).all()
    assert np.isfinite(dataset["faithfulness"].values).all()
    np.testing.assert_allclose(dataset["aopc"].values, dataset["faithfulness"].mean("k").values, atol=1e-6)
    tau = dataset["kendall_tau"].sel(explainer="leave-one-out", reference="leave-one-out").values
    several = dataset["removable_tokens"].values >= 2  # with one removable token tau is undefined
    assert np.isnan(tau[~several]).all()
    np.testing.assert_allclose(tau[several], 1.0)
    assert np.isfinite(dataset["integrated_gradients_delta"].values).all()
    # attributions only on removable tokens ([CLS] and [SEP] never)
    attribution = dataset["attribution"].sel(explainer="leave-one-out")
    assert np.isnan(attribution.isel(position=0)).all()
    assert (attribution.notnull().sum("position") == dataset["removable_tokens"]).all()
    tested = dataset["minimality_tested"] + dataset["minimality_untestable"]
    assert (tested == 8).all() and (dataset["minimality_minimal"] <= dataset["minimality_tested"]).all()
    np.testing.assert_allclose(dataset["mean_aopc"].values, dataset["aopc"].mean("example").values, rtol=1e-6)
    claims = {row["claim"]: row["verdict"] for row in dataset.attrs["claims"]}
    assert claims["efficient attention (simplex) explains at least as faithfully as raw attention (rollout)"] == (
        "not testable (n = 3 examples where E differs from A, 20 needed)"
    )  # 3 examples decide nothing
    assert (
        "norm-based efficient attention (simplex) explains at least as faithfully as norm-based attention "
        "(rollout)" in claims
    )
    assert {row["method"] for row in dataset.attrs["ranking"]} == set(methods)
    # other settings into the same results: refused with what to do, exit status 2
    assert main(["explain", "--store", bert_store, "--results", results, "--examples", "3", "--ig-steps", "9"]) == 2
    error = capsys.readouterr().err
    assert "integrated_gradients_steps: stored 8, requested 9" in error and "choose a new --results path" in error


def test_a_rerun_skips_done_shards_recomputes_a_lost_one_and_refuses_other_settings(bert_store, tmp_path):
    results = str(tmp_path / "results.zarr")
    options = dict(methods=FEW_METHODS, examples=4, shard_size=2, integrated_gradients_steps=8, minimality_rows=4)
    explain(ExplainSettings(store=bert_store, results=results, **options))
    group = open_explanation_results(results, mode="r+")
    before = {name: group[name][:] for name in ("faithfulness", "kendall_tau", "attribution", "minimality_minimal")}
    # shard 0 stays recorded done, with a sentinel that a recomputation would overwrite
    group["full_probability"][0:2] = -7.0
    # shard 1 is lost: never recorded, and holds garbage
    group["faithfulness"][..., 2:4] = 99.0
    group["attribution"][:, 2:4] = 99.0
    group.attrs["completed_shards"] = [0]
    explain(ExplainSettings(store=bert_store, results=results, **options))
    group = open_explanation_results(results)
    assert group.attrs["completed_shards"] == [0, 1]
    assert (group["full_probability"][0:2] == -7.0).all()  # not recomputed
    for name, values in before.items():
        np.testing.assert_array_equal(group[name][:], values, err_msg=name)  # recomputed identically
    with pytest.raises(ExplanationResultsError, match="integrated_gradients_steps: stored 8, requested 16"):
        explain(ExplainSettings(store=bert_store, results=results, **{**options, "integrated_gradients_steps": 16}))
    with pytest.raises(ExplanationResultsError, match="methods: stored"):
        explain(ExplainSettings(store=bert_store, results=results, **{**options, "methods": FEW_METHODS[:2]}))
    with pytest.raises(ValidationError, match="examples\n  Input should be greater than 0"):
        ExplainSettings(store=bert_store, results=results, **{**options, "examples": -2})


def test_a_store_of_short_texts_explains_nothing_and_decides_no_claim(tmp_path, capsys):
    """Every text no longer than the head dim (64 here): E = A everywhere, so no example can tell an efficient
    explanation from raw attention's; every explanation claim is "not testable", none "holds"."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from flows.cli import main

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=30522, hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64)
    ).eval()
    folder = save_model_folder(model, tmp_path / "wide-heads")
    store = build_real_store(
        str(tmp_path / "store.zarr"),
        folder,
        write_corpus(tmp_path / "reviews.csv"),
        variants=("effective", "stochastic"),
    )
    results = str(tmp_path / "results.zarr")
    assert main(["explain", "--store", store, "--results", results, "--examples", "5", "--ig-steps", "4"]) == 0
    printed = capsys.readouterr().out
    dataset = xr.open_zarr(results, consolidated=False).load()
    assert dataset.sizes["example"] == 0
    rule = (
        "examples where effective, stochastic differ from A in the last layer (a head with a null space "
        "and ||A - E|| / ||A|| > 1e-05)"
    )
    assert dataset.attrs["draw"] == {  # a store that grows: the whole record beside its settings
        "asked": 5,
        "drawn": 0,
        "testable": 0,
        "not_testable": 10,
        "rule": rule,
        "share": 1.0,
    }
    assert dataset.attrs["settings"]["draw"] == {"asked": 5, "rule": rule, "selection": "keyed-share"}
    verdicts = [row["verdict"] for row in dataset.attrs["claims"]]
    assert len(verdicts) == 12 and all(verdict.startswith("not testable (n = 0") for verdict in verdicts)
    assert "holds" not in printed


def test_an_unfinished_extraction_is_refused_naming_the_shards_and_the_command(tmp_path, tiny_bert_folder, capsys):
    """An extraction interrupted after its first shard: `effattn explain` refuses it (exit status 2, the shards and
    the command in one line) and writes no results; the sample is the one of the finished store."""
    from flows.cli import main
    from tasks.extraction import prepare_store
    from tests.store_builders import extract_shards

    corpus, store = write_corpus(tmp_path / "reviews.csv"), str(tmp_path / "store.zarr")
    todo, num_labels = prepare_store.fn(
        store, str(corpus), str(tiny_bert_folder), 24, None, "float32", "cpu", None, None, 4, 0
    )
    assert todo == [0, 1, 2]
    extract_shards(store, [0], tiny_bert_folder, num_labels)
    results = str(tmp_path / "results.zarr")
    assert main(["explain", "--store", store, "--results", results, "--examples", "4"]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        f"effattn explain: error: {store} is not ready for `effattn explain` (the examples to explain lie in "
        "unfinished shards, which read as zeros, so the results would be wrong): extraction shards [1, 2] (examples "
        f"4 to 9) are not complete: finish them by running the `effattn extract --corpus {corpus} --model "
        f"{tiny_bert_folder} --store {store} ...` command that created the store again, with the same options (it "
        "resumes and writes only the missing shards); then run `effattn explain` again"
    )
    assert not Path(results).exists()


def test_a_repaired_store_shard_makes_exactly_the_explanation_shards_of_its_examples_stale(
    bert_store, tiny_bert_folder, tmp_path, capsys, caplog
):
    """Damage -> `verify --repair` -> explain refuses -> extract -> efficient -> explain computes again exactly the
    results' shard whose examples lie in the repaired store shard, identically; the other shard is kept."""
    import zarr

    from flows.cli import main
    from storage_schemas.attention_store import IncompleteInputError, open_attention_store
    from storage_schemas.durable_writes import shard_file_paths
    from storage_schemas.explanation_results import PER_EXAMPLE_ARRAYS, explanation_completed_shards

    def rows(name: str, values: np.ndarray, examples: list[int]) -> np.ndarray:
        return np.take(values, examples, axis=PER_EXAMPLE_ARRAYS[name][0].index("example"))

    store = str(tmp_path / "store.zarr")
    shutil.copytree(bert_store, store)
    results = str(tmp_path / "results.zarr")
    # results shard 0: examples 2, 3 (store shard 0); results shard 1: examples 4, 6 (store shard 1)
    options = dict(methods=FEW_METHODS, examples=4, shard_size=2, integrated_gradients_steps=8, minimality_rows=4)
    explain(ExplainSettings(store=store, results=results, **options))
    group = open_explanation_results(results)
    assert group["store_example"][:].tolist() == [2, 3, 4, 6]  # the keyed draw (a store that grows)
    before = {name: group[name][:] for name in PER_EXAMPLE_ARRAYS}
    (attention_file,) = shard_file_paths(zarr.open_group(store), ["attention"], 0)
    with open(attention_file, "r+b") as handle:
        handle.seek(attention_file.stat().st_size // 2)
        handle.write(b"\xff\xff\xff\xff")
    assert main(["verify", "--repair", store]) == 1
    capsys.readouterr()
    with pytest.raises(
        IncompleteInputError,
        match=re.escape("extraction shard [0] (examples 0 to 3) is not complete")
        + ".*"
        + re.escape(
            f"efficient/simplex shard [0] (examples 0 to 3) is not computed: run `effattn efficient --store {store} "
            "--variants simplex` after the extraction is complete; then run `effattn explain` again"
        ),
    ):
        explain(ExplainSettings(store=store, results=results, **options))

    build_real_store(store, tiny_bert_folder, Path(bert_store).parent / "reviews.csv")  # extract, efficient: resume
    group = open_explanation_results(results, mode="r+")
    assert explanation_completed_shards(group, open_attention_store(store)) == [1]
    group["full_probability"][:] = -7.0  # a mark: a shard computed again loses it
    with caplog.at_level(logging.WARNING, logger="tasks.explain"):
        explain(ExplainSettings(store=store, results=results, **options))
    assert (
        f"{results}: explanation shards [0] were computed from store shards that were unfinished then or "
        "written again since: computing them again" in caplog.messages
    )
    group = open_explanation_results(results)
    assert explanation_completed_shards(group, open_attention_store(store)) == [0, 1]
    assert group["full_probability"][2:].tolist() == [-7.0, -7.0]  # results shard 1: its store shards untouched
    for name, values in before.items():  # results shard 0: computed again, from the same tensors, identically
        np.testing.assert_array_equal(rows(name, group[name][:], [0, 1]), rows(name, values, [0, 1]), err_msg=name)
    assert "claims" in group.attrs


def test_a_decoder_store_is_explained_at_its_last_token(tmp_path, tiny_llama_folder):
    store = build_real_store(
        str(tmp_path / "llama.zarr"), tiny_llama_folder, write_corpus(tmp_path / "r.csv"), variants=("simplex",)
    )
    results = str(tmp_path / "results.zarr")
    explain(ExplainSettings(store=store, results=results, examples=2, integrated_gradients_steps=8, minimality_rows=4))
    dataset = xr.open_zarr(results, consolidated=False).load()
    assert "simplex:rollout" in dataset["explainer"].values.tolist()
    length = dataset["length"].values
    attribution = dataset["attribution"].sel(explainer="leave-one-out").values
    for row, size in enumerate(length):
        assert np.isnan(attribution[row, size - 1])  # the pooled last token is never removed
    assert np.isfinite(dataset["faithfulness"].values).all()
    assert (dataset["minimality_tested"] + dataset["minimality_untestable"] == 4).all()


def test_a_next_token_store_is_explained_at_the_last_position(tmp_path, tiny_llama_folder):
    from tasks.extraction import prepare_store
    from tests.store_builders import compute_variants, extract_shards

    store = str(tmp_path / "lm.zarr")
    todo, num_labels = prepare_store.fn(
        store,
        str(write_corpus(tmp_path / "r.csv")),
        str(tiny_llama_folder),
        24,
        None,
        "float32",
        "cpu",
        None,
        None,
        5,
        0,
        task="next-token",
        top_k=4,
    )
    extract_shards(store, todo, tiny_llama_folder, num_labels, task="next-token", batch_size=5)
    compute_variants(store, ("stochastic",))
    results = str(tmp_path / "results.zarr")
    explain(
        ExplainSettings(
            store=store,
            results=results,
            examples=2,
            integrated_gradients_steps=4,
            methods=["attention:last-layer", "stochastic:rollout", "integrated-gradients", "leave-one-out"],
        )
    )
    dataset = xr.open_zarr(results, consolidated=False).load()
    assert (dataset["target"] >= 0).all() and (dataset["target"] < 30522).all()  # a vocabulary id
    assert (dataset["full_probability"] > 0).all()
    for row, size in enumerate(dataset["length"].values):
        assert np.isnan(dataset["attribution"].values[:, row, size - 1]).all()
    assert np.isfinite(dataset["faithfulness"].values).all()
    assert (dataset["minimality_tested"] == -1).all()  # no simplex: not measured
    assert [row["claim"] for row in dataset.attrs["claims"]] == []  # stochastic:rollout has no raw rollout to face


def test_a_grown_store_explains_only_its_new_examples_and_equals_a_fresh_run(bert_store, tiny_bert_folder, tmp_path):
    from storage_schemas.attention_store import open_attention_store
    from storage_schemas.explanation_results import PER_EXAMPLE_ARRAYS, explanation_status

    store, corpus = str(tmp_path / "store.zarr"), tmp_path / "reviews.csv"
    shutil.copytree(bert_store, store)
    shutil.copy(Path(bert_store).parent / "reviews.csv", corpus)
    computed: list[int] = []

    def counted(job):
        computed.append(job.shard_index)
        return explain_tasks.explain_and_write_shard(job)

    stage = dataclasses.replace(explain_tasks.EXPLAIN_STAGE, compute_shard=counted)
    every = dict(methods=FEW_METHODS, shard_size=2, integrated_gradients_steps=8, minimality_rows=4)

    def settings_of(results: str, at: str = store, **options) -> dict:
        return recorded_explanation_settings(ExplainSettings(store=at, results=results, **{**every, **options}))

    def run(results: str, at: str = store, **options) -> list[int]:
        computed.clear()
        run_stage(stage, StageRun(store=at, results=results, plan=settings_of(results, at, **options)))
        return list(computed)

    results, few = str(tmp_path / "results.zarr"), str(tmp_path / "few.zarr")
    settings = settings_of(results)
    assert settings["examples"] == [] and settings["draw"]["selection"] == "keyed-share"  # the results hold them
    first = run(results)
    held = open_explanation_results(results)["store_example"][:].tolist()
    assert first == list(range(-(-len(held) // 2))) and held == sorted(held)
    # three of the candidates (no computation: the results are only created)
    explain_tasks.create_explanations(StageRun(store=store, results=few, plan=settings_of(few, examples=3)))
    few_share = open_explanation_results(few).attrs["explain_share"]
    few_examples = open_explanation_results(few)["store_example"][:].tolist()
    assert len(few_examples) == 3 and set(few_examples) <= set(held)
    before = {name: open_explanation_results(results)[name][:] for name in PER_EXAMPLE_ARRAYS}

    later = [(f"{text} (later)", label) for text, label in REVIEW_ROWS]
    assert grow_real_store(store, tiny_bert_folder, corpus, later)["extract"] == [2, 3, 4]
    assert settings_of(results) == settings  # growth is not another run
    assert not explanation_status(results, settings, store).complete
    group = open_explanation_results(results)
    after = run(results)
    group = open_explanation_results(results)
    explained = group["store_example"][:].tolist()
    assert explained[: len(held)] == held and min(explained[len(held) :], default=20) >= 10  # appended, in order
    # computed again: the results shards holding an example of the redone store shard 2 (examples 8..11), the old
    # partial results shard, and the new ones; every other shard is kept
    expected = sorted(
        {index // 2 for index, example in enumerate(explained) if 8 <= example < 12 or index >= len(held)}
        | ({len(held) // 2} if len(held) % 2 else set())
    )
    assert after == expected and 0 not in after
    assert explanation_status(results, settings, store).complete
    kept = [index for index in range(len(held)) if index // 2 not in after]
    for name, values in before.items():
        axis = PER_EXAMPLE_ARRAYS[name][0].index("example")
        np.testing.assert_array_equal(
            np.take(group[name][:], kept, axis=axis), np.take(values, kept, axis=axis), err_msg=name
        )
    # the three keep their place and the share; new examples join by the same keyed rule
    explain_tasks.create_explanations(StageRun(store=store, results=few, plan=settings_of(few, examples=3)))
    grown_few = open_explanation_results(few)
    assert grown_few.attrs["explain_share"] == few_share
    assert grown_few["store_example"][:3].tolist() == few_examples
    assert set(grown_few["store_example"][:].tolist()) <= set(explained)

    # from scratch over the grown store: the same examples in the same order, the same numbers
    fresh = str(tmp_path / "fresh.zarr")
    assert run(fresh) == list(range(-(-len(explained) // 2)))
    grown_data = xr.open_zarr(results, consolidated=False).load()
    fresh_data = xr.open_zarr(fresh, consolidated=False).load()
    for name in (*PER_EXAMPLE_ARRAYS, "store_example", "length", "label"):
        np.testing.assert_array_equal(grown_data[name].values, fresh_data[name].values, err_msg=name)
    for name in ("mean_aopc", "mean_kendall_tau", "minimal_share"):
        np.testing.assert_allclose(grown_data[name].values, fresh_data[name].values, rtol=1e-12, err_msg=name)
    assert grown_data.attrs["claims"] == fresh_data.attrs["claims"]

    # a store made from scratch over the grown corpus sorts its examples otherwise: matched by identity, the same
    # examples are explained with the same numbers (the random ranking and the sampled rows are seeded by identity)
    scratch = build_real_store(str(tmp_path / "scratch.zarr"), tiny_bert_folder, corpus)
    scratch_results = str(tmp_path / "scratch-results.zarr")
    run(scratch_results, scratch)
    identity_of = {
        url: [bytes(row) for row in open_attention_store(url)["example_identity"][:]] for url in (store, scratch)
    }
    scratch_data = xr.open_zarr(scratch_results, consolidated=False).load()
    position = {
        identity_of[scratch][example]: index for index, example in enumerate(scratch_data["store_example"].values)
    }
    matched = [position[identity_of[store][example]] for example in grown_data["store_example"].values]
    assert len(matched) == scratch_data.sizes["example"]
    for name in (*PER_EXAMPLE_ARRAYS, "length", "label"):
        np.testing.assert_allclose(
            grown_data[name].values,
            scratch_data[name].isel(example=matched).values,
            rtol=1e-5,
            atol=1e-5,
            err_msg=name,
        )
