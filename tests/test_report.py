"""The report (analysis/report_figures.py, analysis/report_html.py, tasks/report.py, flows/report.py, `effattn
report`): figures and index.html from a real causal run of the tiny BERT, read from local paths and fsspec URLs.

The module builds one attention store (extract -> efficient on a LocalCluster -> causal) and reuses it; the pure
functions are tested on small hand-made arrays.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

from analysis.report_figures import (
    attention_comparison_figure,
    choose_examples,
    choose_head,
    layer_head_grid,
    load_local_tokenizer,
    minimality_curve,
    null_norm_ratio_by_length,
    percent_limits,
    scope_interventions,
    token_labels,
)
from analysis.report_html import write_report
from flows.causal import causal
from flows.efficient import efficient
from flows.extract import extract
from flows.report import report
from flows.settings import (
    CausalSettings,
    EfficientSettings,
    ExplainSettings,
    ExtractSettings,
    ReportSettings,
)
from storage_schemas.attention_store import open_attention_store, read_texts
from storage_schemas.causal_results import CausalResultsError
from tasks.report import load_report_inputs
from tests.conftest import write_reviews_csv

VARIANTS = ["effective", "stochastic", "simplex"]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_bert_folder) -> dict[str, str]:
    """A tiny BERT store (10 reviews, head dim 8, shards of 4) with every variant and its causal results."""
    folder = tmp_path_factory.mktemp("report")
    store = str(folder / "store.zarr")
    results = str(folder / "results.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(folder / "reviews.csv")),
            model=str(tiny_bert_folder),
            store=store,
            shard_size=4,
            batch_size=4,
            train=False,
        )
    )
    efficient(EfficientSettings(store=store, variants=VARIANTS, workers=1))
    causal(CausalSettings(store=store, results=results, scope_examples=4, minimality_directions=(1, 2)))
    return {"store": store, "results": results, "folder": str(folder)}


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_writes_index_and_every_figure(causal_run, tmp_path):
    out = tmp_path / "report"
    # store: the one recorded in the results
    index = Path(report(ReportSettings(results=causal_run["results"], out=str(out))))
    assert index == out / "index.html" and index.is_file()
    page = index.read_text(encoding="utf-8")

    written = sorted(path.name for path in out.glob("*.png"))
    assert sorted(image_sources(page)) == written  # every PNG is shown, and every image shown exists
    group = open_attention_store(causal_run["store"])
    length, null_dim = group["length"][:], group["diagnostics/effective/null_dim"][:]
    drawn = sorted(int(name.split("-")[-1].split(".")[0]) for name in written if name.startswith("attention-example"))
    assert drawn == choose_examples(length, null_dim) and len(drawn) == 3
    assert all(null_dim[index].max() > 0 for index in drawn)  # the drawn examples have a null space
    expected = {"null-norm-ratio.png", "diagnostics.png", "head-scope.png", "layer-scope.png", "minimality.png"}
    assert expected <= set(written)
    for name in written:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and 800 <= image.width <= 1500 and 300 <= image.height <= 2500, name
            pixels = np.asarray(image.convert("L"), dtype=float)
            assert pixels.std() > 10, f"{name} looks empty"

    results = zarr.open_group(causal_run["results"], mode="r")
    claims = results.attrs["claims"]
    assert claims
    for row in claims:  # every claim row, its verdict and its numbers are in the page
        for key in ("claim", "verdict", "measured", "test"):
            assert html.escape(row[key], quote=True) in page, (key, row[key])
    verdict_cells = re.findall(r'<tr class="(holds|fails|unknown|untestable)"><td>([^<]*)</td><td><b>([^<]*)</b>', page)
    assert [(html.unescape(claim), html.unescape(verdict)) for _, claim, verdict in verdict_cells] == [
        (row["claim"], row["verdict"]) for row in claims
    ]
    assert all(
        css
        == (
            "untestable"
            if verdict.startswith("not testable")
            else {"holds": "holds", "does not hold": "fails"}.get(verdict, "unknown")
        )
        for css, _, verdict in verdict_cells
    )
    # the findings first, then the identity checks in a table of their own
    kinds = [row["kind"] for row in claims]
    assert kinds == sorted(kinds, key=lambda kind: kind == "identity") and "identity" in kinds
    assert page.index("<h3>Findings</h3>") < page.index("<h3>Identity checks</h3>")
    for intervention in results["intervention"][:].tolist():  # the target-"all" table has every intervention
        assert f"<td>{html.escape(intervention)}</td>" in page
    attributes = results.attrs.asdict()
    assert causal_run["store"] in page and causal_run["results"] in page
    assert attributes["model"]["weights_digest"] in page and attributes["created"] in page
    assert f"zarr {zarr.__version__}" in page


def test_report_inputs_match_the_stores(causal_run):
    inputs = load_report_inputs(causal_run["results"], examples=2)
    group = open_attention_store(causal_run["store"])
    assert inputs.store_url == causal_run["store"] and inputs.tokenizer_loaded
    assert len(inputs.examples) == 2
    for example in inputs.examples:
        n = int(group["length"][example.index])
        ratios = group["diagnostics/effective/null_norm_ratio"][example.index]
        assert (example.layer, example.head) == np.unravel_index(np.argmax(ratios), ratios.shape)
        np.testing.assert_array_equal(
            example.attention, group["attention"][example.index, example.layer, example.head, :n, :n]
        )
        for variant in VARIANTS:
            np.testing.assert_array_equal(
                example.efficient[variant],
                group[f"efficient/{variant}"][example.index, example.layer, example.head, :n, :n],
            )
        tokens = group["tokens"][example.index, :n]
        assert example.labels[0] == "[CLS]" and example.labels[-1] == "[SEP]" and len(example.labels) == n
        assert example.labels != [str(token) for token in tokens]  # strings, not ids
        assert example.text == read_texts(group, [example.index])[0]
    aggregates = xr.open_zarr(causal_run["results"], consolidated=False)
    for name in ("agreement_rate", "flip_rate", "examples_measured"):
        np.testing.assert_array_equal(inputs.aggregates[name].values, aggregates[name].values)
    assert inputs.aggregates["target_scope"].values.tolist() == aggregates["target_scope"].values.tolist()


def test_report_reads_stores_at_fsspec_urls(causal_run, tmp_path):
    """The same report from copies of both stores on another fsspec filesystem (memory://) as from the disk."""
    filesystem = fsspec.filesystem("memory")
    filesystem.put(causal_run["store"], "/report-test/store.zarr", recursive=True)
    filesystem.put(causal_run["results"], "/report-test/results.zarr", recursive=True)
    try:
        remote = load_report_inputs("memory://report-test/results.zarr", store="memory://report-test/store.zarr")
        local = load_report_inputs(causal_run["results"])
        assert [example.index for example in remote.examples] == [example.index for example in local.examples]
        for mine, theirs in zip(remote.examples, local.examples):
            np.testing.assert_array_equal(mine.attention, theirs.attention)
            assert mine.labels == theirs.labels
        xr.testing.assert_identical(remote.aggregates, local.aggregates)
        index = report(
            ReportSettings(
                results="memory://report-test/results.zarr",
                out=str(tmp_path / "remote"),
                store="memory://report-test/store.zarr",
            )
        )
        page = Path(index).read_text(encoding="utf-8")
        assert "memory://report-test/store.zarr" in page
        assert sorted(image_sources(page)) == sorted(path.name for path in (tmp_path / "remote").glob("*.png"))
    finally:
        filesystem.rm("/report-test", recursive=True)


def test_missing_results_and_wrong_store_are_clear_errors(causal_run, tmp_path, capsys):
    missing = str(tmp_path / "absent.results.zarr")
    with pytest.raises(
        CausalResultsError,
        match=r"there are no causal results at .*absent\.results\.zarr: create "
        r"them with `effattn causal",
    ):
        load_report_inputs(missing)
    from flows.cli import main

    assert main(["report", "--results", missing, "--out", str(tmp_path / "out")]) == 2
    assert f"effattn report: error: there are no causal results at {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    moved = tmp_path / "results.zarr"  # results whose recorded store is gone
    shutil.copytree(causal_run["results"], moved)
    zarr.open_group(str(moved), mode="r+").attrs["attention_store"] = str(tmp_path / "gone.zarr")
    with pytest.raises(
        CausalResultsError,
        match=r"the attention store recorded in .* is not there .*: pass its "
        r"location with --store",
    ):
        load_report_inputs(str(moved))
    assert load_report_inputs(str(moved), store=causal_run["store"]).store_url == causal_run["store"]
    zarr.open_group(str(moved), mode="r+").attrs["settings"] = {
        **zarr.open_group(str(moved), mode="r").attrs["settings"],
        "store_identity": {"weights_digest": "sha256:other", "examples": 10},
    }
    with pytest.raises(
        CausalResultsError,
        match=r"were not computed from the attention store .*weights_digest: "
        r"results 'sha256:other', store 'sha256:",
    ):
        load_report_inputs(str(moved), store=causal_run["store"])
    with pytest.raises(ValueError, match="--out must be a local folder, got s3://bucket/report"):
        report(ReportSettings(results=causal_run["results"], out="s3://bucket/report"))
    a_file = tmp_path / "rep.html"
    a_file.write_text("<html>")
    with pytest.raises(ValueError, match=f"^--out {a_file} is a file, not a folder: --out names a folder"):
        report(ReportSettings(results=causal_run["results"], out=str(a_file)))
    assert a_file.read_text() == "<html>"


# --- pure functions ---------------------------------------------------------------------------------------------


def test_choose_examples_prefers_null_spaces_spread_over_lengths():
    length = np.array([5, 12, 40, 20, 30, 9, 60, 25, 0])
    null_dim = np.zeros((9, 2, 3), dtype=int)
    for index in (1, 2, 3, 4, 6, 7):  # examples 0, 5 (and padding 8) have no null space
        null_dim[index, 1, 2] = 1
    chosen = choose_examples(length, null_dim, count=3, max_length=48)
    assert chosen == [1, 2, 7]  # lengths <= 48 with a null space: 12 20 25 30 40 -> 10th, 50th, 90th percentile
    assert choose_examples(length, null_dim, count=1) == [7]
    assert len(choose_examples(length, null_dim, count=10)) == 6  # never more than the candidates
    assert choose_examples(length, np.zeros_like(null_dim), count=2) == [2, 6]  # no null space: the longest


def test_choose_head_and_layer_head_grid():
    ratios = np.array([[0.1, np.nan, 0.3], [0.9, 0.2, 0.0]])
    assert choose_head(ratios) == (1, 0)
    targets = ["all", "layer 0", "layer 0 head 0", "layer 0 head 1", "layer 1 head 1"]
    aggregates = xr.Dataset(
        {
            "agreement_rate": (("intervention", "target"), [[1.0, 0.5, 0.25, 0.75, 0.125], [1.0, 1.0, 0.0, 0.0, 0.0]]),
            "examples_measured": (("intervention", "target"), [[9, 4, 4, 4, 4], [9, 0, 0, 0, 0]]),
        },
        coords={
            "intervention": ["ablate", "replay"],
            "target": targets,
            "target_scope": ("target", ["all", "layer", "head", "head", "head"]),
            "target_layer": ("target", [-1, 0, 0, 0, 1]),
            "target_head": ("target", [-1, -1, 0, 1, 1]),
        },
    )
    grid = layer_head_grid(aggregates, "agreement_rate", "ablate", layers=2, heads=2)
    np.testing.assert_array_equal(grid, [[0.25, 0.75], [np.nan, 0.125]])
    assert np.isnan(layer_head_grid(aggregates, "agreement_rate", "replay", 2, 2)).all()  # not measured
    assert scope_interventions(aggregates, "head") == ["ablate"]
    assert scope_interventions(aggregates, "all") == ["ablate", "replay"]
    # a store of model layers 0, 1 of 4 and heads 0, 1, 5: the grid's rows and columns are those, in that order
    grid = layer_head_grid(aggregates, "agreement_rate", "ablate", layers=(0, 1), heads=(0, 1, 5))
    np.testing.assert_array_equal(grid, [[0.25, 0.75, np.nan], [np.nan, 0.125, np.nan]])


def test_minimality_curve_reads_the_recorded_parts_of_each_intervention():
    """The probes are found by their recorded kind and k (not by parsing names), sorted by k, after k = 0 (the
    efficient attention of the same variant)."""
    names = ["minimality:effective:k=4", "efficient:stochastic", "efficient:effective", "minimality:effective:k=1"]
    aggregates = xr.Dataset(
        {
            "agreement_rate": (("intervention", "target"), [[0.5], [0.9], [1.0], [0.75]]),
            "flip_rate": (("intervention", "target"), [[0.5], [0.1], [0.0], [0.25]]),
        },
        coords={
            "intervention": names,
            "target": ["all"],
            "intervention_kind": ("intervention", ["minimality", "efficient", "efficient", "minimality"]),
            "variant": ("intervention", ["effective", "stochastic", "effective", "effective"]),
            "removed_directions": ("intervention", [4, 0, 0, 1]),
        },
    )
    curve = minimality_curve(aggregates)
    assert curve["variant"] == "effective" and curve["k"].tolist() == [0, 1, 4]
    assert curve["agreement_rate"].tolist() == [1.0, 0.75, 0.5] and curve["flip_rate"].tolist() == [0.0, 0.25, 0.5]
    without_efficient = minimality_curve(aggregates.isel(intervention=[0, 1, 3]))
    assert without_efficient["k"].tolist() == [1, 4]
    assert minimality_curve(aggregates.isel(intervention=[1, 2])) is None


def test_null_norm_ratio_by_length_and_percent_limits():
    length = np.array([3, 3, 5, 0])
    ratio = np.array([[[0.0, 0.2]], [[0.4, 0.6]], [[1.0, 1.0]], [[7.0, 7.0]]])  # example 3 is padding
    stats = null_norm_ratio_by_length(length, ratio)
    assert stats["length"].tolist() == [3, 5] and stats["count"].tolist() == [4, 2]
    np.testing.assert_allclose(stats["median"], [0.3, 1.0])
    np.testing.assert_allclose(stats["p10"], [0.06, 1.0])
    assert percent_limits("flip_rate", [np.array([0.0, 0.12, np.nan])]) == (0.0, 12.0)
    assert percent_limits("flip_rate", [np.zeros(3)]) == (0.0, 5.0)  # at least 5 % wide
    low, high = percent_limits("agreement_rate", [np.array([0.88, 1.0])])
    assert (round(low, 6), high) == (88.0, 100.0)


def test_token_labels_and_tokenizer_fallback(tiny_bert_folder, tmp_path):
    tokenizer = load_local_tokenizer(str(tiny_bert_folder))
    assert tokenizer is not None
    ids = tokenizer("a quiet triumph")["input_ids"]
    assert token_labels(ids, tokenizer) == ["[CLS]", "a", "quiet", "triumph", "[SEP]"]
    assert token_labels(ids, None) == [str(token) for token in ids]
    assert load_local_tokenizer(str(tmp_path / "no-such-folder")) is None
    assert load_local_tokenizer("someone/not-a-cached-model") is None  # local files only, never downloads
    assert load_local_tokenizer(None) is None


def test_attention_comparison_figure_has_tokens_on_both_axes():
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(6), size=6)
    efficient = {"effective": attention - 0.05, "simplex": attention}
    labels = ["[CLS]", "a", "quiet", "tri", "##umph", "[SEP]"]
    figure = attention_comparison_figure(attention, efficient, labels, title="t")
    panels = [axes for axes in figure.axes if axes.get_images() and axes.get_label() != "<colorbar>"]
    assert len(panels) == 6  # one row per variant: A, E, A - E
    assert [text.get_text() for text in panels[0].get_yticklabels()] == labels
    assert [text.get_text() for text in panels[-3].get_xticklabels()] == labels
    titles = [axes.get_title() for axes in panels]
    assert titles == [
        "attention A",
        "efficient E (effective)",
        "null part A − E (effective)",
        "attention A",
        "efficient E (simplex)",
        "null part A − E (simplex)",
    ]
    np.testing.assert_allclose(panels[2].get_images()[0].get_array(), np.full((6, 6), 0.05))
    with pytest.raises(ValueError, match=r"attention has shape \(6, 6\) and there are 5 labels"):
        attention_comparison_figure(attention, efficient, labels[:5], title="t")


