"""analysis.claims: the verdict of every claim follows its stated rule, from the numbers given."""

from __future__ import annotations

import numpy as np

from analysis.claims import (
    claims_table,
    efficient_diagnostics_summary,
    efficient_diagnostics_summary_of_parts,
    format_claims_table,
)
from analysis.interventions import parse_interventions

INTERVENTIONS = [
    "replay",
    "efficient:effective",
    "null:effective",
    "efficient+null-noise:effective",
    "colspace-noise:effective",
    "uniform",
    "ablate",
    "minimality:effective:k=1",
    "minimality:effective:k=2",
]
PARSED = parse_interventions(INTERVENTIONS)  # claims_table reads interventions as objects
TARGETS = ["all", "layer 0"]


def aggregates(**at_all):
    """Aggregates with the given values at target 'all': {name: {intervention: value}}."""
    arrays = {
        name: np.full((len(INTERVENTIONS), len(TARGETS)), np.nan)
        for name in ("agreement_rate", "flip_rate", "largest_logit_change", "largest_stored_logit_difference")
    }
    for name, values in at_all.items():
        for intervention, value in values.items():
            arrays[name][INTERVENTIONS.index(intervention), 0] = value
    return arrays


def verdicts(table):
    return {row["claim"]: row["verdict"] for row in table}


def test_verdicts_follow_the_numbers():
    numbers = aggregates(
        agreement_rate={
            "efficient:effective": 1.0,
            "efficient+null-noise:effective": 1.0,
            "minimality:effective:k=1": 0.97,
            "minimality:effective:k=2": 0.9,
            "null:effective": 0.6,
            "ablate": 0.6,
            "uniform": 0.8,
        },
        flip_rate={"null:effective": 0.4, "ablate": 0.4, "uniform": 0.2, "colspace-noise:effective": 0.1},
        largest_logit_change={
            "efficient:effective": 1e-6,
            "efficient+null-noise:effective": 1e-6,
            "colspace-noise:effective": 0.5,
            "null:effective": 2.0,
        },
        largest_stored_logit_difference={"replay": 0.0},
    )
    table = claims_table(PARSED, TARGETS, numbers, {}, original_accuracy=0.8)
    assert verdicts(table) == {
        "sufficient (effective)": "holds",
        "necessary (effective)": "holds",
        "the null part does not reach the output (effective)": "holds",
        "minimal (effective)": "holds",
        "replay reproduces the stored model": "holds",
    }
    row = next(row for row in table if row["claim"] == "necessary (effective)")
    assert row["measured"] == "predictions changed 40.00 % (ablate 40.00 %, uniform 20.00 %), largest |Δlogit| 2"
    assert "minimal (effective)" in format_claims_table(table)

    numbers["agreement_rate"][INTERVENTIONS.index("null:effective"), 0] = 0.99  # 1 % changed
    numbers["agreement_rate"][INTERVENTIONS.index("minimality:effective:k=1"), 0] = 1.0
    numbers["largest_logit_change"][INTERVENTIONS.index("colspace-noise:effective"), 0] = 5e-6  # not 10x more
    numbers["largest_stored_logit_difference"][0, 0] = 1e-3
    failing = verdicts(claims_table(PARSED, TARGETS, numbers, {}, 0.8))
    assert failing == {**{claim: "does not hold" for claim in failing}, "sufficient (effective)": "holds"}
    # a float16 store: replay is judged against the storage precision
    assert (
        verdicts(claims_table(PARSED, TARGETS, numbers, {}, 0.8, replay_tolerance=1e-2))[
            "replay reproduces the stored model"
        ]
        == "holds"
    )
    # minimality is only decided when the effective attention itself is sufficient
    numbers["agreement_rate"][INTERVENTIONS.index("efficient:effective"), 0] = 0.99
    numbers["agreement_rate"][INTERVENTIONS.index("minimality:effective:k=1"), 0] = 0.5
    assert verdicts(claims_table(PARSED, TARGETS, numbers, {}, 0.8))["minimal (effective)"] == "—"


def test_unmeasured_claims_say_so():
    table = claims_table(
        parse_interventions(["replay", "efficient:simplex"]), TARGETS, aggregates(), {}, original_accuracy=np.nan
    )
    assert verdicts(table) == {
        "sufficient (simplex)": "—",
        "necessary (simplex)": "—",
        "the null part does not reach the output (simplex)": "—",
        "replay reproduces the stored model": "—",
    }
    assert "not measured" in table[0]["measured"]


