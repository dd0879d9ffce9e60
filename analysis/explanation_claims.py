"""The explanation claims: rows of the claims table ({"claim", "kind", "test", "measured", "verdict"}, as
analysis.claims), decided by rules stated in each row's `test` from the explanation results' numbers, plus the ranking
of every explainer and the paired comparisons the studies page shows.

- "efficient attention (V) explains at least as faithfully as raw attention (aggregation)", and the same of the
  norm-based twins ("norm-based efficient attention (V) ... as norm-based attention"): the paired difference of AOPC
  comprehensiveness, V's minus its raw twin's, over the examples where V's matrices differ from A in the layers the
  aggregation reads (`testable`, analysis.explanations); holds when the lower end of its 95 % bootstrap confidence
  interval of the mean is >= -FAITHFULNESS_MARGIN; "not testable (n = …)" with fewer than MIN_TESTABLE_EXAMPLES
  such examples (where E = A the two attributions are the same numbers: nothing to decide).
- "simplex supports are minimal": holds when at least MINIMAL_SHARE of the judged sampled rows are minimal; not
  testable when no row could be judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.claims import not_testable
from analysis.explainers import explainer_record

FAITHFULNESS_MARGIN = 0.01  # AOPC comprehensiveness is a probability drop: 1 percentage point
MINIMAL_SHARE = 0.99
MIN_TESTABLE_EXAMPLES = 20  # fewer testable examples than this decide no explanation claim
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_mean_interval(
    values: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean of `values` [example] (NaN dropped);
    NaNs when no value is left."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(-1)
    tail = (1 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _interval(values: np.ndarray, seed: int) -> dict[str, float | int]:
    mean, low, high = bootstrap_mean_interval(values, seed)
    return {"mean": mean, "low": low, "high": high, "n": int((~np.isnan(np.asarray(values, np.float64))).sum())}


def _answer(comparison: dict[str, Any]) -> str:
    """What a comparison says: more / less faithful when its interval excludes 0, else no difference detected."""
    if comparison["n"] < MIN_TESTABLE_EXAMPLES:
        return not_testable(f"n = {comparison['n']}")
    if comparison["low"] > 0:
        return "more faithful"
    if comparison["high"] < 0:
        return "less faithful"
    return "no difference detected"


def faithfulness_comparisons(
    methods: Sequence[str], metrics: Sequence[str], aopc: np.ndarray, testable: np.ndarray, seed: int = 0
) -> list[dict[str, Any]]:
    """Every efficient method (matrices or norm-based) against its raw twin, paired over the examples where it is
    testable. aopc: [method, metric, example]; testable: [method, example] (1, 0, -1: analysis.explanations).

    Returns [{"method", "twin", "variant", "aggregation", "baseline" ("raw attention" or "norm-based attention"),
    "mean", "low", "high", "n" (testable examples with both numbers), "not_testable" (explained examples where E =
    A), "efficient_aopc", "twin_aopc", "answer"}]."""
    names = list(methods)
    comprehensiveness = list(metrics).index("comprehensiveness")
    rows = []
    for row, method in enumerate(map(explainer_record, names)):
        if not method.is_efficient or method.raw_twin not in names:
            continue
        twin = names.index(method.raw_twin)
        chosen = np.asarray(testable[row]) == 1
        efficient, raw = aopc[row, comprehensiveness, chosen], aopc[twin, comprehensiveness, chosen]
        comparison = {
            "method": method.name,
            "twin": method.raw_twin,
            "variant": method.source,
            "aggregation": method.aggregation,
            "baseline": "norm-based attention" if method.kind == "norms" else "raw attention",
            **_interval(efficient - raw, seed),
            "not_testable": int((np.asarray(testable[row]) == 0).sum()),
            "efficient_aopc": float(np.nanmean(efficient)) if chosen.any() else float("nan"),
            "twin_aopc": float(np.nanmean(raw)) if chosen.any() else float("nan"),
        }
        comparison["answer"] = _answer(comparison)
        rows.append(comparison)
    return rows


def explainer_ranking(
    methods: Sequence[str],
    metrics: Sequence[str],
    references: Sequence[str],
    aopc: np.ndarray,
    kendall_tau: np.ndarray,
    testable: np.ndarray,
    length: np.ndarray,
    head_dim: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every explainer over the examples where it is testable (all explained examples for methods that read no
    efficient variant), highest mean AOPC comprehensiveness first. aopc: [method, metric, example]; kendall_tau:
    [method, reference, example]; testable: [method, example]; length: [example].

    Returns [{"method", "n", "comprehensiveness": interval, "sufficiency": interval, "kendall_tau": {reference:
    interval}, "by_length": {"L > head dim": interval, "L <= head dim": interval} (comprehensiveness)}], each
    interval {"mean", "low", "high", "n"} (95 % bootstrap of the mean)."""
    long = np.asarray(length) > int(head_dim)
    rows = []
    for row, name in enumerate(methods):
        chosen = np.asarray(testable[row]) != 0
        comprehensiveness = aopc[row, list(metrics).index("comprehensiveness")]
        rows.append(
            {
                "method": name,
                "n": int(chosen.sum()),
                **{metric: _interval(aopc[row, index, chosen], seed) for index, metric in enumerate(metrics)},
                "kendall_tau": {
                    reference: _interval(kendall_tau[row, index, chosen], seed)
                    for index, reference in enumerate(references)
                },
                "by_length": {
                    f"L > {head_dim}": _interval(comprehensiveness[chosen & long], seed),
                    f"L <= {head_dim}": _interval(comprehensiveness[chosen & ~long], seed),
                },
            }
        )
    return sorted(rows, key=lambda item: -np.nan_to_num(item["comprehensiveness"]["mean"], nan=-np.inf))