def test_write_report_without_head_scope_or_minimality(causal_run, tmp_path):
    """Results without head targets and minimality probes: those figures are left out, and the page says so."""
    inputs = load_report_inputs(causal_run["results"], examples=1)
    keep_targets = inputs.aggregates["target_scope"].values != "head"
    keep_interventions = ~np.char.startswith(inputs.aggregates["intervention"].values.astype(str), "minimality")
    inputs.aggregates = inputs.aggregates.isel(target=keep_targets, intervention=keep_interventions)
    index = write_report(inputs, tmp_path / "partial")
    page = index.read_text(encoding="utf-8")
    written = sorted(path.name for path in (tmp_path / "partial").glob("*.png"))
    assert sorted(image_sources(page)) == written
    assert "head-scope.png" not in written and "minimality.png" not in written
    assert "These results have no head-scope targets" in page


def test_report_shows_explanation_results_and_their_claims(causal_run, tmp_path):
    from flows.explain import explain

    explanations = str(tmp_path / "explanations.zarr")
    claims = explain(
        ExplainSettings(
            store=causal_run["store"],
            results=explanations,
            examples=2,
            integrated_gradients_steps=4,
            minimality_rows=2,
            methods=["attention:rollout", "simplex:rollout", "leave-one-out", "random"],
        )
    )
    out = tmp_path / "report"
    page = Path(
        report(ReportSettings(results=causal_run["results"], out=str(out), explanations=explanations))
    ).read_text("utf-8")
    assert "Does attention explain the prediction?" in page and (out / "explanation-faithfulness.png").is_file()
    assert "explanation-faithfulness.png" in image_sources(page)
    for row in claims:  # the explanation claims join the claims table
        assert html.escape(row["claim"], quote=True) in page
    assert "<td>simplex:rollout</td>" in page