def test_probability_distribution_claim_from_diagnostics():
    shape = (2, 1, 2)  # example, layer, head

    def diagnostics(negative_mass, row_sum_error, null_dim):
        return {
            "null_dim": np.array(null_dim).reshape(shape),
            "row_sum_error": np.array(row_sum_error).reshape(shape),
            "negative_mass": np.array(negative_mass).reshape(shape),
            "null_norm_ratio": np.full(shape, 0.5),
            "converged": np.ones(shape, bool),
            "support_size": np.full(shape, 3.0),
        }

    summary = efficient_diagnostics_summary(
        {
            "simplex": diagnostics([0, 0, 0, 0.2], [0, 1e-7, 0, 0], [3, 3, 3, 0]),  # the negative one has no null space
            "stochastic": diagnostics([0, 0.1, 0, 0], [0, 0, 0, 0], [3, 3, 3, 3]),
        },
        length=np.array([6, 6]),
    )
    assert summary["simplex"]["matrices_with_null_space"] == 3
    assert summary["simplex"]["probability_distribution_share"] == 1.0
    assert summary["stochastic"]["probability_distribution_share"] == 0.75
    assert summary["simplex"]["mean_support_share"] == 0.5
    table = claims_table(parse_interventions(["replay"]), TARGETS, aggregates(), summary, 0.8)
    assert verdicts(table)["probability distributions (simplex)"] == "holds"
    assert verdicts(table)["probability distributions (stochastic)"] == "does not hold"


def test_claims_across_studies_keep_each_studys_verdict():
    from analysis.claims import claims_by_study, format_claims_by_study

    rows = claims_by_study(
        {
            "rt": [{"claim": "sufficient (effective)", "verdict": "holds", "measured": "agreement 100 %", "test": ""}],
            "lm": [
                {"claim": "sufficient (effective)", "verdict": "does not hold", "measured": "99 %", "test": ""},
                {"claim": "minimal (effective)", "verdict": "holds", "measured": "k=1: 90 %", "test": ""},
            ],
        }
    )
    assert rows == [
        {
            "claim": "sufficient (effective)",
            "rt": {"verdict": "holds", "measured": "agreement 100 %"},
            "lm": {"verdict": "does not hold", "measured": "99 %"},
        },
        {"claim": "minimal (effective)", "lm": {"verdict": "holds", "measured": "k=1: 90 %"}},
    ]
    text = format_claims_by_study(rows, ["rt", "lm"]).splitlines()
    assert text[1].split() == ["sufficient", "(effective)", "holds", "does", "not", "hold"]
    assert text[2].split() == ["minimal", "(effective)", "—", "holds"]


def test_the_diagnostics_summary_of_parts_along_the_examples_equals_that_of_the_whole():
    generator = np.random.default_rng(2)
    shape = (9, 2, 3)  # example, layer, head
    length = generator.integers(4, 12, shape[0])
    length[4] = 0  # an empty row of the store
    values = {
        "null_dim": generator.integers(0, 3, shape),
        "row_sum_error": generator.random(shape) * 2e-6,
        "negative_mass": np.where(generator.random(shape) < 0.5, 0.0, generator.random(shape)),
        "null_norm_ratio": generator.random(shape).astype(np.float32),
        "converged": generator.random(shape) < 0.8,
        "support_size": generator.integers(1, 4, shape).astype(np.float32),
    }
    no_null_space = {**values, "null_dim": np.zeros(shape, int)}
    whole = efficient_diagnostics_summary({"simplex": values, "effective": no_null_space}, length)
    parts = efficient_diagnostics_summary_of_parts(
        (
            {
                "simplex": {name: array[part] for name, array in values.items()},
                "effective": {name: array[part] for name, array in no_null_space.items()},
            },
            length[part],
        )
        for part in (slice(0, 2), slice(2, 5), slice(5, 9))
    )
    assert parts["effective"] == whole["effective"] == {"matrices_with_null_space": 0, "matrices": 8 * 6}
    chosen = (length > 0)[:, None, None] & (values["null_dim"] > 0)
    assert parts["simplex"]["matrices_with_null_space"] == int(chosen.sum())
    assert parts["simplex"]["largest_row_sum_error"] == values["row_sum_error"][chosen].max()
    np.testing.assert_allclose(
        parts["simplex"]["mean_null_norm_ratio"],
        values["null_norm_ratio"][chosen].astype(np.float64).mean(),
        rtol=1e-12,
    )
    for name, number in whole["simplex"].items():
        np.testing.assert_allclose(parts["simplex"][name], number, rtol=1e-12)


