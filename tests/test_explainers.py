"""analysis/explainers.py: one record per explainer; a registered one is computed, stored, ranked and drawn."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError

from analysis.aggregations import AGGREGATIONS
from analysis.explainers import (
    Explainer,
    ExplanationSettings,
    default_methods,
    explainer_record,
    known_explainers,
    references,
    register_explainer,
    registered_explainer,
)
from analysis.variants import registered_variant
from flows.settings import ExplainSettings
from tests.test_variants import MIDPOINT, MIDPOINT_COLOUR

DUMMY_COLOUR = "#9467bd"


def first_tokens_first(example, record):
    """[L] -position: the earlier a token, the higher its score."""
    return -np.arange(len(example.tokens), dtype=np.float64)


DUMMY = Explainer(
    name="first-tokens",
    kind="model",
    description="earlier tokens first (a test explainer)",
    compute=first_tokens_first,
    style={"color": DUMMY_COLOUR, "linestyle": "-"},
)


def test_names_resolve_to_records_and_unknown_names_are_refused_with_the_known_ones():
    simplex = explainer_record("simplex:rollout")
    assert (simplex.kind, simplex.source, simplex.aggregation, simplex.raw_twin) == (
        "matrices",
        "simplex",
        "rollout",
        "attention:rollout",
    )
    assert simplex.style == {"color": "#2ca02c", "linestyle": ":"}  # the variant's colour, rollout's line
    assert explainer_record("leave-one-out").kind == "model" and explainer_record("random").kind == "random"
    norm = explainer_record("simplex-norm:last-layer")
    assert (norm.kind, norm.source, norm.aggregation, norm.raw_twin) == (
        "norms",
        "simplex",
        "last-layer",
        "attention-norm:last-layer",
    )
    assert norm.style["marker"] == "s" and norm.style["linewidth"] == 0.8
    assert norm.is_efficient and not explainer_record("attention-norm:rollout").is_efficient
    assert explainer_record("effective:rollout").raw_twin == "attention:rollout"
    assert explainer_record("attention:rollout").stored() == {
        "name": "attention:rollout",
        "kind": "matrices",
        "source": "attention",
        "aggregation": "rollout",
    }
    for name in ("attention:middle", "-norm:rollout", "nowhere:rollout", "gradient"):
        with pytest.raises(ValueError, match=f"unknown explanation method '{name}'.*conservative-lrp"):
            explainer_record(name)
    names = default_methods(["effective"])
    assert names[:3] == [f"attention:{aggregation}" for aggregation in AGGREGATIONS]
    assert names[6:9] == [f"attention-norm:{aggregation}" for aggregation in AGGREGATIONS]
    assert names[9:12] == [f"effective-norm:{aggregation}" for aggregation in AGGREGATIONS]
    assert names[-5:] == ["input-x-gradient", "integrated-gradients", "leave-one-out", "conservative-lrp", "random"]
    assert references() == ("leave-one-out", "integrated-gradients")  # the results' `reference` coordinate


def test_a_registered_variant_gets_its_attention_based_explainers():
    assert "midpoint:rollout" not in known_explainers()
    with registered_variant(MIDPOINT):
        assert {"midpoint:rollout", "midpoint-norm:last-layer"} <= set(known_explainers())
        assert explainer_record("midpoint:all-layers").style["color"] == MIDPOINT_COLOUR
    with pytest.raises(ValueError, match="unknown explanation method 'midpoint:rollout'"):
        explainer_record("midpoint:rollout")


def test_bad_records_and_settings_are_refused():
    with pytest.raises(ValueError, match="without ','"):
        dataclasses.replace(DUMMY, name="a,b")
    with pytest.raises(ValueError, match="kind 'gradients' must be one of"):
        dataclasses.replace(DUMMY, kind="gradients")
    with pytest.raises(ValueError, match="reads stored attention: give its source"):
        dataclasses.replace(DUMMY, kind="matrices")
    with pytest.raises(ValueError, match="exists already"):
        register_explainer(dataclasses.replace(DUMMY, name="simplex:rollout"))
    with pytest.raises(ValueError, match="reference column 0 is taken"):
        register_explainer(dataclasses.replace(DUMMY, reference=0))
    with pytest.raises(ValueError, match="given once each"):
        ExplanationSettings(methods=("random", "random"), examples=(0,))
    with pytest.raises(ValueError, match="unknown explanation method"):
        ExplanationSettings(methods=("attention:first",), examples=(0,))
    with pytest.raises(ValueError, match=r"percents must be in \(0, 100\]"):
        ExplanationSettings(methods=("random",), examples=(0,), percents=(0, 5))
    with pytest.raises(ValueError, match="minimality_rows must be 0"):
        ExplanationSettings(methods=("random",), examples=(0,), minimality_rows=-1)


def test_the_command_line_refuses_an_unknown_method_when_it_parses(capsys):
    from flows.cli import parse_settings

    with pytest.raises(SystemExit) as stopped:
        parse_settings(["explain", "--store", "s.zarr", "--results", "r.zarr", "--methods", "attention:rollout,nope"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "effattn explain: error:" in error and "unknown explanation method 'nope'" in error
    assert "leave-one-out" in error and "simplex" in error  # the names that exist


def test_the_command_line_defaults_are_the_analysis_defaults():
    settings = ExplainSettings(store="s.zarr", results="r.zarr")
    chosen = settings.explanation_settings(["random"], [3, 1])
    assert chosen == ExplanationSettings(methods=("random",), examples=(3, 1))
    other = ExplainSettings(
        store="s.zarr",
        results="r.zarr",
        integrated_gradients_steps=5,
        seed=2,
        percents=(10,),
        minimality_rows=0,
        shard_size=3,
    )
    assert other.explanation_settings(["random"], [0]) == ExplanationSettings(
        methods=("random",),
        examples=(0,),
        integrated_gradients_steps=5,
        seed=2,
        percents=(10,),
        minimality_rows=0,
        shard_size=3,
    )


def test_a_registered_explainer_is_computed_stored_ranked_and_drawn(tmp_path, tiny_bert_folder):
    from analysis.explanation_figures import explanation_section_html, faithfulness_curves_figure
    from flows.explain import recorded_explanation_settings
    from storage_schemas.explanation_results import load_explanation_dataset
    from tasks.explain import EXPLAIN_STAGE
    from tasks.stages import StageRun, run_stage
    from tests.store_builders import build_real_store, write_corpus

    store = build_real_store(
        str(tmp_path / "store.zarr"), tiny_bert_folder, write_corpus(tmp_path / "reviews.csv"), variants=()
    )
    results = str(tmp_path / "results.zarr")
    methods = ("first-tokens", "leave-one-out", "random")
    with pytest.raises(ValidationError, match="unknown explanation method 'first-tokens'"):
        ExplainSettings(store=store, results=results, methods=methods)  # refused when the command line is parsed
    with registered_explainer(DUMMY):
        assert "first-tokens" in default_methods([])
        settings = ExplainSettings(
            store=store, results=results, methods=methods, examples=3, shard_size=2, minimality_rows=0
        )
        recorded = recorded_explanation_settings(settings)
        run_stage(EXPLAIN_STAGE, StageRun(store=store, results=results, plan=recorded))  # as the flow, in process
        dataset = load_explanation_dataset(results)
        # computed and stored: its scores on the removable tokens, its kind in the results
        methods_stored = dataset["explainer"].values.tolist()
        assert methods_stored == list(methods)
        assert dataset["explainer_kind"].values.tolist() == ["model", "model", "random"]
        attribution = dataset["attribution"].sel(explainer="first-tokens").values  # [example, position]
        for row, length in enumerate(dataset["length"].values):
            kept = ~np.isnan(attribution[row])
            assert kept.sum() == dataset["removable_tokens"].values[row]
            np.testing.assert_array_equal(attribution[row][kept], -np.flatnonzero(kept))
            assert not kept[0] and not kept[length - 1]  # [CLS] and [SEP] are never removable
        assert np.isfinite(dataset["faithfulness"].sel(explainer="first-tokens").values).all()
        tau = dataset["kendall_tau"].sel(explainer="first-tokens", reference="leave-one-out").values
        several = dataset["removable_tokens"].values >= 2  # tau needs two removable tokens
        assert several.any() and np.isfinite(tau[several]).all()
        # ranked with the others (the results' `ranking`, which the report shows)
        ranking = {entry["method"]: entry for entry in dataset.attrs["ranking"]}
        assert set(ranking) == set(methods) and ranking["first-tokens"]["n"] == 3
        assert ranking["first-tokens"]["comprehensiveness"]["mean"] == pytest.approx(
            float(dataset["aopc"].sel(explainer="first-tokens", metric="comprehensiveness").mean())
        )
        # drawn: its line in its record's style, its row and description in the section
        figure = faithfulness_curves_figure(dataset)
        line = next(line for line in figure.axes[0].lines if line.get_label() == "first-tokens")
        assert line.get_color() == DUMMY_COLOUR
        (tmp_path / "report").mkdir()
        section = explanation_section_html(dataset, tmp_path / "report")
        assert "<td>first-tokens</td>" in section and "earlier tokens first (a test explainer)" in section
    assert "first-tokens" not in known_explainers()