def explanation_claims(
    comparisons: Sequence[dict[str, Any]], minimality_tested: np.ndarray, minimality_minimal: np.ndarray
) -> list[dict[str, Any]]:
    """comparisons: `faithfulness_comparisons`; minimality_tested, minimality_minimal: [example, layer] counts (-1:
    not measured). Returns the claims rows (all findings)."""
    rows = []
    for item in comparisons:
        efficient = (
            f"efficient attention ({item['variant']})"
            if item["baseline"] == "raw attention"
            else f"norm-based efficient attention ({item['variant']})"
        )
        n, low = item["n"], item["low"]
        if n < MIN_TESTABLE_EXAMPLES:
            verdict = not_testable(f"n = {n} examples where E differs from A, {MIN_TESTABLE_EXAMPLES} needed")
        else:
            verdict = "holds" if low >= -FAITHFULNESS_MARGIN else "does not hold"
        rows.append(
            {
                "claim": f"{efficient} explains at least as faithfully as {item['baseline']} ({item['aggregation']})",
                "kind": "finding",
                "test": f"AOPC comprehensiveness (ERASER, k = the stage's percents) of {item['method']} minus that of "
                f"{item['twin']}, paired over the examples where {item['variant']} differs from A (a block with a "
                f"null space and |E - A| above storage precision); holds when the lower end of the "
                f"{100 * CONFIDENCE:.0f} % bootstrap interval of the mean difference is >= -{FAITHFULNESS_MARGIN:g}; "
                f"not testable with fewer than {MIN_TESTABLE_EXAMPLES} such examples",
                "measured": f"AOPC {item['efficient_aopc']:.4f} vs {item['twin_aopc']:.4f}; difference "
                f"{item['mean']:+.4f} "
                f"[{item['low']:+.4f}, {item['high']:+.4f}] over {n} examples ({item['not_testable']} explained "
                "examples where E = A left out)",
                "verdict": verdict,
            }
        )
    tested = np.asarray(minimality_tested)
    measured = tested >= 0
    if measured.any():
        judged = int(np.where(measured, tested, 0).sum())
        minimal = int(np.where(measured, minimality_minimal, 0).sum())
        share = minimal / judged if judged else None
        rows.append(
            {
                "claim": "simplex supports are minimal",
                "kind": "finding",
                "test": "for sampled rows of the simplex variant, drop each support token in turn and look for any "
                "non-negative, sum-to-one row on the rest that keeps the head's output (NNLS); a row is minimal "
                f"when none exists; holds when >= {100 * MINIMAL_SHARE:.0f} % of the judged rows are minimal",
                "measured": "no row judged" if share is None else f"{100 * share:.2f} % of {judged} rows minimal",
                "verdict": not_testable("no sampled row could be judged")
                if share is None
                else ("holds" if share >= MINIMAL_SHARE else "does not hold"),
            }
        )
    return rows