def _summary(matrices_with_null_space: int, matrices: int = 12) -> dict:
    if not matrices_with_null_space:
        return {"matrices_with_null_space": 0, "matrices": matrices}
    return {
        "matrices": matrices,
        "matrices_with_null_space": matrices_with_null_space,
        "probability_distribution_share": 1.0,
        "mean_negative_mass": 0.0,
        "largest_row_sum_error": 1e-9,
        "mean_null_norm_ratio": 0.3,
        "converged_share": 1.0,
        "mean_support_share": 0.5,
    }


def test_without_a_null_space_the_claims_that_need_one_are_not_testable():
    """The case of a store whose texts are no longer than the head dim: E = A, the noise has norm 0, and a claim
    that compares 0 with 10 x 0 must not say "does not hold" (nor "holds")."""
    numbers = aggregates(
        agreement_rate={
            "efficient:effective": 1.0,
            "efficient+null-noise:effective": 1.0,
            "null:effective": 0.6,
            "ablate": 0.6,
            "uniform": 0.8,
        },
        flip_rate={"colspace-noise:effective": 0.0},
        largest_logit_change={
            "efficient:effective": 0.0,
            "efficient+null-noise:effective": 0.0,
            "colspace-noise:effective": 0.0,
        },
        largest_stored_logit_difference={"replay": 0.0},
    )
    table = claims_table(PARSED, TARGETS, numbers, {"effective": _summary(0)}, original_accuracy=0.8)
    found = verdicts(table)
    reason = "no null space: E = A in all 12 matrices"
    assert found["sufficient (effective)"] == f"not testable ({reason})"
    assert found["necessary (effective)"] == f"not testable ({reason})"
    assert found["the null part does not reach the output (effective)"] == (
        f"not testable ({reason}, so the noise has norm ||A - E|| = 0)"
    )
    assert found["probability distributions (effective)"] == f"not testable ({reason})"
    assert found["replay reproduces the stored model"] == "holds"  # needs no null space
    # with a null space the same numbers decide (and the col(T) control that moved nothing cannot decide)
    with_null = verdicts(claims_table(PARSED, TARGETS, numbers, {"effective": _summary(5)}, 0.8))
    assert with_null["sufficient (effective)"] == "holds"
    assert with_null["the null part does not reach the output (effective)"].startswith("not testable (the col(T)")


def test_identities_come_after_the_findings_labelled_with_their_precision():
    numbers = aggregates(
        agreement_rate={"efficient:effective": 1.0, "minimality:effective:k=1": 0.9},
        largest_logit_change={"efficient:effective": 3e-7},
        largest_stored_logit_difference={"replay": 0.0},
    )
    summary = {"effective": _summary(5), "simplex": _summary(5)}
    table = claims_table(PARSED, TARGETS, numbers, summary, 0.8)
    kinds = [row["kind"] for row in table]
    assert kinds == sorted(kinds, key=lambda kind: kind == "identity")  # findings first
    by_claim = {row["claim"]: row for row in table}
    assert by_claim["sufficient (effective)"]["kind"] == "identity"
    assert by_claim["sufficient (effective)"]["precision"] == "largest |Δlogit| 3e-07"
    assert by_claim["minimal (effective)"]["kind"] == "finding"
    # simplex rows are distributions by the variant's constraints; effective's are an empirical question
    assert by_claim["probability distributions (simplex)"]["kind"] == "identity"
    assert by_claim["probability distributions (effective)"]["kind"] == "finding"
    lines = format_claims_table(table).splitlines()
    heading = lines.index(next(line for line in lines if line.startswith("identity checks")))
    assert all("sufficient" not in line for line in lines[:heading])
    assert any(
        line.startswith("sufficient (effective)") and "largest |Δlogit| 3e-07" in line for line in lines[heading:]
    )
