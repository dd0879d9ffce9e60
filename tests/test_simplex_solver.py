"""Tests of analysis.simplex_solver: the simplex variant's rows against independent references (scipy's SLSQP, every
support enumerated), feasibility of degenerate and unconverged rows, and independence of the batch.

Tolerances: the simplex matches SLSQP to 1e-6 and the enumerated minimiser to 1e-9; feasible rows keep the output
to 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.efficient_attention import efficient_attention
from analysis.projections import value_output_basis
from analysis.simplex_solver import RowLayout, simplex_rows
from tests.test_efficient_attention import head_output_matrix, make_problem, slsqp_simplex_row, softmax_rows

# ------------------------------------------------------------------------------------------------ references


def enumerated_simplex_row(a: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """argmin ½‖b‖² s.t. Uᵀb = Uᵀa, b ≥ 0, exactly, by trying every support (independent of the module; L ≤ 12).

    For a support S the least-norm b with Uᵀb = Uᵀa and b = 0 off S is pinv((U⊙1_S)ᵀ)·Uᵀa. The optimum b* is that
    point for S = support(b*) (b* > 0 there, so it is the least-norm point of its face's affine set), and every
    feasible candidate has norm ≥ ‖b*‖: the answer is the feasible candidate of least norm.
    """
    size = len(a)
    target = basis.T @ a
    masks = ((np.arange(1, 2 ** size)[:, None] >> np.arange(size)[None, :]) & 1).astype(np.float64)  # (S, L)
    restricted = basis[None, :, :] * masks[:, :, None]  # (S, L, k)
    candidates = (np.linalg.pinv(restricted.transpose(0, 2, 1), rcond=1e-10) @ target[None, :, None])[..., 0]
    defect = np.linalg.norm(candidates @ basis - target[None, :], axis=-1)
    feasible = (candidates.min(-1) >= -1e-13) & (defect <= 1e-11 * np.linalg.norm(target))
    norms = np.where(feasible, np.linalg.norm(candidates, axis=-1), np.inf)
    return np.clip(candidates[int(np.argmin(norms))], 0.0, None)


# ------------------------------------------------------------------------------------------------ simplex


@pytest.mark.parametrize("seed", range(6))
def test_simplex_rows_match_slsqp(seed):
    """The minimiser equals scipy's SLSQP solution (1e-6) on small problems (L 6..10, k = rank([T|1]) = 3)."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(6, 11))
    value = rng.normal(size=(1, size, 2))
    w_out = rng.normal(size=(1, 2, 5))
    basis, rank = value_output_basis(value, w_out, append_ones=True)
    assert rank[0] == 3
    rows = softmax_rows(rng.normal(size=(size, size)) * 2, causal=False)
    found = simplex_rows(rows[None], basis)
    assert found.converged.all()
    t = value[0] @ w_out[0]
    for query in range(size):
        np.testing.assert_allclose(found.solution[0, query].numpy(), slsqp_simplex_row(rows[query], t), atol=1e-6)


def test_simplex_end_to_end_matches_slsqp():
    attention, value, w_out, lengths = make_problem(8, examples=1, heads=1, positions=9, head_dim=2, hidden=6)
    result = efficient_attention(attention, value, w_out, lengths, causal=False, variants=("simplex",))["simplex"]
    t = head_output_matrix(value, w_out, 0, 0, 0, 9)
    expected = np.stack([slsqp_simplex_row(row, t) for row in attention[0, 0, 0]])
    np.testing.assert_allclose(result.efficient[0, 0, 0], expected, atol=1e-6)
    assert result.diagnostics["support_size"][0, 0, 0] == pytest.approx((result.efficient[0, 0, 0] > 0).sum(-1).mean())


@pytest.mark.parametrize("sharpness", [10.0, 50.0])
def test_degenerate_rows_are_feasible_and_flagged(sharpness):
    """Almost one-hot attention (softmax of scores × 10 or × 50): every row stays feasible (non-negative, sums
    to one, same output), convergence is recorded per matrix."""
    attention, value, w_out, lengths = make_problem(
        12, examples=4, layers=2, heads=3, positions=16, head_dim=4, hidden=12, sharpness=sharpness
    )
    result = efficient_attention(attention, value, w_out, lengths, causal=False, variants=("simplex",))["simplex"]
    efficient = result.efficient
    assert (efficient >= 0).all()
    np.testing.assert_allclose(efficient.sum(-1), 1.0, atol=1e-12)
    for example in range(4):
        for layer in range(2):
            for head in range(3):
                t = head_output_matrix(value, w_out, example, layer, head, 16)
                a = attention[example, layer, head]
                difference = (efficient[example, layer, head] - a) @ t
                assert np.abs(difference).max() <= 1e-12 * np.abs(t).max(), (example, layer, head)
    assert result.diagnostics["converged"].dtype == bool
    assert result.diagnostics["converged"].shape == (4, 2, 3)
    assert (result.diagnostics["iterations"] <= 200).all()


def test_unconverged_rows_are_still_feasible():
    """With too few iterations the solver stops early: rows are feasible anyway and flagged unconverged."""
    rng = np.random.default_rng(13)
    value = rng.normal(size=(5, 24, 4))
    w_out = rng.normal(size=(5, 4, 12))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    rows = softmax_rows(rng.normal(size=(5, 24, 24)) * 4, causal=False)
    found = simplex_rows(rows, basis, max_iterations=1)
    assert not found.converged.all()
    solution = found.solution.numpy()
    assert (solution >= 0).all()
    u = basis.numpy()
    assert np.abs((solution - rows) @ u).max() <= 1e-13
    full = simplex_rows(rows, basis)
    assert full.converged.all()
    assert (full.iterations > 1).any()


@pytest.mark.parametrize("seed, sharpness", [(0, 1.0), (1, 4.0), (2, 12.0)])
def test_simplex_rows_match_enumerated_supports(seed, sharpness):
    """The solver's rows equal the exact minimiser (every support tried, `enumerated_simplex_row`) to 1e-9, on random
    rows (L 11, k = rank([T|1]) = 4) and sharp ones whose minimisers are vertices (support k), the rows that take the
    solver the most Newton iterations."""
    rng = np.random.default_rng(seed)
    size = 11
    value = rng.normal(size=(3, size, 3))
    w_out = rng.normal(size=(3, 3, 8))
    basis, rank = value_output_basis(value, w_out, append_ones=True)
    assert (rank == 4).all()
    rows = softmax_rows(rng.normal(size=(3, size, size)) * sharpness, causal=False)
    found = simplex_rows(rows, basis)
    assert found.converged.all()
    expected = np.stack([np.stack([enumerated_simplex_row(rows[m, q], basis[m].numpy()) for q in range(size)])
                         for m in range(3)])
    np.testing.assert_allclose(found.solution.numpy(), expected, atol=1e-9)
    if sharpness > 1:
        assert (found.support_size == 4).any()  # vertex minimisers are among the cases


def test_simplex_rows_do_not_depend_on_the_batch():
    """Rows of many matrices are iterated together, each stopping on its own: each row's solution and iteration count
    are those of its matrix solved alone with its rows reversed (a mix-up of rows between matrices or queries would
    change them)."""
    rng = np.random.default_rng(5)
    value = rng.normal(size=(4, 20, 4))
    w_out = rng.normal(size=(4, 4, 10))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    rows = softmax_rows(rng.normal(size=(4, 20, 20)) * rng.uniform(1, 8, size=(4, 20, 1)), causal=False)
    together = simplex_rows(rows, basis)
    assert len(set(together.iterations.flatten().tolist())) > 3  # rows stop at different iterations
    for matrix in range(4):  # alone, and with its rows in reverse order (other slots)
        alone = simplex_rows(rows[matrix:matrix + 1, ::-1].copy(), basis[matrix:matrix + 1])
        np.testing.assert_array_equal(alone.iterations[0].flip(0).numpy(), together.iterations[matrix].numpy())
        np.testing.assert_allclose(alone.solution[0].flip(0).numpy(), together.solution[matrix].numpy(), atol=1e-12)


def test_row_layout_products_are_each_rows_own_product():
    """Rows spread unevenly over matrices (1, 6, none, 3 and 4 rows: packing groups of widths 1, 8 and 4, the last
    with two matrices) are multiplied by their own matrix: each result equals values[r] @ right[which[r]] (a row
    packed into another matrix or slot would differ)."""
    rng = np.random.default_rng(3)
    which = torch.tensor([0, 1, 1, 1, 1, 1, 1, 3, 3, 3, 4, 4, 4, 4])
    right = torch.from_numpy(rng.normal(size=(5, 4, 7)))
    values = torch.from_numpy(rng.normal(size=(len(which), 4)))
    layout = RowLayout(which, 5)
    assert sorted(group[-1] for group in layout.groups) == [1, 4, 8]
    expected = torch.stack([values[row] @ right[which[row]] for row in range(len(which))])
    np.testing.assert_allclose(layout.rows_times(values, right).numpy(), expected.numpy(), rtol=1e-13, atol=1e-13)


def test_slow_rows_do_not_change_the_others_iterations():
    """Rows stop on their own: a row's iteration count is the same when its matrix also holds rows that take many
    more iterations (the sharp rows) as when it is solved among easy rows only."""
    rng = np.random.default_rng(8)
    value = rng.normal(size=(1, 24, 4))
    w_out = rng.normal(size=(1, 4, 12))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    easy = softmax_rows(rng.normal(size=(1, 24, 24)), causal=False)
    sharp = softmax_rows(rng.normal(size=(1, 24, 24)) * 30, causal=False)
    mixed = simplex_rows(np.concatenate([easy, sharp], axis=1), basis)
    alone = simplex_rows(easy, basis)
    assert mixed.converged.all() and alone.converged.all()
    assert mixed.iterations[0, 24:].max() > alone.iterations.max()
    np.testing.assert_array_equal(mixed.iterations[0, :24].numpy(), alone.iterations[0].numpy())
    np.testing.assert_allclose(mixed.solution[0, :24].numpy(), alone.solution[0].numpy(), atol=1e-12)


def test_simplex_rows_rejects_negative_rows():
    basis = torch.eye(4, dtype=torch.float64)[None, :, :2]
    with pytest.raises(ValueError, match="non-negative"):
        simplex_rows(np.array([[[0.5, 0.7, -0.2, 0.0]]]), basis)
