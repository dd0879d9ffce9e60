"""analysis/explanation_claims.py: the verdicts follow the numbers and the stated rules, only examples where
efficient attention differs from A decide them, and too few such examples give "not testable"."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.explanation_claims import (
    FAITHFULNESS_MARGIN,
    MIN_TESTABLE_EXAMPLES,
    bootstrap_mean_interval,
    explainer_ranking,
    explanation_claims,
    faithfulness_comparisons,
)

METHODS = [
    "attention:last-layer",
    "simplex:last-layer",
    "effective:last-layer",
    "attention-norm:last-layer",
    "simplex-norm:last-layer",
    "leave-one-out",
]
METRICS = ["comprehensiveness", "sufficiency"]
NONE = -np.ones((40, 2))


def aopc_with(simplex_shift: float, effective_shift: float, examples: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.1, 0.3, examples)
    values = np.zeros((len(METHODS), 2, examples))
    values[0, 0] = raw
    values[1, 0] = raw + simplex_shift + rng.normal(0, 0.002, examples)
    values[2, 0] = raw + effective_shift + rng.normal(0, 0.002, examples)
    values[3, 0] = raw
    values[4, 0] = raw + 0.05 + rng.normal(0, 0.002, examples)
    return values


def mask_of_testable(examples: int = 40, testable_examples: int | None = None) -> np.ndarray:
    """[method, example]: efficient methods testable on the first `testable_examples` examples, others -1."""
    testable = -np.ones((len(METHODS), examples), dtype=np.int8)
    for row in (1, 2, 4):
        testable[row] = 0
        testable[row, : examples if testable_examples is None else testable_examples] = 1
    return testable


def claims_of(aopc, testable, tested=NONE, found=NONE):
    return explanation_claims(faithfulness_comparisons(METHODS, METRICS, aopc, testable), tested, found)


def test_bootstrap_interval_covers_the_mean_and_drops_nan():
    mean, low, high = bootstrap_mean_interval(np.array([1.0, 2.0, 3.0, np.nan, 4.0]))
    assert mean == 2.5 and low < mean < high
    assert low >= 1.0 and high <= 4.0
    assert np.isnan(bootstrap_mean_interval(np.array([np.nan]))[0])


def test_faithfulness_claims_follow_the_paired_differences():
    rows = claims_of(aopc_with(0.0, -0.1), mask_of_testable())
    verdicts = {row["claim"]: row["verdict"] for row in rows}
    assert verdicts == {
        "efficient attention (simplex) explains at least as faithfully as raw attention (last-layer)": "holds",
        "efficient attention (effective) explains at least as faithfully as raw attention "
        "(last-layer)": "does not hold",
        "norm-based efficient attention (simplex) explains at least as faithfully as norm-based attention "
        "(last-layer)": "holds",
    }  # no minimality row: nothing was measured
    assert all(row["kind"] == "finding" for row in rows)
    assert f">= -{FAITHFULNESS_MARGIN:g}" in rows[0]["test"]
    slightly_worse = claims_of(aopc_with(-FAITHFULNESS_MARGIN / 2, 0.02), mask_of_testable())
    assert [row["verdict"] for row in slightly_worse] == ["holds", "holds", "holds"]  # within the margin


def test_only_examples_where_e_differs_from_a_decide_and_too_few_are_not_testable():
    aopc = aopc_with(0.0, -0.1)
    aopc[2, 0, 30:] = aopc[0, 0, 30:] + 0.5  # effective much better, but only where E = A (not testable there)
    rows = claims_of(aopc, mask_of_testable(testable_examples=30))
    effective = next(row for row in rows if "(effective)" in row["claim"])
    assert effective["verdict"] == "does not hold" and "over 30 examples (10 explained" in effective["measured"]
    few = claims_of(aopc, mask_of_testable(testable_examples=MIN_TESTABLE_EXAMPLES - 1))
    assert {row["verdict"] for row in few} == {
        f"not testable (n = {MIN_TESTABLE_EXAMPLES - 1} examples where E differs from A, "
        f"{MIN_TESTABLE_EXAMPLES} needed)"
    }
    # a store of short texts: E = A everywhere, nothing is decided, and nothing "holds"
    none = claims_of(aopc, mask_of_testable(testable_examples=0))
    assert all(row["verdict"].startswith("not testable (n = 0") for row in none)


def test_comparisons_answer_with_the_interval():
    comparisons = faithfulness_comparisons(METHODS, METRICS, aopc_with(0.0, -0.1), mask_of_testable())
    answers = {item["method"]: item["answer"] for item in comparisons}
    assert answers == {
        "simplex:last-layer": "no difference detected",
        "effective:last-layer": "less faithful",
        "simplex-norm:last-layer": "more faithful",
    }
    norm = next(item for item in comparisons if item["method"] == "simplex-norm:last-layer")
    assert norm["baseline"] == "norm-based attention" and norm["twin"] == "attention-norm:last-layer"
    assert norm["low"] > 0.04 and norm["high"] < 0.06 and norm["n"] == 40


def test_ranking_orders_by_comprehensiveness_and_splits_by_length():
    aopc = aopc_with(0.0, -0.1)
    taus = np.zeros((len(METHODS), 1, 40))
    length = np.where(np.arange(40) < 10, 20, 50)
    ranking = explainer_ranking(
        METHODS, METRICS, ["leave-one-out"], aopc, taus, mask_of_testable(testable_examples=30), length, head_dim=32
    )
    assert ranking[0]["method"] == "simplex-norm:last-layer"
    effective = next(entry for entry in ranking if entry["method"] == "effective:last-layer")
    assert effective["n"] == 30 and effective["by_length"]["L > 32"]["n"] == 20
    assert effective["by_length"]["L <= 32"]["n"] == 10
    raw = next(entry for entry in ranking if entry["method"] == "attention:last-layer")
    assert raw["n"] == 40
    assert raw["comprehensiveness"]["low"] <= raw["comprehensiveness"]["mean"] <= raw["comprehensiveness"]["high"]


@pytest.mark.parametrize("minimal, verdict", [(10, "holds"), (9, "does not hold")])
def test_minimality_claim_follows_the_share_of_minimal_rows(minimal, verdict):
    tested = np.array([[5, 5], [-1, -1]])
    found = np.array([[5, minimal - 5], [-1, -1]])
    rows = explanation_claims([], tested, found)
    assert rows[-1]["claim"] == "simplex supports are minimal" and rows[-1]["verdict"] == verdict
    assert f"{10 * minimal:.2f} % of 10 rows" in rows[-1]["measured"]
    unjudged = explanation_claims([], np.array([[0, 0]]), np.array([[0, 0]]))
    assert unjudged[-1]["verdict"] == "not testable (no sampled row could be judged)"
