"""flows.pipeline.run_pipeline and `effattn run` on the tiny BERT of conftest and the 10-review CSV: the first call
runs every stage, a second one skips them all without touching the store, and changed inputs are not skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.cli import main, parse_settings
from flows.pipeline import STAGES, run_pipeline
from flows.settings import EXTRACTION_SHAPE, ExtractSettings, PipelineSettings
from flows.view import view_command
from storage_schemas.attention_store import AttentionStoreError, completed_shards, open_attention_store
from storage_schemas.causal_results import open_causal_results
from storage_schemas.efficient_store import efficient_completed_shards
from storage_schemas.pipeline_runs import EXTRACTION_INPUTS_ATTRIBUTE, local_input_fingerprint, run_name
from tasks import dask_cluster
from tests.conftest import write_reviews_csv

# 6 of the 10 reviews, shards of 4 (two shards), texts cut at 16 tokens (> head dim 8 of the tiny models).
RUN = dict(limit=6, max_length=16, shard_size=4, batch_size=3, variants=["effective"], workers=1)


def file_mtimes(folder: str) -> dict[str, int]:
    """Every file under `folder` -> its modification time (ns)."""
    return {str(path): path.stat().st_mtime_ns for path in Path(folder).rglob("*") if path.is_file()}


def statuses(record: dict) -> dict[str, str]:
    return {stage: entry["status"] for stage, entry in record["stages"].items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_bert_folder):
    folder = tmp_path_factory.mktemp("pipeline")
    corpus = write_reviews_csv(folder / "reviews.csv")
    arguments = dict(corpus=str(corpus), model=str(tiny_bert_folder), run_dir=str(folder / "runs"), **RUN)
    started_clusters = []
    start_local_cluster = dask_cluster.local_cluster

    def counted_local_cluster(workers):
        started_clusters.append(workers)
        return start_local_cluster(workers)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dask_cluster, "local_cluster", counted_local_cluster)
        record = run_pipeline(PipelineSettings(**arguments))
    return arguments, {**record, "started_clusters": started_clusters}


def test_store_names_are_unchanged_by_the_settings_objects():
    """The non-default extraction settings name the store: a run with the defaults gets no digest, and one with
    --max-length 16 the digest that the code before the settings objects gave it (so a rerun finds its store)."""
    assert PipelineSettings().non_default_extraction_shape() == {}
    shape = PipelineSettings(max_length=16, split="all").non_default_extraction_shape()
    assert shape == {"max_length": 16, "split": "all"}
    assert run_name("rt-sentiment", "minilm", 300, shape) == "rt-sentiment-minilm-300-40d55ba0"
    # the extraction stage's defaults are the pipeline's
    assert {
        name: ExtractSettings.model_fields[name].default for name in EXTRACTION_SHAPE
    } == PipelineSettings().extraction_shape()


def test_first_call_runs_every_available_stage(first_run, tiny_bert_folder):
    arguments, record = first_run
    assert list(record["stages"]) == list(STAGES)
    status = statuses(record)
    # the tiny BERT folder has a (random) classification head: nothing to fine-tune
    assert status["train"] == "not needed"
    assert status["extract"] == "ran" and status["efficient"] == "ran"
    assert status["causal"] == "ran" and status["report"] == "ran"
    # --workers 1: extract, efficient and causal ran on one LocalCluster, started once for the run
    assert record["started_clusters"] == [1]
    assert Path(record["report"]).is_file() and record["report"].endswith("index.html")
    assert {row["claim"] for row in record["claims"]} >= {"sufficient (effective)", "necessary (effective)"}
    # a corpus file grows: its name and settings name the outputs, not its content
    name = run_name(arguments["corpus"], arguments["model"], 6, {"max_length": 16})
    assert name.startswith(f"reviews-{tiny_bert_folder.name}-6-")
    assert record["store"] == f"{arguments['run_dir']}/{name}.zarr"
    group = open_attention_store(record["store"])
    assert completed_shards(group) == [0, 1]
    assert efficient_completed_shards(group, "effective") == [0, 1]
    assert "stochastic" not in group["efficient"]
    assert group.attrs[EXTRACTION_INPUTS_ATTRIBUTE]["limit"] == 6
    summary = record["efficient_summary"]["effective"]
    assert summary["blocks"] == 6 * 2 * 4  # examples x layers x heads
    assert summary["max_output_residual"] < 1e-6  # effective attention keeps the output


def test_second_call_skips_train_extract_and_efficient_and_touches_nothing(first_run):
    arguments, first = first_run
    before = file_mtimes(first["store"])
    record = run_pipeline(PipelineSettings(**arguments))
    status = statuses(record)
    assert {stage: status[stage] for stage in ("train", "extract", "efficient")} == {
        "train": "skipped",
        "extract": "skipped",
        "efficient": "skipped",
    }
    assert record["stages"]["extract"]["detail"] == "all 2 shards extracted for the same inputs"
    assert record["store"] == first["store"]
    assert file_mtimes(first["store"]) == before
    assert record["efficient_summary"] == first["efficient_summary"]


def test_second_call_skips_causal_and_report_until_the_results_change(first_run):
    arguments, first = first_run
    report_files = file_mtimes(str(Path(first["report"]).parent))
    record = run_pipeline(PipelineSettings(**arguments))
    assert statuses(record)["causal"] == "skipped" and statuses(record)["report"] == "skipped"
    assert statuses(record)["explain"] == "skipped"
    assert file_mtimes(str(Path(first["report"]).parent)) == report_files
    assert record["claims"] == first["claims"]
    # the results are summarised again (e.g. an interrupted run finished them): the report is drawn again
    from storage_schemas.causal_results import open_causal_results

    open_causal_results(first["results"], mode="r+").attrs["created"] = "2000-01-01T00:00:00+00:00"
    assert statuses(run_pipeline(PipelineSettings(**arguments)))["report"] == "ran"


def test_effattn_run_prints_the_stages_the_summary_and_the_paths(first_run, capsys):
    arguments, first = first_run
    argv = [
        "run",
        "--corpus",
        arguments["corpus"],
        "--model",
        arguments["model"],
        "--run-dir",
        arguments["run_dir"],
        "--limit",
        "6",
        "--max-length",
        "16",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--variants",
        "effective",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^extract +skipped +- +all 2 shards extracted for the same inputs$", printed, re.MULTILINE)
    assert re.search(r"^efficient +skipped ", printed, re.MULTILINE)
    assert re.search(r"^effective +48 +", printed, re.MULTILINE)  # the summary row of the variant: 48 blocks
    assert f"attention store: {first['store']}\n" in printed
    identities = printed.index("identity checks: these hold by construction")
    assert re.search(r"^sufficient \(effective\) +holds +largest \|Δlogit\| ", printed[identities:], re.MULTILINE)
    assert f"report:          {first['report']}\n" in printed
    assert f"browse it:       {view_command(first['store'], first['results'], first['explanations'])}\n" in printed


def test_changed_inputs_are_not_skipped(first_run):
    arguments, first = first_run
    first_store_files = file_mtimes(first["store"])
    # another limit: another store, every stage runs
    more = run_pipeline(PipelineSettings(**{**arguments, "limit": 8}))
    assert more["store"] != first["store"] and "-8-" in more["store"]
    assert statuses(more)["extract"] == "ran" and statuses(more)["efficient"] == "ran"
    assert completed_shards(open_attention_store(more["store"])) == [0, 1]
    # one more variant: the extraction is skipped, only the new variant is computed
    effective_files = file_mtimes(f"{more['store']}/efficient/effective")
    wider = run_pipeline(PipelineSettings(**{**arguments, "limit": 8, "variants": ["effective", "stochastic"]}))
    assert statuses(wider)["extract"] == "skipped" and statuses(wider)["efficient"] == "ran"
    assert efficient_completed_shards(open_attention_store(more["store"]), "stochastic") == [0, 1]
    assert file_mtimes(f"{more['store']}/efficient/effective") == effective_files
    assert set(wider["efficient_summary"]) == {"effective", "stochastic"}
    # an analysis of other variants gets its own results
    assert wider["results"] == more["store"].removesuffix(".zarr") + "-effective+stochastic.results.zarr"
    # the first store was not touched by any of this
    assert file_mtimes(first["store"]) == first_store_files


def test_results_of_other_causal_settings_are_refused_with_what_to_do_and_kept(first_run):
    """E.g. results made by an earlier effattn whose defaults differed: never overwritten, and the message says how
    to measure again."""
    arguments, first = first_run
    before = file_mtimes(first["results"])
    with pytest.raises(
        ValueError,
        match=re.escape(f"{first['results']} holds causal results made with other settings")
        + r".*delete it to measure again.*--results PATH",
    ):
        run_pipeline(PipelineSettings(**{**arguments, "scope_examples": 1}))
    assert file_mtimes(first["results"]) == before


def test_a_run_recorded_before_the_settings_objects_is_skipped_not_refused(first_run):
    """The store and results of the first run get the settings attributes as the code before flows/settings.py
    wrote them (spelled out here by hand); rerunning the same run skips every stage instead of recomputing the
    store or refusing the results."""
    arguments, first = first_run
    group = open_attention_store(first["store"], mode="r+")
    group.attrs[EXTRACTION_INPUTS_ATTRIBUTE] = {
        "corpus": arguments["corpus"],
        "corpus_fingerprint": local_input_fingerprint(arguments["corpus"]),
        "model": arguments["model"],
        "model_fingerprint": local_input_fingerprint(arguments["model"]),
        "limit": 6,
        "max_length": 16,
        "seed": 0,
        "dtype": "float32",
        "task": "classification",
        "top_k": 10,
        "split": None,
        "train": True,
        "epochs": 1,
        "text_column": None,
        "label_column": None,
    }
    group["efficient/effective"].attrs["settings"] = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}
    results = open_causal_results(first["results"], mode="r+")
    recorded = results.attrs["settings"]
    # the keys and values the earlier causal_settings(store, variants=..., scopes=..., ...) recorded
    assert set(recorded) == {
        "interventions",
        "scopes",
        "scope_interventions",
        "scope_examples",
        "targets",
        "seed",
        "store_identity",
    }
    names = recorded["interventions"]
    old = {
        "interventions": names,
        "scopes": ["all", "layer", "head"],
        "scope_interventions": {
            "all": names,
            "layer": [name for name in names if name.split(":")[0] in ("efficient", "null", "uniform", "ablate")],
            "head": ["ablate"],
        },
        "scope_examples": 32,
        "targets": [{"name": "all", "scope": "all", "layer": -1, "head": -1}]
        + [{"name": f"layer {layer}", "scope": "layer", "layer": layer, "head": -1} for layer in range(2)]
        + [
            {"name": f"layer {layer} head {head}", "scope": "head", "layer": layer, "head": head}
            for layer in range(2)
            for head in range(4)
        ],
        "seed": 0,
        "store_identity": {  # a user CSV's store grows: named by its first run, not its corpus digest and size
            "weights_digest": group.attrs["model"]["weights_digest"],
            "first_run": group.attrs["runs"][0]["run_id"],
            "dtype": "float32",
            "efficient_settings": {"effective": {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}},
        },
    }
    results.attrs["settings"] = old
    record = run_pipeline(PipelineSettings(**arguments))
    assert {stage: entry["status"] for stage, entry in record["stages"].items()} == {
        "train": "skipped",
        "extract": "skipped",
        "efficient": "skipped",
        "causal": "skipped",
        "explain": "skipped",
        "report": "skipped",
    }
    _, (settings,) = parse_settings(
        [
            "run",
            "--corpus",
            arguments["corpus"],
            "--model",
            arguments["model"],
            "--run-dir",
            arguments["run_dir"],
            "--limit",
            "6",
            "--max-length",
            "16",
            "--shard-size",
            "4",
            "--batch-size",
            "3",
            "--variants",
            "effective",
            "--workers",
            "1",
        ]
    )
    assert settings == PipelineSettings(**arguments)  # the same command as the run above


def test_other_settings_into_an_explicit_store_are_refused_not_skipped(first_run):
    arguments, first = first_run
    with pytest.raises(
        AttentionStoreError, match=re.escape("extraction.requested_max_length: store has 16, this run has 20")
    ):
        run_pipeline(PipelineSettings(**{**arguments, "max_length": 20, "store": first["store"]}))


def test_a_grown_corpus_file_keeps_its_outputs_and_retrain_starts_the_next_generation(tmp_path, tiny_bert_folder):
    from tests.conftest import REVIEW_ROWS
    from tests.test_extract_flow import write_rows

    corpus = write_rows(tmp_path / "reviews.csv", REVIEW_ROWS[:6])
    arguments = dict(
        corpus=str(corpus), model=str(tiny_bert_folder), run_dir=str(tmp_path / "runs"), **{**RUN, "limit": None}
    )
    first = run_pipeline(PipelineSettings(**arguments))
    first_shard = file_mtimes(f"{first['store']}/attention/c/0")
    write_rows(corpus, REVIEW_ROWS)  # 4 rows appended
    grown = run_pipeline(PipelineSettings(**arguments))
    assert grown["store"] == first["store"] and grown["results"] == first["results"] and grown["examples"] == 10
    status = statuses(grown)
    assert status["extract"] == "ran" and status["efficient"] == "ran" and status["causal"] == "ran"
    assert file_mtimes(f"{first['store']}/attention/c/0") == first_shard  # the full first shard was kept
    # --retrain: the next generation, which later runs follow
    retrained = run_pipeline(PipelineSettings(**arguments, retrain=True))
    assert retrained["store"] == first["store"].removesuffix(".zarr") + "-g2.zarr"
    assert statuses(retrained)["extract"] == "ran" and retrained["examples"] == 10
    again = run_pipeline(PipelineSettings(**arguments))
    assert again["store"] == retrained["store"] and set(statuses(again).values()) <= {"skipped", "not needed"}
    with pytest.raises(ValueError, match="--retrain starts a new store for a corpus that grows"):
        run_pipeline(PipelineSettings(**{**arguments, "corpus": "rt-sentiment", "retrain": True}))


def test_a_repaired_shard_is_extracted_analysed_and_measured_again_by_the_next_run(first_run, tmp_path, capsys):
    """`verify --repair` of a damaged attention shard, then the same `run`: extraction, efficient stage and causal
    stage each redo exactly that shard (the results' other shard is kept), the explanation stage computes again its
    one shard (whose examples 1 to 5, those where E differs from A, lie in store shards 0 and 1), and the report is
    drawn again."""
    import shutil

    import numpy as np
    import zarr

    from storage_schemas.causal_results import causal_completed_shards, open_causal_results
    from storage_schemas.durable_writes import shard_file_paths
    from storage_schemas.explanation_results import explanation_completed_shards, open_explanation_results

    arguments, first = first_run
    run_dir = str(tmp_path / "runs")
    shutil.copytree(arguments["run_dir"], run_dir)
    copied = {key: first[key].replace(arguments["run_dir"], run_dir) for key in ("store", "results", "explanations")}
    explained = zarr.open_group(copied["explanations"])["full_probability"][:]
    assert zarr.open_group(copied["explanations"])["store_example"][:].tolist() == [1, 2, 3, 4, 5]
    reference = zarr.open_group(copied["results"])["agreement"][:]
    (attention_file,) = shard_file_paths(zarr.open_group(copied["store"]), ["attention"], 1)
    with open(attention_file, "r+b") as handle:
        handle.seek(attention_file.stat().st_size // 2)
        handle.write(b"\xff\xff\xff\xff")
    assert main(["verify", "--repair", copied["store"]]) == 1
    capsys.readouterr()
    zarr.open_group(copied["results"], mode="r+")["agreement"][...] = 7.0  # a mark: a shard measured again loses it
    zarr.open_group(copied["explanations"], mode="r+")["full_probability"][...] = 7.0  # likewise

    record = run_pipeline(PipelineSettings(**{**arguments, "run_dir": run_dir}))
    status = statuses(record)
    assert {stage: status[stage] for stage in ("extract", "efficient", "causal", "explain", "report")} == {
        "extract": "ran",
        "efficient": "ran",
        "causal": "ran",
        "explain": "ran",
        "report": "ran",
    }
    agreement = zarr.open_group(copied["results"])["agreement"][:]
    np.testing.assert_array_equal(agreement[:, :, 4:], reference[:, :, 4:])  # shard 1: measured again
    assert (agreement[:, :, :4] == 7.0).all()  # shard 0: its inputs were untouched, kept
    assert causal_completed_shards(open_causal_results(copied["results"]), open_attention_store(copied["store"])) == [
        0,
        1,
    ]
    assert efficient_completed_shards(open_attention_store(copied["store"]), "effective") == [0, 1]
    np.testing.assert_array_equal(zarr.open_group(copied["explanations"])["full_probability"][:], explained)
    assert explanation_completed_shards(
        open_explanation_results(copied["explanations"]), open_attention_store(copied["store"])
    ) == [0]


def test_the_first_call_explains_and_the_explanation_claims_join_the_table(first_run):
    import xarray as xr

    _, record = first_run
    assert statuses(record)["explain"] == "ran"
    assert record["explanations"] == record["results"].replace(".results.zarr", ".explanations.zarr")
    explanations = xr.open_zarr(record["explanations"], consolidated=False)
    draw = explanations.attrs["draw"]  # a store of a user corpus grows: the draw's counts beside its settings
    assert draw["asked"] == 32 and explanations.sizes["example"] == draw["drawn"] == draw["testable"] <= 6
    assert draw["testable"] + draw["not_testable"] == 6
    claims = {row["claim"]: row["verdict"] for row in record["claims"]}
    assert claims[
        "efficient attention (effective) explains at least as faithfully as raw attention (rollout)"
    ].startswith("not testable (n = ")  # 6 examples at most: fewer than the 20 a verdict needs
    # what the studies page shows comes from the results, as the explanation stage wrote it
    assert record["comparisons"] == explanations.attrs["comparisons"] and len(record["comparisons"]) == 6
    assert "Does attention explain the prediction?" in Path(record["report"]).read_text(encoding="utf-8")


# --- --layers / --heads: a store of two of three layers (and two of four heads) through every stage -----------------
# The tiny Llama with 3 layers; heads 2 and 3 read kv head 1 only, so the stored kv head is not the model's first.
SELECTION_RUN = dict(
    limit=4, max_length=16, shard_size=4, batch_size=4, variants=["effective"], workers=1, scope_examples=None
)
LAYER_METRICS = ("agreement", "max_abs_logit_change", "kl_divergence")


@pytest.fixture(scope="module")
def selection_runs(tmp_path_factory):
    """(full run, --layers 0,2 run, --layers 0,2 --heads 2,3 run) of the same examples."""
    from tests.conftest import save_model_folder, tiny_llama

    folder = tmp_path_factory.mktemp("selection")
    model = save_model_folder(tiny_llama(layers=3), folder / "tiny-llama-3")
    corpus = write_reviews_csv(folder / "reviews.csv")
    common = dict(corpus=str(corpus), model=str(model), run_dir=str(folder / "runs"), **SELECTION_RUN)
    full = run_pipeline(PipelineSettings(**common, explain_examples=0))
    layers = run_pipeline(PipelineSettings(**common, layers="0,2", explain_examples=0))
    heads = run_pipeline(PipelineSettings(**common, layers="0,2", heads="2,3"))
    return full, layers, heads


def _results(record):
    import xarray as xr

    return xr.open_zarr(record["results"], consolidated=False)


def test_a_selection_store_holds_exactly_the_chosen_layers_and_heads(selection_runs):
    import numpy as np

    from storage_schemas.inspection import describe_attention_store
    from storage_schemas.verification import verify_store

    full, _, chosen = selection_runs
    assert len({record["store"] for record in selection_runs}) == 3  # a selection gets its own store name
    whole, part = open_attention_store(full["store"]), open_attention_store(chosen["store"])
    assert part.attrs["selection"] == {
        "layers": [0, 2],
        "heads": [2, 3],
        "kv_heads": [1],
        "model_layers": 3,
        "model_heads": 4,
        "model_kv_heads": 2,
    }
    assert whole.attrs["selection"]["layers"] == [0, 1, 2]  # recorded for every new store
    assert part.attrs["layout"]["layers"] == 2 and part.attrs["layout"]["heads"] == 2
    assert part.attrs["layout"]["kv_heads"] == 1
    np.testing.assert_array_equal(part["attention"][:], whole["attention"][:][:, [0, 2]][:, :, [2, 3]])
    np.testing.assert_array_equal(part["value"][:], whole["value"][:][:, [0, 2]][:, :, [1]])
    np.testing.assert_array_equal(part["w_out"][:], whole["w_out"][:][[0, 2]][:, [2, 3]])
    np.testing.assert_array_equal(part["out_bias"][:], whole["out_bias"][:][[0, 2]])
    # efficient attention of each stored head used its own kv head (kv head 1 of the model, the only one stored)
    np.testing.assert_allclose(
        part["efficient/effective"][:], whole["efficient/effective"][:][:, [0, 2]][:, :, [2, 3]], atol=1e-6, rtol=0
    )
    assert chosen["efficient_summary"]["effective"]["blocks"] == 4 * 2 * 2
    assert chosen["efficient_summary"]["effective"]["max_output_residual"] < 1e-6
    assert "  captured: 2 of 3 layers (0, 2), 2 of 4 heads (2, 3)\n" in describe_attention_store(chosen["store"])
    report = verify_store(chosen["store"])
    assert report.ok, report.text()
    assert "the store holds 2 of 3 layers (0, 2), 2 of 4 heads (2, 3)" in report.text()


def test_causal_targets_of_a_selection_are_the_models_layers_and_heads(selection_runs):
    _, layers, chosen = selection_runs
    part = _results(chosen)
    scope, layer, head = (part[name].values.tolist() for name in ("target_scope", "target_layer", "target_head"))
    assert [lay for s, lay in zip(scope, layer) if s == "layer"] == [0, 2]
    assert [(lay, h) for s, lay, h in zip(scope, layer, head) if s == "head"] == [(0, 2), (0, 3), (2, 2), (2, 3)]
    assert "layer 2 head 3" in part["target"].values.tolist()
    assert [
        lay
        for s, lay in zip(*(_results(layers)[name].values.tolist() for name in ("target_scope", "target_layer")))
        if s == "layer"
    ] == [0, 2]
    # replaying the stored heads' own attention changes nothing; their effective attention keeps the output too
    for intervention in ("replay", "efficient:effective"):
        change = part["max_abs_logit_change"].sel(intervention=intervention)
        assert float(change.max()) < 1e-4, intervention


def test_injection_into_stored_layers_and_heads_equals_the_full_stores_at_those_model_indices(selection_runs):
    """Per example: a stored layer (every head) or a stored head replaced in the selection run changes the logits
    exactly as the same replacement at that model layer / head of the full run."""
    import numpy as np

    full, layers, chosen = selection_runs
    whole = _results(full)
    compared = 0
    for record, scope in ((layers, "layer"), (chosen, "head")):
        part = _results(record)
        targets = [
            name
            for name, kind in zip(part["target"].values.tolist(), part["target_scope"].values.tolist())
            if kind == scope
        ]
        interventions = [
            name
            for name in part["intervention"].values.tolist()
            if not np.isnan(part["agreement"].sel(intervention=name, target=targets[0]).values).all()
        ]
        deterministic = [name for name in interventions if "noise" not in name]  # the noise is drawn per shape
        assert ("uniform" in deterministic or scope == "head") and "ablate" in deterministic
        for intervention in deterministic:
            for target in targets:
                for metric in LAYER_METRICS:
                    np.testing.assert_allclose(
                        part[metric].sel(intervention=intervention, target=target).values,
                        whole[metric].sel(intervention=intervention, target=target).values,
                        atol=1e-5,
                        rtol=0,
                        err_msg=f"{scope} {intervention} {target} {metric}",
                    )
                    compared += 1
    # the comparisons can fail: ablating a stored layer does change the logits
    assert float(_results(layers)["max_abs_logit_change"].sel(intervention="ablate", target="layer 2").max()) > 1e-4
    assert compared >= 2 * 2 * 3 + 4 * 3


def test_a_selection_is_reported_with_the_models_numbers_and_not_explained(selection_runs):
    _, _, chosen = selection_runs
    assert chosen["stages"]["explain"]["status"] == "not needed"
    assert "explain needs all" in chosen["stages"]["explain"]["detail"]
    assert chosen["explanations"] is None
    html = Path(chosen["report"]).read_text(encoding="utf-8")
    assert "2 of 3 layers (0, 2), 2 of 4 heads (2, 3)" in html
    assert chosen["stages"]["report"]["status"] == "ran"


def test_explain_refuses_a_store_of_some_layers(selection_runs, tmp_path):
    from flows.explain import explain
    from flows.settings import ExplainSettings
    from storage_schemas.selection import SelectionError

    _, _, chosen = selection_runs
    results = tmp_path / "explanations.zarr"
    with pytest.raises(
        SelectionError,
        match=r"holds 2 of 3 layers \(0, 2\), 2 of 4 heads \(2, 3\); `effattn explain` "
        "needs every layer and head",
    ):
        explain(ExplainSettings(store=chosen["store"], results=str(results)))
    assert not results.exists()


def test_every_stage_of_the_pipeline_follows_one_rule_not_needed_conflict_skip_or_run():
    import logging

    from flows.pipeline import PipelineRun, PipelineStage, run_pipeline_stage
    from storage_schemas.pipeline_runs import StageCheck

    ran = []
    run = PipelineRun(
        settings=None,
        store="s.zarr",
        results="r.zarr",
        report_dir="report",
        variants=[],
        logger=logging.getLogger("test"),
    )

    def stage(name: str, check: StageCheck, not_needed: str | None = None) -> PipelineStage:
        return PipelineStage(
            name,
            status=lambda run: check,
            run_stage=lambda run: ran.append(name) or f"{name} done",
            not_needed=lambda run: not_needed,
            conflict=lambda run: f"{run.results} is another's",
        )

    run_pipeline_stage(stage("a", StageCheck(False, "missing")), run)
    run_pipeline_stage(stage("b", StageCheck(True, "complete for the same inputs")), run)
    run_pipeline_stage(stage("c", StageCheck(False, "missing"), not_needed="nothing to do"), run)
    with pytest.raises(ValueError, match="r.zarr is another's"):
        run_pipeline_stage(stage("d", StageCheck(False, "other settings", conflicting=True)), run)
    assert ran == ["a"]
    assert {name: (entry["status"], entry["detail"]) for name, entry in run.stages.items()} == {
        "a": ("ran", "a done"),
        "b": ("skipped", "complete for the same inputs"),
        "c": ("not needed", "nothing to do"),
    }
