"""The claims of SEED.md, one by one, answered by numbers from the causal results and the efficient diagnostics.

Each row of the claims table is {"claim", "test", "measured", "verdict"}; the verdict follows a rule written in
the row's `test` text, so a reader can check it against the numbers. Interventions measured at target "all"
(every head of every layer replaced at once) decide the verdicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from analysis.interventions import Intervention

SUFFICIENT_AGREEMENT = 0.999  # the bar: >= 99.9 % of predictions kept
NECESSARY_FLIP_RATE = 0.05  # removing efficient attention must change at least 5 % of predictions
PROBABILITY_TOLERANCE = 1e-4  # row sums within this of 1 (attention is stored in float32 or float16)
NEGATIVE_TOLERANCE = 1e-9  # negative mass at most this (computed in float64)
REPLAY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}  # replayed vs stored logits, by the store's attention dtype


def efficient_diagnostics_summary(
    diagnostics: dict[str, dict[str, np.ndarray]], length: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per variant, over every (example, layer, head) whose null space is not empty (L > rank; the others are A
    itself): how many such matrices, the share whose rows are probability distributions, mean negative mass,
    largest row-sum error, mean ||null|| / ||A||, share solved to convergence and the mean support per row as a
    share of L. diagnostics: {variant: {name: [example, layer, head]}} (storage_schemas.efficient_store);
    length: [example]."""
    return efficient_diagnostics_summary_of_parts([(diagnostics, length)])


# Summary entries that are means over the chosen matrices, and the per-matrix values they average.
_DIAGNOSTIC_MEANS = ("probability_distribution_share", "mean_negative_mass", "mean_null_norm_ratio",
                     "converged_share", "mean_support_share")


def efficient_diagnostics_summary_of_parts(
    parts: Iterable[tuple[dict[str, dict[str, np.ndarray]], np.ndarray]]
) -> dict[str, dict[str, float]]:
    """`efficient_diagnostics_summary` of (diagnostics, length) given in parts along the example axis (e.g. one
    store shard at a time), so that memory does not grow with the corpus. Sums are float64."""
    totals: dict[str, dict[str, float]] = {}
    for diagnostics, length in parts:
        length = np.asarray(length)
        for variant, values in diagnostics.items():
            total = totals.setdefault(variant, {"matrices": 0, "matrices_with_null_space": 0,
                                                "largest_row_sum_error": -np.inf,
                                                **dict.fromkeys(_DIAGNOSTIC_MEANS, 0.0)})
            real = (length > 0)[:, None, None] & np.ones(values["null_dim"].shape, dtype=bool)
            chosen = real & (values["null_dim"] > 0)
            total["matrices"] += int(real.sum())
            total["matrices_with_null_space"] += int(chosen.sum())
            if not chosen.any():
                continue
            distribution = ((values["row_sum_error"] <= PROBABILITY_TOLERANCE)
                            & (values["negative_mass"] <= NEGATIVE_TOLERANCE))
            support = values["support_size"] / np.maximum(length, 1)[:, None, None]
            per_matrix = {"probability_distribution_share": distribution, "mean_negative_mass": values["negative_mass"],
                          "mean_null_norm_ratio": values["null_norm_ratio"], "converged_share": values["converged"],
                          "mean_support_share": support}
            for name, matrix_values in per_matrix.items():
                total[name] += float(np.asarray(matrix_values)[chosen].sum(dtype=np.float64))
            total["largest_row_sum_error"] = max(total["largest_row_sum_error"],
                                                 float(values["row_sum_error"][chosen].max()))
    summary = {}
    for variant, total in totals.items():
        count = total["matrices_with_null_space"]
        if count == 0:
            summary[variant] = {"matrices_with_null_space": 0, "matrices": total["matrices"]}
            continue
        summary[variant] = {
            "matrices": total["matrices"],
            "matrices_with_null_space": count,
            "probability_distribution_share": total["probability_distribution_share"] / count,
            "mean_negative_mass": total["mean_negative_mass"] / count,
            "largest_row_sum_error": total["largest_row_sum_error"],
            "mean_null_norm_ratio": total["mean_null_norm_ratio"] / count,
            "converged_share": total["converged_share"] / count,
            "mean_support_share": total["mean_support_share"] / count,
        }
    return summary


