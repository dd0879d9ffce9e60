"""The explanation claims: rows of the claims table ({"claim", "test", "measured", "verdict"}, as analysis.claims),
decided by rules stated in each row's `test` from the explanation results' numbers.

- "efficient attention (V) explains at least as faithfully as raw attention (aggregation)": the paired difference
  of AOPC comprehensiveness, V's minus A's, over the examples; holds when the lower end of its 95 % bootstrap
  confidence interval of the mean is >= -FAITHFULNESS_MARGIN.
- "simplex supports are minimal": holds when at least MINIMAL_SHARE of the judged sampled rows are minimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.explanations import ATTENTION_SOURCE, ExplanationMethod

FAITHFULNESS_MARGIN = 0.01  # AOPC comprehensiveness is a probability drop: 1 percentage point
MINIMAL_SHARE = 0.99
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_mean_interval(values: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                            confidence: float = CONFIDENCE) -> tuple[float, float, float]:
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


def explanation_claims(methods: Sequence[str], metrics: Sequence[str], aopc: np.ndarray,
                       minimality_tested: np.ndarray, minimality_minimal: np.ndarray, seed: int = 0
                       ) -> list[dict[str, Any]]:
    """aopc: [method, metric, example]; minimality_tested, minimality_minimal: [example, layer] counts (-1: not
    measured). Returns the claims rows."""
    parsed = [ExplanationMethod.parse(name) for name in methods]
    comprehensiveness = list(metrics).index("comprehensiveness")
    rows = []
    for method in parsed:
        if method.kind != "matrices" or method.source == ATTENTION_SOURCE:
            continue
        raw = f"{ATTENTION_SOURCE}:{method.aggregation}"
        if raw not in methods:
            continue
        difference = (aopc[list(methods).index(method.name), comprehensiveness]
                      - aopc[list(methods).index(raw), comprehensiveness])
        mean, low, high = bootstrap_mean_interval(difference, seed)
        efficient_mean = float(np.nanmean(aopc[list(methods).index(method.name), comprehensiveness]))
        raw_mean = float(np.nanmean(aopc[list(methods).index(raw), comprehensiveness]))
        rows.append({
            "claim": f"efficient attention ({method.source}) explains at least as faithfully as raw attention "
                     f"({method.aggregation})",
            "test": f"AOPC comprehensiveness (ERASER, k = the stage's percents) of {method.name} minus that of {raw}, "
                    f"paired over the examples; holds when the lower end of the {100 * CONFIDENCE:.0f} % bootstrap "
                    f"interval of the mean difference is >= -{FAITHFULNESS_MARGIN:g}",
            "measured": f"AOPC {efficient_mean:.4f} vs {raw_mean:.4f}; difference {mean:+.4f} "
                        f"[{low:+.4f}, {high:+.4f}] over {int((~np.isnan(difference)).sum())} examples",
            "verdict": "—" if np.isnan(low) else ("holds" if low >= -FAITHFULNESS_MARGIN else "does not hold"),
        })
    tested = np.asarray(minimality_tested)
    measured = tested >= 0
    if measured.any():
        judged = int(np.where(measured, tested, 0).sum())
        minimal = int(np.where(measured, minimality_minimal, 0).sum())
        share = minimal / judged if judged else None
        rows.append({
            "claim": "simplex supports are minimal",
            "test": "for sampled rows of the simplex variant, drop each support token in turn and look for any "
                    "non-negative, sum-to-one row on the rest that keeps the head's output (NNLS); a row is minimal "
                    f"when none exists; holds when >= {100 * MINIMAL_SHARE:.0f} % of the judged rows are minimal",
            "measured": "no row judged" if share is None else f"{100 * share:.2f} % of {judged} rows minimal",
            "verdict": "—" if share is None else ("holds" if share >= MINIMAL_SHARE else "does not hold"),
        })
    return rows
