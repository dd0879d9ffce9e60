"""analysis.run_summary: the per-variant numbers a pipeline run ends with, and the text tables."""

from __future__ import annotations

import re

import numpy as np
import pytest

from analysis.run_summary import summarize_variant, summary_table, text_table


def diagnostics(**overrides):
    """Four (example, layer, head) blocks, shape [2, 1, 2]; every block a probability distribution by default."""
    base = {
        "null_dim": np.array([[[0, 3]], [[1, 0]]]),
        "null_norm_ratio": np.array([[[0.0, 0.4]], [[0.2, 0.0]]]),
        "output_residual": np.array([[[1e-16, 3e-15]], [[2e-16, 0.0]]]),
        "row_sum_error": np.full((2, 1, 2), 3e-7),
        "negative_mass": np.zeros((2, 1, 2)),
        "converged": np.ones((2, 1, 2), dtype=bool),
    }
    return {**base, **overrides}


def test_summary_counts_shares_of_blocks():
    summary = summarize_variant(
        diagnostics(
            row_sum_error=np.array([[[3e-7, 0.5]], [[1e-6, 2e-5]]]),  # two blocks over the 1e-5 tolerance
            negative_mass=np.array([[[0.0, 0.0]], [[0.1, 1e-7]]]),  # one block with negative mass over 1e-6
            converged=np.array([[[True, True]], [[False, True]]]),
        )
    )
    assert summary == {
        "blocks": 4,
        "with_null_space": 0.5,
        "mean_null_norm_ratio": pytest.approx(0.15),
        "max_output_residual": 3e-15,
        "rows_sum_to_one": 0.5,
        "non_negative": 0.75,
        "probability_distribution": 0.25,  # only block (0, 0, 0) is both
        "converged": 0.75,
    }


def test_tolerances_are_parameters():
    summary = summarize_variant(diagnostics(row_sum_error=np.full((2, 1, 2), 3e-7)), row_sum_tolerance=1e-7)
    assert summary["rows_sum_to_one"] == 0.0 and summary["probability_distribution"] == 0.0


def test_empty_diagnostics_are_an_error():
    empty = {name: np.zeros((0, 1, 2)) for name in diagnostics()}
    with pytest.raises(ValueError, match="no attention blocks to summarize"):
        summarize_variant(empty)


def test_summary_table_formats_shares_as_percentages():
    table = summary_table({"stochastic": summarize_variant(diagnostics())})
    header, rule, row = table.splitlines()
    assert header.split() == [
        "variant",
        "blocks",
        "null",
        "space",
        "|A-Aeff|/|A|",
        "max",
        "output",
        "residual",
        "rows",
        "sum",
        "to",
        "1",
        "non-negative",
        "probability",
        "dist.",
        "converged",
    ]
    assert re.fullmatch(r"-+( +-+){8}", rule)
    assert row.split() == [
        "stochastic",
        "4",
        "50.0",
        "%",
        "0.15",
        "3e-15",
        "100.0",
        "%",
        "100.0",
        "%",
        "100.0",
        "%",
        "100.0",
        "%",
    ]


def test_text_table_aligns_columns_and_checks_rows():
    assert text_table(["a", "long header"], [["wide cell", "x"], ["y", "z"]]) == (
        "a          long header\n---------  -----------\nwide cell  x\ny          z"
    )
    with pytest.raises(ValueError, match=re.escape("a row has 1 cells, the table has 2 columns: ['x']")):
        text_table(["a", "b"], [["x"]])
