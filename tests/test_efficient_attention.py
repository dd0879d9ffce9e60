"""Tests of analysis.efficient_attention: the invariants of DESIGN.md ("Efficient attention"), checked against
independent numpy/scipy computations (SVD projectors, SLSQP), on random problems and with hypothesis.

Tolerances: outputs A_eff·T match A·T to 1e-9 relative (simplex: 1e-8); projectors are idempotent and symmetric
to 1e-12; row sums are 1 to 1e-12; closed-form variants match the numpy reference to 1e-10, the simplex matches
SLSQP to 1e-6 and itself across equivalent problems to 1e-8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from analysis import efficient_attention as ea
from analysis import projections
from analysis.efficient_attention import DIAGNOSTICS, VARIANTS, effective_attention_reference_loop, efficient_attention
from analysis.key_bands import CAUSAL_BAND, KeyBand, default_band
from analysis.projections import full_rank_certificate

EPS = np.finfo(np.float64).eps
PROPERTY = settings(max_examples=40, deadline=None)
SLOW_PROPERTY = settings(max_examples=15, deadline=None)  # one batched call per prefix length


# ------------------------------------------------------------------------------------------------ problem makers


def softmax_rows(scores: np.ndarray, causal: bool) -> np.ndarray:
    """Row softmax over the last axis; causal masks keys after the query."""
    if causal:
        size = scores.shape[-1]
        scores = np.where(np.tril(np.ones((size, size), dtype=bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def make_problem(
    seed: int,
    examples=2,
    layers=1,
    heads=2,
    kv_heads=None,
    positions=12,
    head_dim=4,
    hidden=16,
    lengths=None,
    causal=False,
    sharpness=1.0,
):
    """A random batch in the store layout: attention [e, l, h, q, k], value [e, l, kv, p, d], w_out [l, h, d, D]."""
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    lengths = np.full(examples, positions) if lengths is None else np.asarray(lengths)
    attention = np.zeros((examples, layers, heads, positions, positions))
    value = rng.normal(size=(examples, layers, kv_heads, positions, head_dim))
    w_out = rng.normal(size=(layers, heads, head_dim, hidden))
    for example, size in enumerate(lengths):
        value[example, :, :, size:, :] = 0.0
        if size == 0:
            continue
        scores = rng.normal(size=(layers, heads, size, size)) * sharpness
        attention[example, :, :, :size, :size] = softmax_rows(scores, causal)
    return attention, value, w_out, lengths.astype(np.int64)


def head_output_matrix(value, w_out, example, layer, head, size):
    """T = V W_O^h for one head (kv head h // group), real rows only."""
    group = w_out.shape[1] // value.shape[2]
    return value[example, layer, head // group, :size] @ w_out[layer, head]


# ------------------------------------------------------------------------------------------------ references


def svd_basis(matrix: np.ndarray, hidden_size: int) -> np.ndarray:
    """Orthonormal basis of the numerical column space (σ > σ_max·max(L, D)·eps), by numpy SVD."""
    left, singular_values, _ = np.linalg.svd(matrix, full_matrices=False)
    if singular_values.size == 0 or singular_values[0] == 0:
        return left[:, :0]
    return left[:, singular_values > singular_values[0] * max(matrix.shape[0], hidden_size) * EPS]


def reference_projector(t: np.ndarray, variant: str) -> np.ndarray:
    """P_T (effective) or P_[T|1] (stochastic, the ones column scaled to ‖T‖_F/√L) by numpy SVD."""
    size, hidden = t.shape
    if variant == "effective":
        basis = svd_basis(t, hidden)
    else:
        scale = np.linalg.norm(t) / np.sqrt(size) or 1.0
        basis = svd_basis(np.hstack([t, np.full((size, 1), scale)]), hidden + 1)
    return basis @ basis.T


def reference_closed_form(attention, value, w_out, lengths, variant, causal):
    """Effective/stochastic attention by an explicit loop over matrices and (causal) over rows."""
    result = np.zeros_like(attention)
    examples, layers, heads = attention.shape[:3]
    for example in range(examples):
        size = lengths[example]
        for layer in range(layers):
            for head in range(heads):
                t = head_output_matrix(value, w_out, example, layer, head, size)
                a = attention[example, layer, head, :size, :size]
                if not causal:
                    result[example, layer, head, :size, :size] = a @ reference_projector(t, variant)
                    continue
                for query in range(size):
                    prefix = reference_projector(t[: query + 1], variant)
                    result[example, layer, head, query, : query + 1] = a[query, : query + 1] @ prefix
    return result


def slsqp_simplex_row(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """argmin ½‖b‖² s.t. bT = aT, Σb = Σa, b ≥ 0 with scipy's SLSQP (independent of the module)."""
    constraint_matrix = svd_basis(np.hstack([t, np.ones((len(a), 1))]), t.shape[1] + 1).T  # independent rows
    target = constraint_matrix @ a
    solution = minimize(
        lambda b: 0.5 * b @ b,
        a,
        jac=lambda b: b,
        method="SLSQP",
        bounds=[(0, None)] * len(a),
        constraints=[
            {"type": "eq", "fun": lambda b: constraint_matrix @ b - target, "jac": lambda b: constraint_matrix}
        ],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert solution.success, solution.message
    return solution.x


def relative_output_error(efficient_block, attention_block, t):
    return np.linalg.norm((efficient_block - attention_block) @ t) / np.linalg.norm(attention_block @ t)


# ------------------------------------------------------------------------------------------------ strategies

problem_sizes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "positions": st.integers(1, 20),
        "head_dim": st.integers(4, 8),
        "hidden": st.integers(12, 24),
        "causal": st.booleans(),
    }
)


# ------------------------------------------------------------------------------------------------ invariants


@PROPERTY
@given(problem_sizes)
def test_every_variant_keeps_the_head_output(sizes):
    """A_eff·T = A·T (relative 1e-9; simplex 1e-8) and the output_residual diagnostic says so."""
    attention, value, w_out, lengths = make_problem(
        sizes["seed"],
        positions=sizes["positions"],
        head_dim=sizes["head_dim"],
        hidden=sizes["hidden"],
        causal=sizes["causal"],
        lengths=[sizes["positions"], max(1, sizes["positions"] // 2)],
    )
    results = efficient_attention(attention, value, w_out, lengths, causal=sizes["causal"])
    for variant, tolerance in (("effective", 1e-9), ("stochastic", 1e-9), ("simplex", 1e-8)):
        result = results[variant]
        for example, size in enumerate(lengths):
            for head in range(attention.shape[2]):
                t = head_output_matrix(value, w_out, example, 0, head, size)
                error = relative_output_error(
                    result.efficient[example, 0, head, :size, :size], attention[example, 0, head, :size, :size], t
                )
                assert error <= tolerance, (variant, example, head, error)
        assert (result.diagnostics["output_residual"] <= tolerance).all(), variant


@PROPERTY
@given(problem_sizes)
def test_closed_form_variants_match_an_svd_reference(sizes):
    """Effective and stochastic attention equal A·P from a numpy SVD (per prefix row when causal)."""
    attention, value, w_out, lengths = make_problem(
        sizes["seed"],
        positions=sizes["positions"],
        head_dim=sizes["head_dim"],
        hidden=sizes["hidden"],
        causal=sizes["causal"],
    )
    results = efficient_attention(
        attention, value, w_out, lengths, causal=sizes["causal"], variants=("effective", "stochastic")
    )
    for variant in ("effective", "stochastic"):
        expected = reference_closed_form(attention, value, w_out, lengths, variant, sizes["causal"])
        np.testing.assert_allclose(results[variant].efficient, expected, atol=1e-10)


@PROPERTY
@given(problem_sizes)
def test_row_sums_and_non_negativity(sizes):
    attention, value, w_out, lengths = make_problem(
        sizes["seed"],
        positions=sizes["positions"],
        head_dim=sizes["head_dim"],
        hidden=sizes["hidden"],
        causal=sizes["causal"],
    )
    results = efficient_attention(attention, value, w_out, lengths, causal=sizes["causal"])
    size = lengths[0]
    for variant in ("stochastic", "simplex"):
        rows = results[variant].efficient[..., :size, :size]
        np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-12)
        assert (results[variant].diagnostics["row_sum_error"] <= 1e-12).all()
    simplex = results["simplex"]
    assert (simplex.efficient >= 0).all()
    assert (simplex.diagnostics["negative_mass"] == 0).all()
    assert simplex.diagnostics["converged"].all()
    assert (simplex.diagnostics["optimality_residual"] <= 1e-10).all()
    # The closed forms carry what they owe: the effective variant's diagnostics are consistent with its matrix.
    effective = results["effective"]
    block = effective.efficient[:, :, :, :size, :size]
    np.testing.assert_allclose(effective.diagnostics["row_sum_error"], np.abs(block.sum(-1) - 1).max(-1), atol=1e-15)
    np.testing.assert_allclose(
        effective.diagnostics["negative_mass"], np.abs(np.clip(block, None, 0)).sum((-2, -1)) / size, atol=1e-15
    )


@PROPERTY
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.booleans())
def test_no_null_space_means_no_change(seed, positions, causal):
    """L ≤ rank(T): every variant returns A (closed forms to 1e-12, simplex to 1e-9) and null_dim is 0."""
    head_dim = 8
    attention, value, w_out, lengths = make_problem(
        seed, positions=positions, head_dim=head_dim, hidden=16, causal=causal
    )
    results = efficient_attention(attention, value, w_out, lengths, causal=causal)
    for variant, tolerance in (("effective", 1e-12), ("stochastic", 1e-12), ("simplex", 1e-9)):
        np.testing.assert_allclose(results[variant].efficient, attention, atol=tolerance)
        assert (results[variant].diagnostics["null_dim"] == 0).all()
        assert (results[variant].diagnostics["rank"] == positions).all()
    if not causal:  # the projector is the identity: the rows are kept exactly, with residuals exactly 0
        for variant in ("effective", "stochastic"):
            np.testing.assert_array_equal(results[variant].efficient, attention)
            assert not results[variant].diagnostics["output_residual"].any()
            assert not results[variant].diagnostics["null_norm_ratio"].any()


@PROPERTY
@given(problem_sizes)
def test_left_null_additions_do_not_change_the_result(sizes):
    """Rows added from the left null space of T (of [T|1]) do not change effective (stochastic) attention; two
    feasible rows with the same a·T and Σa have the same simplex row."""
    size = max(sizes["positions"], sizes["head_dim"] + 3)
    attention, value, w_out, lengths = make_problem(
        sizes["seed"], examples=1, heads=1, positions=size, head_dim=sizes["head_dim"], hidden=sizes["hidden"]
    )
    rng = np.random.default_rng(sizes["seed"] + 1)
    t = head_output_matrix(value, w_out, 0, 0, 0, size)
    a = attention[0, 0, 0]
    original = efficient_attention(attention, value, w_out, lengths, causal=False)
    for variant in ("effective", "stochastic"):
        null_part = rng.normal(size=(size, size)) @ (np.eye(size) - reference_projector(t, variant))
        shifted = attention.copy()
        shifted[0, 0, 0] = a + null_part
        moved = efficient_attention(shifted, value, w_out, lengths, causal=False, variants=(variant,))
        np.testing.assert_allclose(moved[variant].efficient, original[variant].efficient, atol=1e-10)
    # simplex: a' = a + s·n with n ⊥ col([T|1]), s as large as keeps a' ≥ 0 (half way), row by row.
    null_rows = rng.normal(size=(size, size)) @ (np.eye(size) - reference_projector(t, "stochastic"))
    negative = null_rows < 0
    limits = np.where(negative, a / np.where(negative, -null_rows, 1.0), np.inf).min(-1)
    other = a + 0.5 * np.minimum(limits, 1.0)[:, None] * null_rows
    assert (other >= 0).all() and not np.allclose(other, a)
    shifted = attention.copy()
    shifted[0, 0, 0] = other
    moved = efficient_attention(shifted, value, w_out, lengths, causal=False, variants=("simplex",))
    np.testing.assert_allclose(moved["simplex"].efficient, original["simplex"].efficient, atol=1e-8)


@PROPERTY
@given(problem_sizes)
def test_full_row_rank_output_projection_changes_nothing(sizes):
    """With W_O^h of full row rank (d ≤ D), col(T) = col(V): using only V (W = I) gives the same results."""
    attention, value, w_out, lengths = make_problem(
        sizes["seed"],
        positions=sizes["positions"],
        head_dim=sizes["head_dim"],
        hidden=sizes["hidden"],
        causal=sizes["causal"],
    )
    identity = np.broadcast_to(np.eye(sizes["head_dim"]), w_out.shape[:2] + (sizes["head_dim"],) * 2).copy()
    with_w = efficient_attention(attention, value, w_out, lengths, causal=sizes["causal"])
    only_v = efficient_attention(attention, value, identity, lengths, causal=sizes["causal"])
    for variant, tolerance in (("effective", 1e-10), ("stochastic", 1e-10), ("simplex", 1e-8)):
        np.testing.assert_allclose(with_w[variant].efficient, only_v[variant].efficient, atol=tolerance)
        np.testing.assert_array_equal(with_w[variant].diagnostics["rank"], only_v[variant].diagnostics["rank"])


def test_rank_deficient_output_projection_is_recorded():
    """A rank-1 W_O^h gives rank(T) = 1 and the projector on that one direction (not on col(V))."""
    attention, value, w_out, lengths = make_problem(3, examples=1, heads=1, positions=10, head_dim=4, hidden=12)
    rng = np.random.default_rng(0)
    w_out[0, 0] = np.outer(rng.normal(size=4), rng.normal(size=12))
    results = efficient_attention(attention, value, w_out, lengths, causal=False)
    assert results["effective"].diagnostics["rank"][0, 0, 0] == 1
    assert results["effective"].diagnostics["null_dim"][0, 0, 0] == 9
    assert results["stochastic"].diagnostics["null_dim"][0, 0, 0] == 8
    t = head_output_matrix(value, w_out, 0, 0, 0, 10)
    np.testing.assert_allclose(
        results["effective"].efficient[0, 0, 0], attention[0, 0, 0] @ reference_projector(t, "effective"), atol=1e-12
    )


# ------------------------------------------------------------------------------------------------ causal


@SLOW_PROPERTY
@given(problem_sizes)
def test_causal_rows_equal_the_prefix_problem(sizes):
    """Causal results are lower-triangular and row i equals the non-causal result for the prefix problem
    (keys and values 0..i), for every variant."""
    size, head_dim, hidden = sizes["positions"], sizes["head_dim"], sizes["hidden"]
    attention, value, w_out, lengths = make_problem(
        sizes["seed"], examples=1, heads=1, positions=size, head_dim=head_dim, hidden=hidden, causal=True
    )
    causal = efficient_attention(attention, value, w_out, lengths, causal=True)
    # One example per prefix: example i holds the prefix problem of query i (length i + 1).
    prefix_attention = np.zeros((size, 1, 1, size, size))
    prefix_value = np.zeros((size, 1, 1, size, head_dim))
    for query in range(size):
        prefix_attention[query, 0, 0, : query + 1, : query + 1] = attention[0, 0, 0, : query + 1, : query + 1]
        prefix_value[query, 0, 0, : query + 1] = value[0, 0, 0, : query + 1]
    prefixes = efficient_attention(prefix_attention, prefix_value, w_out, np.arange(1, size + 1), causal=False)
    for variant, tolerance in (("effective", 1e-10), ("stochastic", 1e-10), ("simplex", 1e-8)):
        result = causal[variant].efficient[0, 0, 0]
        assert (np.triu(result, 1) == 0).all(), variant
        expected = np.stack([prefixes[variant].efficient[query, 0, 0, query] for query in range(size)])
        np.testing.assert_allclose(result, expected, atol=tolerance, err_msg=variant)


def test_causal_projection_differs_from_a_full_sequence_projection():
    """The causal path must not use the whole T: on a problem with L > d the two disagree."""
    attention, value, w_out, lengths = make_problem(5, examples=1, heads=1, positions=14, head_dim=4, causal=True)
    causal = efficient_attention(attention, value, w_out, lengths, causal=True, variants=("effective",))
    full = effective_attention_reference_loop(attention, value, w_out, lengths)
    assert np.abs(causal["effective"].efficient - full).max() > 1e-3
    assert np.abs(np.triu(full[0, 0, 0], 1)).max() > 1e-3  # the full projection leaks to future keys


def test_causal_attention_with_future_weight_is_rejected():
    attention, value, w_out, lengths = make_problem(1, positions=6, causal=False)
    with pytest.raises(ValueError, match="causal=True but attention has weight .* on future keys"):
        efficient_attention(attention, value, w_out, lengths, causal=True)


# ------------------------------------------------------------------------------------------------ heads, padding


def test_grouped_query_heads_use_their_kv_head():
    """Head h uses kv head h // (heads // kv_heads); with distinct kv heads the wrong mapping gives other results."""
    attention, value, w_out, lengths = make_problem(
        11, examples=2, layers=2, heads=4, kv_heads=2, positions=12, head_dim=4, hidden=12, lengths=[12, 9]
    )
    results = efficient_attention(attention, value, w_out, lengths, causal=False, variants=("effective", "stochastic"))
    for variant in ("effective", "stochastic"):
        expected = reference_closed_form(attention, value, w_out, lengths, variant, causal=False)
        np.testing.assert_allclose(results[variant].efficient, expected, atol=1e-10)
    # The check has power: under the wrong mapping h % kv_heads, heads 1 and 2 would use the other kv head.
    wrong_mapping = np.ascontiguousarray(value[:, :, [0, 1, 0, 1]])
    wrong = reference_closed_form(attention, wrong_mapping, w_out, lengths, "effective", causal=False)
    assert np.abs(wrong - results["effective"].efficient).max() > 1e-3
    # And expanding the kv heads explicitly (one kv head per query head) gives identical results.
    expanded = np.ascontiguousarray(value[:, :, [0, 0, 1, 1]])
    again = efficient_attention(attention, expanded, w_out, lengths, causal=False, variants=("effective", "stochastic"))
    for variant in ("effective", "stochastic"):
        np.testing.assert_allclose(again[variant].efficient, results[variant].efficient, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_zero_and_ignored(causal):
    """Outside the real block the results are exactly zero, and garbage in the padding changes nothing."""
    clean = make_problem(4, examples=3, heads=2, positions=13, head_dim=4, lengths=[13, 7, 2], causal=causal)
    rng = np.random.default_rng(9)
    dirty_attention, dirty_value = clean[0].copy(), clean[1].copy()
    for example, size in enumerate(clean[3]):
        for array in (dirty_attention, dirty_value):
            array[example, :, :, size:] = rng.normal(size=array[example, :, :, size:].shape) * 100
        dirty_attention[example, ..., size:] = rng.normal(size=dirty_attention[example, ..., size:].shape) * 100
    clean_results = efficient_attention(*clean, causal=causal)
    dirty_results = efficient_attention(dirty_attention, dirty_value, clean[2], clean[3], causal=causal)
    for variant in VARIANTS:
        for example, size in enumerate(clean[3]):
            block = clean_results[variant].efficient[example]
            assert (block[..., size:, :] == 0).all() and (block[..., :, size:] == 0).all()
        np.testing.assert_array_equal(dirty_results[variant].efficient, clean_results[variant].efficient)
        for name in DIAGNOSTICS:
            np.testing.assert_array_equal(
                dirty_results[variant].diagnostics[name], clean_results[variant].diagnostics[name]
            )


def test_empty_examples_are_all_zero():
    attention, value, w_out, lengths = make_problem(6, examples=2, positions=8, lengths=[8, 0])
    results = efficient_attention(attention, value, w_out, lengths, causal=False)
    for variant in VARIANTS:
        assert (results[variant].efficient[1] == 0).all()
        assert (results[variant].diagnostics["rank"][1] == 0).all()


# ------------------------------------------------------------------------------------------------ simplex


# ------------------------------------------------------------------------------------------------ bases


def test_certificate_falls_back_to_svd_for_rank_deficient_values():
    """Values of rank 2 < head_dim: the certificate refuses, the SVD path finds rank 2, results match numpy."""
    rng = np.random.default_rng(21)
    size, head_dim = 12, 5
    attention, value, w_out, lengths = make_problem(21, examples=1, heads=1, positions=size, head_dim=head_dim)
    value[0, 0, 0] = rng.normal(size=(size, 2)) @ rng.normal(size=(2, head_dim))
    matrix = torch.from_numpy(value[0, 0] @ projections.output_factor(w_out[0]).numpy())
    assert not full_rank_certificate(matrix, 16).item()
    assert full_rank_certificate(torch.from_numpy(rng.normal(size=(1, size, head_dim))), 16).item()
    for causal in (False, True):
        causal_attention = np.tril(attention)
        causal_attention /= causal_attention.sum(-1, keepdims=True)
        problem = (causal_attention if causal else attention, value, w_out, lengths)
        results = efficient_attention(*problem, causal=causal)
        assert results["effective"].diagnostics["rank"][0, 0, 0] == 2
        for variant in ("effective", "stochastic"):
            expected = reference_closed_form(*problem, variant, causal)
            np.testing.assert_allclose(results[variant].efficient, expected, atol=1e-10)
        assert (results["simplex"].diagnostics["output_residual"] <= 1e-8).all()
        assert (results["simplex"].efficient >= 0).all()


# ------------------------------------------------------------------------------------------------ realistic


@pytest.mark.parametrize("causal", [False, True])
def test_real_shaped_heads(causal):
    """MiniLM-shaped heads (L 40, d 32, D 384): outputs kept, rows valid, effective equal to the naive loop."""
    attention, value, w_out, lengths = make_problem(
        31, examples=2, layers=1, heads=3, positions=40, head_dim=32, hidden=384, lengths=[40, 37], causal=causal
    )
    w_out /= 20.0
    results = efficient_attention(attention, value, w_out, lengths, causal=causal)
    for variant in VARIANTS:
        diagnostics = results[variant].diagnostics
        assert (diagnostics["output_residual"] <= 1e-9).all(), variant
        assert (diagnostics["rank"] == 32).all()
    assert (results["stochastic"].diagnostics["row_sum_error"] <= 1e-12).all()
    assert (results["simplex"].diagnostics["row_sum_error"] <= 1e-12).all()
    assert (results["simplex"].efficient >= 0).all()
    assert results["simplex"].diagnostics["converged"].all()
    if not causal:
        assert (results["effective"].diagnostics["null_dim"] == lengths[:, None, None] - 32).all()
        reference = effective_attention_reference_loop(attention, value, w_out, lengths)
        np.testing.assert_allclose(results["effective"].efficient, reference, atol=1e-10)
        # support ≈ rank([T|1]) + 1 = 34 keys per row
        assert 30 <= results["simplex"].diagnostics["support_size"].mean() <= 38


def test_float32_inputs_are_computed_in_float64():
    attention, value, w_out, lengths = make_problem(17, positions=14, head_dim=4)
    results = efficient_attention(
        attention.astype(np.float32), value.astype(np.float32), w_out.astype(np.float32), lengths, causal=False
    )
    for variant in VARIANTS:
        assert results[variant].efficient.dtype == np.float64
        assert (results[variant].diagnostics["output_residual"] <= 1e-9).all()


# ------------------------------------------------------------------------------------------------ API, errors


def test_result_layout_and_diagnostics():
    attention, value, w_out, lengths = make_problem(2, examples=3, layers=2, heads=4, kv_heads=2, positions=10)
    results = efficient_attention(attention, value, w_out, lengths, causal=False)
    assert tuple(results) == tuple(VARIANTS)
    for variant in VARIANTS:
        result = results[variant]
        assert result.efficient.shape == attention.shape
        assert set(result.diagnostics) == set(DIAGNOSTICS)
        for name in DIAGNOSTICS:
            assert result.diagnostics[name].shape == (3, 2, 4), name
        assert result.diagnostics["converged"].dtype == bool
        assert np.issubdtype(result.diagnostics["rank"].dtype, np.integer)
        null = attention - result.efficient
        np.testing.assert_allclose(
            result.diagnostics["null_norm_ratio"],
            np.linalg.norm(null, axis=(-2, -1)) / np.linalg.norm(attention, axis=(-2, -1)),
            rtol=1e-12,
        )
    for variant in ("effective", "stochastic"):
        assert (results[variant].diagnostics["iterations"] == 0).all()
        assert (results[variant].diagnostics["optimality_residual"] == 0).all()
    only = efficient_attention(attention, value, w_out, lengths, causal=False, variants=["stochastic"])
    assert tuple(only) == ("stochastic",)
    np.testing.assert_array_equal(only["stochastic"].efficient, results["stochastic"].efficient)


def test_reference_loop_agrees_with_the_batched_effective_variant():
    attention, value, w_out, lengths = make_problem(
        14, examples=3, layers=2, heads=2, positions=11, head_dim=4, lengths=[11, 6, 3]
    )
    batched = efficient_attention(attention, value, w_out, lengths, causal=False, variants=("effective",))
    np.testing.assert_allclose(
        batched["effective"].efficient, effective_attention_reference_loop(attention, value, w_out, lengths), atol=1e-10
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, v, w, n: (a[0], v, w, n), "attention must have 5 dims"),
        (lambda a, v, w, n: (a, v[..., 0], w, n), "value must have 5 dims"),
        (lambda a, v, w, n: (a, v, w[0], n), "w_out must have 4 dims"),
        (lambda a, v, w, n: (a[..., :-1], v, w, n), "attention must be square"),
        (lambda a, v, w, n: (a, v[:1], w, n), r"value's \[example, layer\] dims"),
        (lambda a, v, w, n: (a, v, w[:, :1], n), r"w_out's \[layer, head\] dims"),
        (lambda a, v, w, n: (a, v, w[:, :, :2], n), "w_out's head_dim 2 does not match value's head_dim 4"),
        (lambda a, v, w, n: (a[:, :, :3], v[:, :, :2], w[:, :3], n), r"multiple of the number of kv heads"),
        (lambda a, v, w, n: (a, v, w, n[:1]), "length must be an integer array of shape"),
        (lambda a, v, w, n: (a, v, w, n + 1), r"every length must lie in \[0, 10\]"),
        (lambda a, v, w, n: (a, v, w, n.astype(float)), "length must be an integer array"),
    ],
)
def test_bad_inputs_say_what_is_wrong(change, message):
    attention, value, w_out, lengths = make_problem(0, examples=2, heads=4, positions=10)
    with pytest.raises(ValueError, match=message):
        efficient_attention(*change(attention, value, w_out, lengths), causal=False)


def test_unknown_variant_and_negative_attention_are_rejected():
    attention, value, w_out, lengths = make_problem(0, positions=10)
    with pytest.raises(ValueError, match="unknown variants"):
        efficient_attention(attention, value, w_out, lengths, causal=False, variants=("effective", "sparse"))
    signed = attention.copy()
    signed[0, 0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match="simplex variant needs non-negative attention"):
        efficient_attention(signed, value, w_out, lengths, causal=False)
    efficient_attention(signed, value, w_out, lengths, causal=False, variants=("effective", "stochastic"))


def test_large_batches_are_chunked(monkeypatch):
    """Results do not depend on the chunk size (many chunks versus one)."""
    for causal in (False, True):
        problem = make_problem(
            23, examples=5, layers=2, heads=2, positions=12, head_dim=4, lengths=[12, 12, 9, 12, 5], causal=causal
        )
        whole = efficient_attention(*problem, causal=causal)
        monkeypatch.setattr(ea, "CHUNK_ELEMENTS", 1)
        pieces = efficient_attention(*problem, causal=causal)
        monkeypatch.undo()
        for variant in VARIANTS:
            np.testing.assert_allclose(pieces[variant].efficient, whole[variant].efficient, atol=1e-12)


# ------------------------------------------------------------------------------------------------ key bands


def banded_problem(seed: int, band: KeyBand, lengths=(13, 9, 4), layers=2, heads=2, head_dim=2, hidden=6):
    """A random batch whose attention sees only the keys of `band` (softmax under the band's mask)."""
    attention, value, w_out, lengths = make_problem(
        seed,
        examples=len(lengths),
        layers=layers,
        heads=heads,
        positions=max(lengths),
        head_dim=head_dim,
        hidden=hidden,
        lengths=lengths,
    )
    rng = np.random.default_rng(seed + 1)
    for example, size in enumerate(lengths):
        scores = np.where(band.visible(size), rng.normal(size=(layers, heads, size, size)), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        attention[example, :, :, :size, :size] = weights / weights.sum(-1, keepdims=True)
    return attention, value, w_out, lengths


def reference_banded(attention, value, w_out, lengths, variant, band):
    """Effective/stochastic attention by a loop over rows: row i projected on the rows of T in its band (numpy SVD)."""
    result = np.zeros_like(attention)
    examples, layers, heads = attention.shape[:3]
    for example in range(examples):
        size = lengths[example]
        for layer in range(layers):
            for head in range(heads):
                t = head_output_matrix(value, w_out, example, layer, head, size)
                for query in range(size):
                    start, stop = band.window(query, size)
                    row = attention[example, layer, head, query, start:stop]
                    result[example, layer, head, query, start:stop] = row @ reference_projector(t[start:stop], variant)
    return result


@pytest.mark.parametrize(
    "band,causal", [(KeyBand(3, 0), True), (KeyBand(2, 2), False)], ids=["mistral-window-4", "modernbert-local-2"]
)
def test_banded_rows_use_only_the_keys_their_query_sees(band, causal):
    """Sequences longer than the window and the head dim (d = 2 < window): every variant keeps A·T, has no weight
    outside the band (nor above the diagonal when causal), and matches the per-row band problem; the row rule of
    stores without bands (prefix, whole sequence) would have put weight outside it."""
    attention, value, w_out, lengths = banded_problem(3, band)
    results = efficient_attention(attention, value, w_out, lengths, causal=causal, key_bands=(band, band))
    outside = ~band.visible(attention.shape[-1])
    for variant in VARIANTS:
        efficient = results[variant].efficient
        assert np.abs(efficient[..., outside]).max() == 0.0, variant
        if causal:
            assert (np.triu(efficient, 1) == 0).all(), variant
        for example, size in enumerate(lengths):
            for layer in range(2):
                for head in range(2):
                    t = head_output_matrix(value, w_out, example, layer, head, size)
                    a = attention[example, layer, head, :size, :size]
                    e = efficient[example, layer, head, :size, :size]
                    np.testing.assert_allclose(e @ t, a @ t, atol=1e-9 * np.abs(a @ t).max(), err_msg=variant)
        assert np.abs(efficient - attention).max() > 1e-2, f"{variant}: the band's null space must not be empty"
    for variant in ("effective", "stochastic"):
        expected = reference_banded(attention, value, w_out, lengths, variant, band)
        np.testing.assert_allclose(results[variant].efficient, expected, atol=1e-10, err_msg=variant)
    real = attention.sum(-1) > 0
    for variant in ("stochastic", "simplex"):
        np.testing.assert_allclose(results[variant].efficient.sum(-1)[real], 1.0, atol=1e-12)
    assert results["simplex"].efficient.min() >= 0 and results["simplex"].diagnostics["converged"].all()
    # the simplex row is the minimum-norm non-negative row of the band problem (SLSQP on the band's keys)
    example, layer, head, query = 0, 1, 0, 8
    start, stop = band.window(query, lengths[example])
    t = head_output_matrix(value, w_out, example, layer, head, lengths[example])[start:stop]
    np.testing.assert_allclose(
        results["simplex"].efficient[example, layer, head, query, start:stop],
        slsqp_simplex_row(attention[example, layer, head, query, start:stop], t),
        atol=1e-6,
    )
    unbanded = efficient_attention(attention, value, w_out, lengths, causal=causal, variants=("effective",))
    assert np.abs(unbanded["effective"].efficient[..., outside]).max() > 1e-2  # what the band fixes


def test_layers_with_different_bands_are_each_projected_by_their_own():
    """gemma3-like: a sliding layer and a full one in one batch give what each gives alone."""
    attention, value, w_out, lengths = banded_problem(4, KeyBand(3, 0))
    attention[:, 1] = make_problem(
        5, examples=3, layers=1, heads=2, positions=13, head_dim=2, hidden=6, lengths=lengths, causal=True
    )[0][:, 0]
    mixed = efficient_attention(attention, value, w_out, lengths, causal=True, key_bands=(KeyBand(3, 0), CAUSAL_BAND))
    sliding = efficient_attention(
        attention[:, :1], value[:, :1], w_out[:1], lengths, causal=True, key_bands=(KeyBand(3, 0),)
    )
    full = efficient_attention(attention[:, 1:], value[:, 1:], w_out[1:], lengths, causal=True)
    for variant in VARIANTS:
        np.testing.assert_array_equal(mixed[variant].efficient[:, :1], sliding[variant].efficient)
        np.testing.assert_array_equal(mixed[variant].efficient[:, 1:], full[variant].efficient)


@pytest.mark.parametrize("causal", [True, False])
def test_bands_that_restrict_nothing_are_bit_identical_to_no_bands(causal):
    """Stores without windows (bands recorded as the default, or not recorded at all) and windows at least as long
    as every example take exactly today's path: identical bits in every array and diagnostic."""
    attention, value, w_out, lengths = make_problem(
        6, examples=3, layers=2, heads=2, positions=11, head_dim=3, hidden=8, lengths=[11, 7, 3], causal=causal
    )
    plain = efficient_attention(attention, value, w_out, lengths, causal=causal)
    wide = KeyBand(10, 0) if causal else KeyBand(10, 12)
    for bands in ((default_band(causal),) * 2, (wide, wide)):
        banded = efficient_attention(attention, value, w_out, lengths, causal=causal, key_bands=bands)
        for variant in VARIANTS:
            np.testing.assert_array_equal(banded[variant].efficient, plain[variant].efficient)
            for name in DIAGNOSTICS:
                np.testing.assert_array_equal(banded[variant].diagnostics[name], plain[variant].diagnostics[name])


def test_band_problems_are_refused_with_what_to_do():
    attention, value, w_out, lengths = banded_problem(7, KeyBand(3, 0))
    with pytest.raises(
        ValueError,
        match=r"weight .* on keys outside the band its layer's mask allows \(2 left, 0 "
        r"right of the diagonal\).*extract the store again",
    ):
        efficient_attention(attention, value, w_out, lengths, causal=True, key_bands=(KeyBand(2, 0),) * 2)
    with pytest.raises(ValueError, match="causal=True but the key bands"):
        efficient_attention(attention, value, w_out, lengths, causal=True, key_bands=(KeyBand(3, 1),) * 2)
    with pytest.raises(ValueError, match="one analysis.key_bands.KeyBand per layer"):
        efficient_attention(attention, value, w_out, lengths, causal=True, key_bands=(KeyBand(3, 0),))


def test_diagnostics_share_the_attention_terms_between_variants():
    """`_diagnostics_of` with the chunk's shared terms (‖A·X‖, ‖A‖ computed once, for the changed matrices only)
    gives what it computes alone, and the output residual and null-norm ratio equal their definitions; an unchanged
    matrix has both exactly 0."""
    rng = np.random.default_rng(11)
    attention = torch.from_numpy(softmax_rows(rng.normal(size=(4, 6, 6)), causal=False))
    matrix = torch.from_numpy(rng.normal(size=(4, 6, 3)))
    shared = ea._SharedDiagnosticTerms(attention, matrix)
    for changed in ([True, True, True, True], [True, False, True, False]):
        efficient = attention.clone()
        for index in np.flatnonzero(changed):
            efficient[index] += 1e-3 * torch.from_numpy(rng.normal(size=(6, 6)))
        alone = ea._diagnostics_of(efficient, attention, matrix, 6)
        together = ea._diagnostics_of(efficient, attention, matrix, 6, shared)
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=1e-15, atol=0)
        difference = (efficient - attention).numpy()
        expected_residual = np.linalg.norm(difference @ matrix.numpy(), axis=(-2, -1)) / np.linalg.norm(
            attention.numpy() @ matrix.numpy(), axis=(-2, -1)
        )
        expected_ratio = np.linalg.norm(difference, axis=(-2, -1)) / np.linalg.norm(attention.numpy(), axis=(-2, -1))
        np.testing.assert_allclose(alone["output_residual"].numpy(), expected_residual, rtol=1e-12)
        np.testing.assert_allclose(alone["null_norm_ratio"].numpy(), expected_ratio, rtol=1e-12)
        assert (alone["output_residual"][~torch.tensor(changed)] == 0).all()
