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
_DIAGNOSTIC_MEANS = (
    "probability_distribution_share",
    "mean_negative_mass",
    "mean_null_norm_ratio",
    "converged_share",
    "mean_support_share",
)


def efficient_diagnostics_summary_of_parts(
    parts: Iterable[tuple[dict[str, dict[str, np.ndarray]], np.ndarray]],
) -> dict[str, dict[str, float]]:
    """`efficient_diagnostics_summary` of (diagnostics, length) given in parts along the example axis (e.g. one
    store shard at a time), so that memory does not grow with the corpus. Sums are float64."""
    totals: dict[str, dict[str, float]] = {}
    for diagnostics, length in parts:
        length = np.asarray(length)
        for variant, values in diagnostics.items():
            total = totals.setdefault(
                variant,
                {
                    "matrices": 0,
                    "matrices_with_null_space": 0,
                    "largest_row_sum_error": -np.inf,
                    **dict.fromkeys(_DIAGNOSTIC_MEANS, 0.0),
                },
            )
            real = (length > 0)[:, None, None] & np.ones(values["null_dim"].shape, dtype=bool)
            chosen = real & (values["null_dim"] > 0)
            total["matrices"] += int(real.sum())
            total["matrices_with_null_space"] += int(chosen.sum())
            if not chosen.any():
                continue
            distribution = (values["row_sum_error"] <= PROBABILITY_TOLERANCE) & (
                values["negative_mass"] <= NEGATIVE_TOLERANCE
            )
            support = values["support_size"] / np.maximum(length, 1)[:, None, None]
            per_matrix = {
                "probability_distribution_share": distribution,
                "mean_negative_mass": values["negative_mass"],
                "mean_null_norm_ratio": values["null_norm_ratio"],
                "converged_share": values["converged"],
                "mean_support_share": support,
            }
            for name, matrix_values in per_matrix.items():
                total[name] += float(np.asarray(matrix_values)[chosen].sum(dtype=np.float64))
            total["largest_row_sum_error"] = max(
                total["largest_row_sum_error"], float(values["row_sum_error"][chosen].max())
            )
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


NULL_ABLATE_TOLERANCE = 0.01  # the null part acts as ablation: their changed shares agree within 1 point


def not_testable(reason: str) -> str:
    """The verdict of a claim the data cannot decide, with why."""
    return f"not testable ({reason})"


def _no_null_space(summary: dict[str, float] | None) -> str | None:
    """Why a variant's claims cannot be tested when no matrix has a null space (there E = A), else None."""
    if summary is None or summary.get("matrices_with_null_space"):
        return None
    return f"no null space: E = A in all {summary.get('matrices', 0)} matrices"


