"""analysis/explanation_figures.py: the curves, the table and the report section from an explanation results dataset."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.explanation_claims import explainer_ranking, faithfulness_comparisons
from analysis.explanation_figures import (
    FIGURE_NAME,
    explanation_section_html,
    faithfulness_curves_figure,
    mean_curves,
    ranking_table_rows,
)
from storage_schemas.explanation_results import (
    create_explanation_results,
    load_explanation_dataset,
    write_explanation_aggregates,
)

METHODS = ["attention:last-layer", "simplex:last-layer", "leave-one-out", "random"]


@pytest.fixture()
def dataset(tmp_path):
    from analysis.explainers import explainer_record

    url = str(tmp_path / "results.zarr")
    group = create_explanation_results(
        url,
        [explainer_record(name).stored() for name in METHODS],
        ["comprehensiveness", "sufficiency"],
        [1, 5, 10, 20, 50],
        ["leave-one-out", "integrated-gradients"],
        {"store_example": np.arange(3), "length": np.full(3, 8), "label": np.zeros(3)},
        layers=2,
        positions=8,
        shard_size=3,
        attributes={"settings": {}},
    )
    faithfulness = np.arange(4 * 2 * 5 * 3, dtype=np.float64).reshape(4, 2, 5, 3) / 100
    faithfulness[3, :, :, 0] = np.nan  # one unmeasured example is ignored in the means
    group["faithfulness"][...] = faithfulness
    group["aopc"][...] = faithfulness.mean(2)  # NaN for the unmeasured example
    tau = np.full((4, 2, 3), 0.5)
    tau[:, 1] = np.nan  # integrated gradients not run
    group["kendall_tau"][...] = tau
    testable = np.array([[-1, -1, -1], [1, 1, 0], [-1, -1, -1], [-1, -1, -1]])  # simplex = A on example 2
    group["testable"][...] = testable
    write_explanation_aggregates(
        group,
        {
            "mean_aopc": np.zeros((4, 2)),
            "mean_kendall_tau": np.zeros((4, 2)),
            "minimal_share": np.array([0.25, np.nan]),
        },
    )
    metrics, references = ["comprehensiveness", "sufficiency"], ["leave-one-out", "integrated-gradients"]
    aopc = faithfulness.mean(2)
    ranking = explainer_ranking(METHODS, metrics, references, aopc, tau, testable, np.full(3, 8), head_dim=4)
    ranking[0]["comprehensiveness"]["mean"] = 12.3456  # a value only the stored attribute holds
    group.attrs.update(
        {
            "ranking": ranking,
            "comparisons": faithfulness_comparisons(METHODS, metrics, aopc, testable),
            "settings": {
                "draw": {
                    "drawn": 3,
                    "testable": 7,
                    "not_testable": 5,
                    "asked": 3,
                    "rule": "examples where simplex differs from A",
                }
            },
        }
    )
    return load_explanation_dataset(url)


def test_curves_average_over_the_examples_where_each_method_is_testable(dataset):
    curves = mean_curves(dataset)
    values = dataset["faithfulness"].values
    np.testing.assert_allclose(curves["comprehensiveness"][0], values[0, 0].mean(-1))
    np.testing.assert_allclose(curves["comprehensiveness"][1], values[1, 0, :, :2].mean(-1))  # not where E = A
    np.testing.assert_allclose(curves["sufficiency"][3], values[3, 1, :, 1:].mean(-1))
    figure = faithfulness_curves_figure(dataset)
    assert len(figure.axes) == 2 and len(figure.axes[0].lines) == len(METHODS)


def test_the_section_shows_the_stored_ranking_and_comparisons(dataset, tmp_path):
    ranking = dataset.attrs["ranking"]
    rows = ranking_table_rows(ranking, ["comprehensiveness", "sufficiency"], ["leave-one-out", "integrated-gradients"])
    assert sorted(row[0] for row in rows) == sorted(METHODS)
    simplex = next(row for row in rows if row[0] == "simplex:last-layer")
    assert simplex[1] == "2"  # testable on 2 of the 3 examples
    assert next(row for row in rows if row[0] == "attention:last-layer")[5] == "—"  # tau vs IG was not measured
    section = explanation_section_html(dataset, tmp_path)
    assert (tmp_path / FIGURE_NAME).stat().st_size > 1000
    assert "12.3456" in section  # drawn from the results' attribute, not recomputed
    assert "3 examples explained, drawn (seeded) from the 7 examples where simplex differs from A" in section
    assert "5 examples of the store are not testable" in section
    assert "not testable (n = 2)" in section  # simplex against attention over 2 examples decides nothing
    assert "layer 0: 25.0 %" in section and "layer 1: —" in section
