"""analysis/explanation_figures.py: the curves, the table and the report section from an explanation results dataset."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.explanation_figures import (
    FIGURE_NAME,
    explanation_section_html,
    explanation_table_rows,
    faithfulness_curves_figure,
    mean_curves,
)
from storage_schemas.explanation_results import (
    create_explanation_results,
    load_explanation_dataset,
    write_explanation_aggregates,
)

METHODS = ["attention:rollout", "simplex:last-layer", "leave-one-out", "random"]


@pytest.fixture()
def dataset(tmp_path):
    from analysis.explanations import ExplanationMethod

    url = str(tmp_path / "results.zarr")
    group = create_explanation_results(
        url, [{"name": m.name, "kind": m.kind, "source": m.source, "aggregation": m.aggregation}
              for m in map(ExplanationMethod.parse, METHODS)],
        ["comprehensiveness", "sufficiency"], [1, 5, 10, 20, 50], ["leave-one-out", "integrated-gradients"],
        {"store_example": np.arange(3), "length": np.full(3, 8), "label": np.zeros(3)}, layers=2, positions=8,
        shard_size=3, attributes={"settings": {}},
    )
    faithfulness = np.arange(4 * 2 * 5 * 3, dtype=np.float64).reshape(4, 2, 5, 3) / 100
    faithfulness[3, :, :, 0] = np.nan  # one unmeasured example is ignored in the means
    group["faithfulness"][...] = faithfulness
    group["aopc"][...] = faithfulness.mean(2)  # NaN for the unmeasured example
    tau = np.full((4, 2, 3), 0.5)
    tau[:, 1] = np.nan  # integrated gradients not run
    group["kendall_tau"][...] = tau
    write_explanation_aggregates(group, {"mean_aopc": np.zeros((4, 2)), "mean_kendall_tau": np.zeros((4, 2)),
                                         "minimal_share": np.array([0.25, np.nan])})
    return load_explanation_dataset(url)


def test_curves_average_over_the_measured_examples(dataset):
    curves = mean_curves(dataset)
    values = dataset["faithfulness"].values
    np.testing.assert_allclose(curves["comprehensiveness"][0], values[0, 0].mean(-1))
    np.testing.assert_allclose(curves["sufficiency"][3], values[3, 1, :, 1:].mean(-1))
    figure = faithfulness_curves_figure(dataset)
    assert len(figure.axes) == 2 and len(figure.axes[0].lines) == len(METHODS)


def test_table_rows_and_section(dataset, tmp_path):
    rows = explanation_table_rows(dataset)
    assert [row[0] for row in rows] == METHODS
    assert rows[0][3] == "0.5000" and rows[0][4] == "—"  # tau vs IG was not measured
    assert float(rows[1][1]) == pytest.approx(float(np.nanmean(dataset["aopc"].values[1, 0])), abs=1e-4)
    section = explanation_section_html(dataset, tmp_path)
    assert (tmp_path / FIGURE_NAME).stat().st_size > 1000
    assert "layer 0: 25.0 %" in section and "layer 1: —" in section
    assert section.count("<tr>") == 1 + len(METHODS)