def claims_table(
    interventions: Sequence[Intervention],
    targets: Sequence[str],
    aggregates: dict[str, np.ndarray],
    diagnostics_summary: dict[str, dict[str, float]],
    original_accuracy: float,
    replay_tolerance: float = 1e-4,
) -> list[dict[str, Any]]:
    """The claims table: one row per claim and variant, {"claim", "kind", "test", "measured", "verdict"} and, for
    identity checks, "precision". Rows of kind "finding" are empirical; rows of kind "identity" hold by construction
    (linear algebra) and check storage precision and the pipeline; findings come first. A claim whose test needs
    what the data lacks (a null space, a measured intervention) says "not testable (why)".

    aggregates: {name: [intervention, target]} (analysis.causal.aggregate_metrics) with `interventions` (parsed:
    analysis.interventions.parse_interventions) and `targets` naming their rows and columns; diagnostics_summary:
    `efficient_diagnostics_summary`; replay_tolerance: the largest difference to the stored logits that replay may
    show (REPLAY_TOLERANCE of the store's dtype)."""
    from analysis.variants import variant_record

    value = _lookup(interventions, targets, aggregates)
    variants = [item.variant for item in interventions if item.kind.name == "efficient"]
    findings, identities = [], []

    def changed(intervention: Intervention) -> float | None:
        agreement = value("agreement_rate", intervention)
        return None if agreement is None else 1.0 - agreement

    ablate, uniform = Intervention("ablate"), Intervention("uniform")
    for variant in variants:
        agreement = value("agreement_rate", Intervention("efficient", variant))
        change = value("largest_logit_change", Intervention("efficient", variant))
        empty = _no_null_space(diagnostics_summary.get(variant.name))
        identities.append(
            {
                "claim": f"sufficient ({variant.name})",
                "kind": "identity",
                "precision": f"largest |Δlogit| {_number(change)}",
                "test": f"inject efficient:{variant.name} into every head of every layer; holds when >= "
                f"{100 * SUFFICIENT_AGREEMENT:.1f} % of predictions are kept. E·T = A·T by construction: this "
                "checks that the stored E carries the model's computation through storage precision",
                "measured": f"agreement {_percent(agreement)}, largest |Δlogit| {_number(change)}",
                "verdict": not_testable(empty)
                if empty
                else "—"
                if agreement is None
                else ("holds" if agreement >= SUFFICIENT_AGREEMENT else "does not hold"),
            }
        )
    for variant in variants:
        share = changed(Intervention("null", variant))
        null_change = value("largest_logit_change", Intervention("null", variant))
        ablated = changed(ablate)
        empty = _no_null_space(diagnostics_summary.get(variant.name))
        if empty:
            verdict = not_testable(empty)
        elif share is None or ablated is None:
            verdict = "—"
        else:
            verdict = "holds" if abs(share - ablated) <= NULL_ABLATE_TOLERANCE else "does not hold"
        identities.append(
            {
                "claim": f"necessary ({variant.name})",
                "kind": "identity",
                "precision": "not measured"
                if share is None or ablated is None
                else f"changed shares differ by {100 * abs(share - ablated):.2f} points (tolerance "
                f"{100 * NULL_ABLATE_TOLERANCE:g})",
                "test": "inject only the null part A - E everywhere. By construction (A - E)·T = 0: every head's "
                "output is "
                "zero, exactly what ablating the heads does, so the predictions it changes are ablation's; holds "
                f"when the shares of changed predictions agree within {100 * NULL_ABLATE_TOLERANCE:g} point "
                "(uniform attention for comparison)",
                "measured": f"predictions changed {_percent(share)} (ablate {_percent(ablated)}, uniform "
                f"{_percent(changed(uniform))}), largest |Δlogit| {_number(null_change)}",
                "verdict": verdict,
            }
        )
    for variant in variants:
        kept = value("agreement_rate", Intervention("efficient+null-noise", variant))
        noise_change = value("largest_logit_change", Intervention("efficient+null-noise", variant))
        colspace_change = value("largest_logit_change", Intervention("colspace-noise", variant))
        colspace_flips = value("flip_rate", Intervention("colspace-noise", variant))
        empty = _no_null_space(diagnostics_summary.get(variant.name))
        if empty:
            verdict = not_testable(f"{empty}, so the noise has norm ||A - E|| = 0")
        elif kept is None or colspace_change is None:
            verdict = "—"
        elif colspace_change == 0:
            verdict = not_testable("the col(T) control did not move the logits: the noise norm is 0")
        else:
            holds = kept >= SUFFICIENT_AGREEMENT and colspace_change > 10 * (noise_change or 0.0)
            verdict = "holds" if holds else "does not hold"
        identities.append(
            {
                "claim": f"the null part does not reach the output ({variant.name})",
                "kind": "identity",
                "precision": f"null noise largest |Δlogit| {_number(noise_change)}",
                "test": "E + random left-null noise of the removed norm must keep the predictions (by construction it "
                "adds nothing to the output); the same norm inside col(T) must move the logits (holds when noise "
                "keeps >= 99.9 % and col(T) noise moves the logits 10x more)",
                "measured": f"null noise: agreement {_percent(kept)}, largest |Δlogit| {_number(noise_change)}; col(T) "
                f"noise: flip rate {_percent(colspace_flips)}, largest |Δlogit| {_number(colspace_change)}",
                "verdict": verdict,
            }
        )
    probes = sorted(item.removed_directions for item in interventions if item.kind.removes_directions)
    if probes:
        agreements = [(k, value("agreement_rate", Intervention("minimality", "effective", k))) for k in probes]
        first_k, first_agreement = agreements[0]
        sufficient = value("agreement_rate", Intervention("efficient", "effective"))
        decided = first_agreement is not None and sufficient is not None and sufficient >= SUFFICIENT_AGREEMENT
        findings.append(
            {
                "claim": "minimal (effective)",
                "kind": "finding",
                "test": "drop the k weakest directions of col(T) from the effective projection; holds when the "
                "effective "
                f"attention itself is sufficient and dropping even k = {first_k} loses predictions (agreement < "
                f"{100 * SUFFICIENT_AGREEMENT:.1f} %)",
                "measured": ", ".join(f"k={k}: {_percent(agreement)}" for k, agreement in agreements)
                + f" (k=0: {_percent(sufficient)})",
                "verdict": "—"
                if not decided
                else ("holds" if first_agreement < SUFFICIENT_AGREEMENT else "does not hold"),
            }
        )
    for variant, summary in diagnostics_summary.items():
        try:
            guaranteed = variant_record(variant).keeps_row_sums and variant_record(variant).non_negative
        except (KeyError, ValueError):  # a variant registered in another process: its record is not known here
            guaranteed = False
        rule = (
            "every row non-negative and summing to 1 (within 1e-4), over the matrices with a null space; holds "
            "when all are"
        )
        empty = _no_null_space(summary)
        if empty:
            row = {
                "measured": f"0 of {summary.get('matrices', 0)} matrices have a null space",
                "verdict": not_testable(empty),
            }
        else:
            share = summary["probability_distribution_share"]
            row = {
                "measured": f"{_percent(share)} of {summary['matrices_with_null_space']} matrices; mean negative "
                f"mass {summary['mean_negative_mass']:.3g}, largest row-sum error "
                f"{summary['largest_row_sum_error']:.3g}, ||null||/||A|| "
                f"{summary['mean_null_norm_ratio']:.3g}",
                "verdict": "holds" if share == 1.0 else "does not hold",
            }
        if guaranteed:
            identities.append(
                {
                    "claim": f"probability distributions ({variant})",
                    "kind": "identity",
                    "precision": f"largest row-sum error {summary.get('largest_row_sum_error', 0):.3g}",
                    "test": f"{rule} (the variant's constraints: it checks the solver)",
                    **row,
                }
            )
        else:
            findings.append({"claim": f"probability distributions ({variant})", "kind": "finding", "test": rule, **row})
    replay = value("largest_stored_logit_difference", Intervention("replay"))
    identities.append(
        {
            "claim": "replay reproduces the stored model",
            "kind": "identity",
            "precision": f"largest |Δ| {_number(replay)}, tolerance {replay_tolerance:g}",
            "test": "inject the stored attention everywhere; holds when every stored logit is reproduced within "
            f"{replay_tolerance:g} (set by the storage dtype)",
            "measured": f"largest |Δ| to the stored logits {_number(replay)}; original accuracy "
            f"{_percent(original_accuracy if not np.isnan(original_accuracy) else None)}",
            "verdict": "—" if replay is None else ("holds" if replay <= replay_tolerance else "does not hold"),
        }
    )
    return findings + identities