def _lookup(interventions: Sequence[Intervention], targets: Sequence[str], aggregates: dict[str, np.ndarray]):
    rows = {intervention: row for row, intervention in enumerate(interventions)}

    def value(name: str, intervention: Intervention, target: str = "all") -> float | None:
        """The aggregate `name` of `intervention` at `target`; None: not measured."""
        if intervention not in rows or target not in targets:
            return None
        number = aggregates[name][rows[intervention], list(targets).index(target)]
        return None if np.isnan(number) else float(number)

    return value


def _percent(number: float | None) -> str:
    return "not measured" if number is None else f"{100 * number:.2f} %"


def _number(number: float | None) -> str:
    return "not measured" if number is None else f"{number:.3g}"


def claims_table(
    interventions: Sequence[Intervention],
    targets: Sequence[str],
    aggregates: dict[str, np.ndarray],
    diagnostics_summary: dict[str, dict[str, float]],
    original_accuracy: float,
    replay_tolerance: float = 1e-4,
) -> list[dict[str, Any]]:
    """The claims table: one row per claim and variant. aggregates: {name: [intervention, target]}
    (analysis.causal.aggregate_metrics) with `interventions` (parsed: analysis.interventions.parse_interventions)
    and `targets` naming their rows and columns;
    replay_tolerance: the largest difference to the stored logits that replay may show (REPLAY_TOLERANCE of the
    store's dtype)."""
    value = _lookup(interventions, targets, aggregates)
    variants = [item.variant for item in interventions if item.kind.name == "efficient"]
    rows = []
    for variant in variants:
        agreement = value("agreement_rate", Intervention("efficient", variant))
        change = value("largest_logit_change", Intervention("efficient", variant))
        rows.append({
            "claim": f"sufficient ({variant.name})",
            "test": f"inject efficient:{variant.name} into every head of every layer; holds when >= "
                    f"{100 * SUFFICIENT_AGREEMENT:.1f} % of predictions are kept (E·T = A·T by construction: this "
                    "checks that the stored E carries the model's computation through storage precision)",
            "measured": f"agreement {_percent(agreement)}, largest |Δlogit| {_number(change)}",
            "verdict": "—" if agreement is None else ("holds" if agreement >= SUFFICIENT_AGREEMENT else "does not hold"),
        })
    def changed(intervention: Intervention) -> float | None:
        agreement = value("agreement_rate", intervention)
        return None if agreement is None else 1.0 - agreement

    ablate, uniform = Intervention("ablate"), Intervention("uniform")
    for variant in variants:
        share = changed(Intervention("null", variant))
        null_change = value("largest_logit_change", Intervention("null", variant))
        rows.append({
            "claim": f"necessary ({variant.name})",
            "test": f"inject only the null part A - E everywhere; holds when >= {100 * NECESSARY_FLIP_RATE:.0f} % of "
                    "predictions change. By construction (A - E)·T = 0: within one layer the null part does exactly "
                    "what ablating the layer's heads does, so compare ablate (zero attention) and uniform attention",
            "measured": f"predictions changed {_percent(share)} (ablate {_percent(changed(ablate))}, uniform "
                        f"{_percent(changed(uniform))}), largest |Δlogit| {_number(null_change)}",
            "verdict": "—" if share is None else ("holds" if share >= NECESSARY_FLIP_RATE else "does not hold"),
        })
    for variant in variants:
        kept = value("agreement_rate", Intervention("efficient+null-noise", variant))
        noise_change = value("largest_logit_change", Intervention("efficient+null-noise", variant))
        colspace_change = value("largest_logit_change", Intervention("colspace-noise", variant))
        colspace_flips = value("flip_rate", Intervention("colspace-noise", variant))
        holds = (kept is not None and colspace_change is not None and kept >= SUFFICIENT_AGREEMENT
                 and colspace_change > 10 * (noise_change or 0.0))
        rows.append({
            "claim": f"the null part does not reach the output ({variant.name})",
            "test": "E + random left-null noise of the removed norm must keep the predictions; the same norm inside "
                    "col(T) must move the logits (holds when noise keeps >= 99.9 % and col(T) noise moves the "
                    "logits 10x more)",
            "measured": f"null noise: agreement {_percent(kept)}, largest |Δlogit| {_number(noise_change)}; col(T) "
                        f"noise: flip rate {_percent(colspace_flips)}, largest |Δlogit| {_number(colspace_change)}",
            "verdict": "—" if kept is None or colspace_change is None else ("holds" if holds else "does not hold"),
        })
    probes = sorted(item.removed_directions for item in interventions if item.kind.removes_directions)
    if probes:
        agreements = [(k, value("agreement_rate", Intervention("minimality", "effective", k))) for k in probes]
        first_k, first_agreement = agreements[0]
        sufficient = value("agreement_rate", Intervention("efficient", "effective"))
        decided = first_agreement is not None and sufficient is not None and sufficient >= SUFFICIENT_AGREEMENT
        rows.append({
            "claim": "minimal (effective)",
            "test": "drop the k weakest directions of col(T) from the effective projection; holds when the effective "
                    f"attention itself is sufficient and dropping even k = {first_k} loses predictions (agreement < "
                    f"{100 * SUFFICIENT_AGREEMENT:.1f} %)",
            "measured": ", ".join(f"k={k}: {_percent(agreement)}" for k, agreement in agreements)
                        + f" (k=0: {_percent(sufficient)})",
            "verdict": "—" if not decided else ("holds" if first_agreement < SUFFICIENT_AGREEMENT else "does not hold"),
        })
    for variant, summary in diagnostics_summary.items():
        if not summary.get("matrices_with_null_space"):
            continue
        share = summary["probability_distribution_share"]
        rows.append({
            "claim": f"probability distributions ({variant})",
            "test": "every row non-negative and summing to 1 (within 1e-4), over the matrices with a null space; "
                    "holds when all are",
            "measured": f"{_percent(share)} of {summary['matrices_with_null_space']} matrices; mean negative mass "
                        f"{summary['mean_negative_mass']:.3g}, largest row-sum error "
                        f"{summary['largest_row_sum_error']:.3g}, ||null||/||A|| {summary['mean_null_norm_ratio']:.3g}",
            "verdict": "holds" if share == 1.0 else "does not hold",
        })
    replay = value("largest_stored_logit_difference", Intervention("replay"))
    rows.append({
        "claim": "replay reproduces the stored model",
        "test": "inject the stored attention everywhere; holds when every stored logit is reproduced within "
                f"{replay_tolerance:g} (set by the storage dtype)",
        "measured": f"largest |Δ| to the stored logits {_number(replay)}; original accuracy "
                    f"{_percent(original_accuracy if not np.isnan(original_accuracy) else None)}",
        "verdict": "—" if replay is None else ("holds" if replay <= replay_tolerance else "does not hold"),
    })
    return rows


