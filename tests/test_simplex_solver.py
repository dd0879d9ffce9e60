"""Tests of analysis.simplex_solver: the simplex variant's rows against independent references (scipy's SLSQP, every
support enumerated), feasibility of degenerate and unconverged rows, and independence of the batch.

Tolerances: the simplex matches SLSQP to 1e-6 and the enumerated minimiser to 1e-9; feasible rows keep the output
to 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import simplex_solver
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
    masks = ((np.arange(1, 2**size)[:, None] >> np.arange(size)[None, :]) & 1).astype(np.float64)  # (S, L)
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
    found = simplex_rows(rows, basis, max_iterations=1, active_set_start=False, retry_from_active_set=False)
    assert not found.converged.all()
    solution = found.solution.numpy()
    assert (solution >= 0).all()
    u = basis.numpy()
    assert np.abs((solution - rows) @ u).max() <= 1e-13
    full = simplex_rows(rows, basis, active_set_start=False)
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
    expected = np.stack(
        [np.stack([enumerated_simplex_row(rows[m, q], basis[m].numpy()) for q in range(size)]) for m in range(3)]
    )
    np.testing.assert_allclose(found.solution.numpy(), expected, atol=1e-9)
    if sharpness > 1:
        assert (found.support_size == 4).any()  # vertex minimisers are among the cases


def test_simplex_rows_do_not_depend_on_the_batch():
    """Rows of many matrices are iterated together (Newton from Uᵀa), each stopping on its own: each row's solution
    and iteration count are those of its matrix solved alone with its rows reversed (a mix-up of rows between
    matrices or queries would change them)."""
    rng = np.random.default_rng(5)
    value = rng.normal(size=(4, 20, 4))
    w_out = rng.normal(size=(4, 4, 10))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    rows = softmax_rows(rng.normal(size=(4, 20, 20)) * rng.uniform(1, 8, size=(4, 20, 1)), causal=False)
    together = simplex_rows(rows, basis, active_set_start=False)
    assert len(set(together.iterations.flatten().tolist())) > 3  # rows stop at different iterations
    for matrix in range(4):  # alone, and with its rows in reverse order (other slots)
        alone = simplex_rows(rows[matrix : matrix + 1, ::-1].copy(), basis[matrix : matrix + 1], active_set_start=False)
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


def line_minimiser_by_bisection(w: np.ndarray, u: np.ndarray, step_target: float) -> float:
    """argmin_{t ≥ 0} ½‖max(w + t u, 0)‖² - t·step_target by bisection on its non-decreasing derivative."""

    def derivative(t: float) -> float:
        return float(u @ np.maximum(w + t * u, 0.0)) - step_target

    if derivative(0.0) >= 0:
        return 0.0
    high = 1.0
    while derivative(high) < 0:
        high *= 2.0
    low = 0.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if derivative(middle) < 0 else (low, middle)
    return 0.5 * (low + high)


@pytest.mark.parametrize("pieces", [2, 8, 40])
def test_exact_line_search_finds_the_minimiser_near_or_beyond_the_nearest_breakpoints(pieces):
    """The line search looks among the `pieces` nearest breakpoints first and sorts all of them only for the other
    rows: with 2, most minimisers lie beyond (the full sort), with 40 = L none do (never partial). Every row's step
    equals the minimiser found by bisection (1e-9 relative); rows that are no descent direction get 0."""
    rng = np.random.default_rng(11)
    rows, length = 300, 40
    combination = rng.normal(size=(rows, length))
    step = rng.normal(size=(rows, length))
    step_target = rng.normal(size=rows) * rng.uniform(0.1, 30.0, size=rows)
    found = simplex_solver._exact_line_search(
        torch.from_numpy(combination), torch.from_numpy(step), torch.from_numpy(step_target), pieces
    ).numpy()
    expected = np.array([line_minimiser_by_bisection(*arguments) for arguments in zip(combination, step, step_target)])
    assert (expected == 0).sum() > 10 and (expected > 1.0).sum() > 10
    np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12)


def test_slow_rows_do_not_change_the_others_iterations():
    """Rows stop on their own: a row's iteration count is the same when its matrix also holds rows that take many
    more iterations (the sharp rows) as when it is solved among easy rows only."""
    rng = np.random.default_rng(8)
    value = rng.normal(size=(1, 24, 4))
    w_out = rng.normal(size=(1, 4, 12))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    easy = softmax_rows(rng.normal(size=(1, 24, 24)), causal=False)
    sharp = softmax_rows(rng.normal(size=(1, 24, 24)) * 30, causal=False)
    mixed = simplex_rows(np.concatenate([easy, sharp], axis=1), basis, active_set_start=False)
    alone = simplex_rows(easy, basis, active_set_start=False)
    assert mixed.converged.all() and alone.converged.all()
    assert mixed.iterations[0, 24:].max() > alone.iterations.max()
    np.testing.assert_array_equal(mixed.iterations[0, :24].numpy(), alone.iterations[0].numpy())
    np.testing.assert_allclose(mixed.solution[0, :24].numpy(), alone.solution[0].numpy(), atol=1e-12)


def test_simplex_rows_rejects_negative_rows():
    basis = torch.eye(4, dtype=torch.float64)[None, :, :2]
    with pytest.raises(ValueError, match="non-negative"):
        simplex_rows(np.array([[[0.5, 0.7, -0.2, 0.0]]]), basis)


# ------------------------------------------------------------------------------------------------ tracked Jacobians


def test_tracked_jacobians_equal_freshly_formed_ones():
    """Jacobians updated by the entries whose support membership changed equal Uᵀ diag(support) U formed afresh
    (a sign or a row/matrix mix-up in the sparse update would differ); a change of most entries asks for a fresh
    product instead (None)."""
    rng = np.random.default_rng(4)
    count, length, k = 3, 20, 5
    basis = torch.linalg.qr(torch.from_numpy(rng.normal(size=(count, length, k)))).Q
    outer = simplex_solver.basis_outer_products(basis).reshape(count * length, -1)
    matrix_of_row = torch.tensor([0, 2, 2, 1])
    old = torch.from_numpy(rng.random((4, length)) < 0.6)
    new = old.clone()
    new[torch.from_numpy(rng.random((4, length)) < 0.1)] ^= True  # a few entries in or out

    def fresh(support):
        jacobians = basis[matrix_of_row].mT @ (basis[matrix_of_row] * support[..., None])
        rows, columns = torch.tril_indices(k, k)
        return jacobians[:, rows, columns]

    updated = simplex_solver._update_jacobians(fresh(old), outer, length, matrix_of_row, old, new)
    assert (old != new).any()
    np.testing.assert_allclose(updated.numpy(), fresh(new).numpy(), atol=1e-14)
    np.testing.assert_array_equal(
        simplex_solver._lower_to_symmetric(updated, k).numpy(),
        simplex_solver._lower_to_symmetric(updated, k).mT.numpy(),
    )
    np.testing.assert_allclose(
        simplex_solver._lower_to_symmetric(fresh(new), k).numpy(),
        (basis[matrix_of_row].mT @ (basis[matrix_of_row] * new[..., None])).numpy(),
        atol=1e-14,
    )
    assert simplex_solver._update_jacobians(fresh(old), outer, length, matrix_of_row, old, ~old) is None


def test_tracked_and_fresh_jacobians_give_the_same_rows(monkeypatch):
    """Matrices with many rows keep their Jacobians from iteration to iteration (`_TrackedJacobians`); a row solved
    alone (q = 1, as causal prefixes and banded rows are) forms them afresh. Both give the same rows, including
    sharp rows whose minimisers are degenerate vertices, and the tracked path is the one taken for the batch."""
    rng = np.random.default_rng(11)
    size = 24
    value = rng.normal(size=(2, size, 4))
    w_out = rng.normal(size=(2, 4, 10))
    basis, rank = value_output_basis(value, w_out, append_ones=True)
    assert (rank == 5).all()
    rows = softmax_rows(rng.normal(size=(2, size, size)) * rng.uniform(1, 30, size=(2, size, 1)), causal=False)
    tracked_solves = []
    original = simplex_solver._TrackedJacobians.solve
    monkeypatch.setattr(
        simplex_solver._TrackedJacobians,
        "solve",
        lambda self, *arguments: tracked_solves.append(1) or original(self, *arguments),
    )
    together = simplex_rows(rows, basis, active_set_start=False)
    assert tracked_solves
    tracked_solves.clear()
    alone = simplex_rows(rows.reshape(2 * size, 1, size), basis.repeat_interleave(size, 0), active_set_start=False)
    assert not tracked_solves
    assert together.converged.all() and alone.converged.all()
    np.testing.assert_allclose(together.solution.numpy(), alone.solution.reshape(2, size, size).numpy(), atol=1e-10)
    assert (together.support_size <= 5).any()  # vertex minimisers (support ≤ k) are among the rows


def test_feasible_rows_stop_at_once():
    """Rows that are already their own minimiser (uniform rows lie in col([T|1]), so P a = a ≥ 0) come back
    unchanged after zero Newton iterations."""
    rng = np.random.default_rng(2)
    value = rng.normal(size=(2, 16, 3))
    w_out = rng.normal(size=(2, 3, 8))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    rows = np.full((2, 12, 16), 1 / 16)
    found = simplex_rows(rows, basis)
    assert found.converged.all() and (found.iterations == 0).all()
    np.testing.assert_allclose(found.solution.numpy(), rows, atol=1e-15)
    assert (found.support_size == 16).all()


def test_failed_newton_solves_fall_back_to_feasible_unconverged_rows(monkeypatch):
    """When the Newton systems give no usable direction (here: NaN from every tracked solve), the rows stop, come
    back feasible (non-negative, same projections) and are flagged unconverged, never NaN. Only rows that needed no
    Newton step (P a ≥ 0 is already the minimiser) count as converged."""
    rng = np.random.default_rng(6)
    value = rng.normal(size=(2, 20, 3))
    w_out = rng.normal(size=(2, 3, 8))
    basis, _ = value_output_basis(value, w_out, append_ones=True)
    rows = softmax_rows(rng.normal(size=(2, 20, 20)) * 4, causal=False)
    monkeypatch.setattr(
        simplex_solver._TrackedJacobians,
        "solve",
        lambda self, matrix_of_row, query, support, right, ridge: torch.full_like(right, torch.nan),
    )
    found = simplex_rows(rows, basis, active_set_start=False, retry_from_active_set=False)
    solution = found.solution.numpy()
    assert np.isfinite(solution).all() and (solution >= 0).all()
    u = basis.numpy()
    assert np.abs((solution - rows) @ u).max() <= 1e-13
    needed_no_step = ((rows @ u @ u.transpose(0, 2, 1)) >= 0).all(-1)
    assert (~needed_no_step).sum() > 30
    np.testing.assert_array_equal(found.converged.numpy(), needed_no_step)


# ------------------------------------------------------------------------------------------------ active-set start


def sharp_problem(seed: int, size: int = 24, matrices: int = 3):
    """Rows over (matrices, size, size) with k = rank([T|1]) = 5, from smooth to almost one-hot (degenerate
    minimisers, support ≤ k), and their bases."""
    rng = np.random.default_rng(seed)
    value = rng.normal(size=(matrices, size, 4))
    w_out = rng.normal(size=(matrices, 4, 10))
    basis, rank = value_output_basis(value, w_out, append_ones=True)
    assert (rank == 5).all()
    scale = rng.uniform(1, 40, size=(matrices, size, 1))
    return softmax_rows(rng.normal(size=(matrices, size, size)) * scale, causal=False), basis


def test_active_set_start_gives_newtons_rows_after_almost_no_iterations():
    """Few free directions (L - k ≤ ACTIVE_SET_MAX_FREE): Newton starts from DAQP's active set. The rows equal Newton's
    from Uᵀa (1e-10, as exact), including degenerate ones, and the start is already the solution for almost all rows
    (Newton from Uᵀa needs several iterations for most)."""
    rows, basis = sharp_problem(9)
    started = simplex_rows(rows, basis)
    newton = simplex_rows(rows, basis, active_set_start=False)
    assert started.converged.all() and newton.converged.all()
    np.testing.assert_allclose(started.solution.numpy(), newton.solution.numpy(), atol=1e-10)
    assert (started.support_size < 5).any()  # degenerate minimisers are among the rows
    assert (started.iterations == 0).float().mean() > 0.9
    assert (newton.iterations >= 3).float().mean() > 0.5
    assert simplex_solver.ACTIVE_SET_MAX_FREE >= 24 - 5  # the default chose the active-set start here


def test_active_set_start_is_used_only_with_few_free_directions(monkeypatch):
    """The default takes the active-set start when L - k ≤ ACTIVE_SET_MAX_FREE and Newton from Uᵀa otherwise."""
    rows, basis = sharp_problem(3, matrices=1)
    calls = []
    original = simplex_solver._active_set_start
    monkeypatch.setattr(simplex_solver, "_active_set_start", lambda *a: calls.append(1) or original(*a))
    simplex_rows(rows, basis)
    assert calls
    calls.clear()
    monkeypatch.setattr(simplex_solver, "ACTIVE_SET_MAX_FREE", 24 - 5 - 1)
    found = simplex_rows(rows, basis)
    assert not calls and found.converged.all()


class FlakyModel:
    """A daqp.Model whose solves of every other row fail (exit flag -1): both solves of the row (`both`) or only the
    first, warm-started one. A row starts with an update without `sense` (the warm start)."""

    def __init__(self, original, both: bool, rows: list) -> None:
        self.model, self.both, self.rows, self.first = original(), both, rows, False

    def setup(self, *arguments, **keywords):
        return self.model.setup(*arguments, **keywords)

    @property
    def settings(self):
        return self.model.settings

    @settings.setter
    def settings(self, value):
        self.model.settings = value

    def update(self, **keywords):
        self.first = "sense" not in keywords
        if self.first:
            self.rows.append(1)
        return self.model.update(**keywords)

    def solve(self):
        step, value, flag, info = self.model.solve()
        failing = len(self.rows) % 2 and (self.both or self.first)
        return (step * np.nan, value, -1, info) if failing else (step, value, flag, info)


def test_rows_daqp_does_not_solve_start_from_the_stochastic_row(monkeypatch):
    """A row whose active-set solve fails (DAQP exit flag < 1 from the warm start and from scratch, here for every
    other row) starts Newton from Uᵀa instead and still ends at the exact minimiser, converged."""
    rows, basis = sharp_problem(5, matrices=2)
    original, solved_rows = simplex_solver.daqp.Model, []
    monkeypatch.setattr(simplex_solver.daqp, "Model", lambda: FlakyModel(original, True, solved_rows))
    found = simplex_rows(rows, basis)
    assert len(solved_rows) > 10
    reference = simplex_rows(rows, basis, active_set_start=False)
    assert found.converged.all()
    np.testing.assert_allclose(found.solution.numpy(), reference.solution.numpy(), atol=1e-10)
    assert (found.iterations > 0).float().mean() > 0.3  # the failed rows took Newton iterations


def test_a_failed_warm_started_daqp_solve_is_solved_again_from_scratch(monkeypatch):
    """Each row's DAQP solve starts from the previous row's active set; where that fails (every other row here) the
    row is solved again from the empty active set, so it still starts Newton at its solution (0 iterations for
    7/8 of these rows without failures, 1/24 from Uᵀa; without the second solve about half) and ends at the exact
    minimiser."""
    rows, basis = sharp_problem(5, matrices=2)
    original, solved_rows = simplex_solver.daqp.Model, []
    monkeypatch.setattr(simplex_solver.daqp, "Model", lambda: FlakyModel(original, False, solved_rows))
    found = simplex_rows(rows, basis)
    assert len(solved_rows) > 10
    reference = simplex_rows(rows, basis, active_set_start=False)
    assert found.converged.all()
    np.testing.assert_allclose(found.solution.numpy(), reference.solution.numpy(), atol=1e-10)
    assert (found.iterations == 0).float().mean() > 0.8


def test_rows_newton_leaves_unconverged_are_solved_again_from_the_active_set():
    """Newton from Uᵀa stopped after one iteration leaves most rows unconverged; by default those rows are solved
    again from DAQP's active set and come back converged and equal to the full solve, their iterations added."""
    rows, basis = sharp_problem(7)
    stopped = simplex_rows(rows, basis, max_iterations=1, active_set_start=False, retry_from_active_set=False)
    assert (~stopped.converged).sum() > 20
    retried = simplex_rows(rows, basis, max_iterations=1, active_set_start=False)
    reference = simplex_rows(rows, basis, active_set_start=False)
    assert retried.converged.all() and reference.converged.all()
    np.testing.assert_allclose(retried.solution.numpy(), reference.solution.numpy(), atol=1e-10)
    again = ~stopped.converged
    assert (retried.iterations[again] >= stopped.iterations[again]).all()
    np.testing.assert_array_equal(retried.iterations[~again].numpy(), stopped.iterations[~again].numpy())