def findings_first(claims: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the findings first and the identity checks after, each group in its order."""
    return [row for row in claims if row.get("kind", "finding") != "identity"] + [
        row for row in claims if row.get("kind") == "identity"
    ]


IDENTITY_HEADING = (
    "identity checks: these hold by construction (linear algebra); they check storage precision and "
    "the pipeline, not the claims"
)


def format_claims_table(claims: Sequence[dict[str, Any]]) -> str:
    """The claims table as aligned plain text (what `effattn causal` and `make run` print): the findings, then the
    identity checks under their own heading, with the precision they were checked to."""
    claims = findings_first(claims)
    width = max(len(row["claim"]) for row in claims) if claims else 0
    verdict_width = max(len(row["verdict"]) for row in claims) if claims else 0
    lines = [f"{'finding':<{width}}  {'verdict':<{verdict_width}}  measured"]
    heading_done = False
    for row in claims:
        if row.get("kind") == "identity" and not heading_done:
            lines += ["", IDENTITY_HEADING, f"{'identity check':<{width}}  {'verdict':<{verdict_width}}  precision"]
            heading_done = True
        detail = row["precision"] if row.get("kind") == "identity" else row["measured"]
        lines.append(f"{row['claim']:<{width}}  {row['verdict']:<{verdict_width}}  {detail}")
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