def format_claims_table(claims: Sequence[dict[str, Any]]) -> str:
    """The claims table as aligned plain text (what `effattn causal` and `make run` print)."""
    width = max(len(row["claim"]) for row in claims) if claims else 0
    verdict_width = max(len(row["verdict"]) for row in claims) if claims else 0
    lines = [f"{'claim':<{width}}  {'verdict':<{verdict_width}}  measured"]
    lines += [f"{row['claim']:<{width}}  {row['verdict']:<{verdict_width}}  {row['measured']}" for row in claims]
    return "\n".join(lines)


def claims_by_study(tables: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per claim across studies: {"claim", study: {"verdict", "measured"} for every study} (a study that did
    not measure a claim has no entry), claims in the order they first appear."""
    rows: dict[str, dict[str, Any]] = {}
    for study, table in tables.items():
        for row in table:
            entry = rows.setdefault(row["claim"], {"claim": row["claim"]})
            entry[study] = {"verdict": row["verdict"], "measured": row["measured"]}
    return list(rows.values())


def format_claims_by_study(rows: Sequence[dict[str, Any]], studies: Sequence[str]) -> str:
    """Verdicts of every claim (rows) in every study (columns) as aligned plain text."""
    width = max([len("claim")] + [len(row["claim"]) for row in rows])
    widths = [max(len(study), 13) for study in studies]
    lines = ["  ".join([f"{'claim':<{width}}"] + [f"{study:<{w}}" for study, w in zip(studies, widths)])]
    for row in rows:
        cells = [f"{row.get(study, {}).get('verdict', '—'):<{w}}" for study, w in zip(studies, widths)]
        lines.append("  ".join([f"{row['claim']:<{width}}"] + cells))
    return "\n".join(lines)
