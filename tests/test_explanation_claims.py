"""analysis/explanation_claims.py: the verdicts follow the numbers and the stated rules."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.explanation_claims import FAITHFULNESS_MARGIN, bootstrap_mean_interval, explanation_claims

METHODS = ["attention:last-layer", "simplex:last-layer", "effective:last-layer", "leave-one-out"]
METRICS = ["comprehensiveness", "sufficiency"]


def aopc_with(simplex_shift: float, effective_shift: float, examples: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.1, 0.3, examples)
    values = np.zeros((len(METHODS), 2, examples))
    values[0, 0] = raw
    values[1, 0] = raw + simplex_shift + rng.normal(0, 0.002, examples)
    values[2, 0] = raw + effective_shift + rng.normal(0, 0.002, examples)
    return values


def test_bootstrap_interval_covers_the_mean_and_drops_nan():
    mean, low, high = bootstrap_mean_interval(np.array([1.0, 2.0, 3.0, np.nan, 4.0]))
    assert mean == 2.5 and low < mean < high
    assert low >= 1.0 and high <= 4.0
    assert np.isnan(bootstrap_mean_interval(np.array([np.nan]))[0])


def test_faithfulness_claims_follow_the_paired_differences():
    none = -np.ones((40, 2))
    rows = explanation_claims(METHODS, METRICS, aopc_with(0.0, -0.1), none, none)
    verdicts = {row["claim"]: row["verdict"] for row in rows}
    assert verdicts == {
        "efficient attention (simplex) explains at least as faithfully as raw attention (last-layer)": "holds",
        "efficient attention (effective) explains at least as faithfully as raw attention (last-layer)":
            "does not hold",
    }  # no minimality row: nothing was measured
    assert f">= -{FAITHFULNESS_MARGIN:g}" in rows[0]["test"]
    slightly_worse = explanation_claims(METHODS, METRICS, aopc_with(-FAITHFULNESS_MARGIN / 2, 0.02), none, none)
    assert [row["verdict"] for row in slightly_worse] == ["holds", "holds"]  # within the margin


@pytest.mark.parametrize("minimal, verdict", [(10, "holds"), (9, "does not hold")])
def test_minimality_claim_follows_the_share_of_minimal_rows(minimal, verdict):
    tested = np.array([[5, 5], [-1, -1]])
    found = np.array([[5, minimal - 5], [-1, -1]])
    rows = explanation_claims(METHODS[:1], METRICS, np.zeros((1, 2, 2)), tested, found)
    assert rows[-1]["claim"] == "simplex supports are minimal" and rows[-1]["verdict"] == verdict
    assert f"{10 * minimal:.2f} % of 10 rows" in rows[-1]["measured"]
