"""The simplex variant's solver: per row, argmin ‖b‖ s.t. b·T = a·T, Σb = Σa, b ≥ 0.

The dual of the row problem, b = max(Uλ, 0) with Uᵀmax(Uλ, 0) = Uᵀa (U an orthonormal basis of col([T|1])), solved
by semismooth Newton (`simplex_rows`), started where few directions are free from the exact active set of a compiled
dual active-set QP solver (DAQP, `_active_set_start`); `simplex_projection` applies it to a chunk of blocks (whole,
causal or banded). Nothing here reads the variant registry (analysis.variants names `simplex_projection`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import daqp
import numpy as np
import torch

from analysis.key_bands import KeyBand
from analysis.projections import (
    CHUNK_ELEMENTS,
    EPS,
    VariantInputs,
    as_float64_tensor,
    band_chunk,
    band_row_groups,
    column_space_basis,
    full_rank_certificate,
    prefix_column_space_bases,
    tiny_like,
)

# Negative entries of a simplex candidate at most this large are round-off and are set to zero.
NEGATIVE_ROUND_OFF = 1e-14
# Rounds of support corrections that make the last simplex iterate exactly feasible.
FEASIBILITY_ROUNDS = 6
# Simplex rows within the tolerance take up to POLISH_STEPS more Newton steps towards POLISH_TOLERANCE.
POLISH_STEPS = 4
POLISH_TOLERANCE = 64 * EPS
# A simplex row counts as converged when its dual residual is within the tolerance and the final feasibility repair
# moved it by at most REPAIR_ALLOWANCE · tolerance · ‖Uᵀa‖.
REPAIR_ALLOWANCE = 100.0
# Ridge added to the simplex Newton system (the generalised Jacobian has eigenvalues in [0, 1]).
NEWTON_RIDGE = 1e-14
# Tracked Jacobians are updated by their changed entries when at most 1/SPARSE_UPDATE_SHARE of the entries changed
# (a sparse product costs about this many times a dense one per entry), else formed afresh.
SPARSE_UPDATE_SHARE = 8
# Matrices whose feasible rows have at most this many free directions (L - k) start Newton from the exact active set
# found by DAQP (`_active_set_start`): per row, DAQP's cost grows with the free directions, Newton's with its
# iterations (MiniLM, k = 33, one thread, CPU µs a row, Newton alone / with the active-set start: L ≈ 64 ~500 / ~70,
# L = 128 640 / 330, L = 256 760 / 2300, L = 512 ~150 / ~5000).
ACTIVE_SET_MAX_FREE = 128
# Up to this many free directions the rows Newton leaves unconverged (degenerate rows, ~1-2 % at L = 256) are solved
# again from the active set (`simplex_rows`): about free at L = 256; at L = 512 it would more than double the time.
ACTIVE_SET_RETRY_MAX_FREE = 256
# DAQP's primal feasibility tolerance: at its default (1e-6) the active sets of degenerate rows (support < k) are
# off by entries of ~1e-7, from which Newton needs tens of iterations; at 1e-12 they are exact.
ACTIVE_SET_PRIMAL_TOLERANCE = 1e-12
# A full Newton step is taken when it decreases the dual objective by at least this fraction of the slope's promise.
ARMIJO = 1e-4
# The exact line search first looks for its minimiser among this many nearest breakpoints (a partial sort), and sorts
# all L only for the rows whose minimiser lies further (bbc-topic at 512 tokens: the line search was half the time;
# 8 of 4, 8, 16, 32, 64 was fastest there).
LINE_SEARCH_PIECES = 8


@dataclass
class SimplexRowsResult:
    """Output of `simplex_rows` for rows (..., q, L).

    solution: (..., q, L) feasible rows: solutionᵀU = aᵀU to float precision, solution ≥ 0.
    iterations: (..., q) int64 Newton iterations taken (after the active-set start where there is one: 0 when
        DAQP's active set is already the solution).
    converged: (..., q) bool: dual residual ≤ tolerance, and the final feasibility repair moved the row by at
        most REPAIR_ALLOWANCE·tolerance·‖Uᵀa‖.
    optimality_residual: (..., q) ‖Uᵀmax(Uλ, 0) - Uᵀa‖ / ‖Uᵀa‖ at the final λ.
    support_size: (..., q) int64 number of entries > 0 in the solution.
    """

    solution: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    optimality_residual: torch.Tensor
    support_size: torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# simplex


def _cholesky_solve_psd(matrix: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Solve matrix x = right for symmetric positive (semi)definite matrices (R, s, s), right (R, s).

    Rows whose Cholesky factorisation fails get a growing multiple of the identity added (ridge 1e-14 ... 1e-2
    relative to the diagonal's size); as a last resort a least-squares solve.
    """

    def solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        half = torch.linalg.solve_triangular(factor, rhs[..., None], upper=False)
        return torch.linalg.solve_triangular(factor.mT, half, upper=True)[..., 0]

    solution = torch.empty_like(right)
    factor, info = torch.linalg.cholesky_ex(matrix)
    good = info == 0
    if good.all():
        return solve(factor, right)
    solution[good] = solve(factor[good], right[good])
    todo = torch.nonzero(~good).flatten()
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    size = matrix.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
    for ridge in (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        if len(todo) == 0:
            return solution
        shifted = matrix[todo] + (ridge * size[todo])[:, None, None] * identity
        factor, info = torch.linalg.cholesky_ex(shifted)
        good = info == 0
        solution[todo[good]] = solve(factor[good], right[todo[good]])
        todo = todo[~good]
    if len(todo):
        solution[todo] = torch.linalg.lstsq(matrix[todo], right[todo, :, None]).solution[..., 0]
    return solution


def _gather_rows(basis: torch.Tensor, matrix_of_row: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """For each row r, the rows of its basis where chosen[r] is True, packed first and zero-padded.

    basis (M, L, k); matrix_of_row (R,); chosen (R, L) bool. Returns (R, s, k), s = most chosen in a row.
    """
    counts = chosen.sum(-1)
    width = int(counts.max()) if len(counts) else 0
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[:, :width]  # chosen positions first
    valid = torch.arange(width)[None, :] < counts[:, None]
    return basis[matrix_of_row[:, None], order] * valid[..., None]


def basis_outer_products(basis: torch.Tensor) -> torch.Tensor:
    """The lower triangles of u_l u_lᵀ for every row u_l of every basis: basis (M, L, k) -> (M, L, k(k+1)/2).

    With them the lower triangles of Uᵀ diag(s) U for all q rows of a matrix are one matrix product
    (q, L) @ (L, k(k+1)/2) (entries in `torch.tril_indices(k, k)` order).
    """
    rows, columns = torch.tril_indices(basis.shape[-1], basis.shape[-1])
    return basis[..., rows] * basis[..., columns]


def _use_outer_products(queries: int, length: int, k: int) -> bool:
    """Jacobians kept from the bases' outer products (`_TrackedJacobians`) pay off when many rows share a basis and
    the zero sets are large (otherwise the Woodbury identity or gathered support rows are cheaper)."""
    return queries >= 8 and length - k > k // 2


class RowLayout:
    """Rows selected from a batch of matrices, packed per matrix for batched products (`rows_times`).

    which (R,) sorted indices of each row's matrix in [0, matrices). Matrices are grouped by how many rows they have
    selected (up to 1, 2, 4, 8, ...), and each group's rows are packed into (group matrices, group width) slots, so
    a product costs at most twice the selected rows' own work however unevenly they spread over the matrices.
    """

    def __init__(self, which: torch.Tensor, matrices: int) -> None:
        self.rows = len(which)
        counts = torch.bincount(which, minlength=matrices)
        slot = torch.arange(len(which)) - (torch.cumsum(counts, 0) - counts)[which]
        group_of_matrix = torch.ceil(torch.log2(counts.clamp(min=1).to(torch.float64))).to(torch.int64)
        group_of_matrix[counts == 0] = -1
        group_of_row = group_of_matrix[which]
        self.groups = []  # (rows of the group (R_g,), its matrices (M_g,), row -> packed matrix (R_g,), slot, width)
        for group in torch.unique(group_of_matrix[counts > 0]).tolist():
            chosen = torch.nonzero(group_of_matrix == group).flatten()
            rows = torch.nonzero(group_of_row == group).flatten()
            packed_matrix = torch.zeros(matrices, dtype=torch.int64)
            packed_matrix[chosen] = torch.arange(len(chosen))
            self.groups.append((rows, chosen, packed_matrix[which[rows]], slot[rows], 2**group))

    def rows_times(self, values: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """values[r] @ right[which[r]] for each selected row r: values (R, x), right (matrices, x, y) -> (R, y)."""
        result = torch.empty((self.rows, right.shape[-1]), dtype=values.dtype)
        for rows, chosen, packed_matrix, slot, width in self.groups:
            packed = torch.zeros((len(chosen), width, values.shape[-1]), dtype=values.dtype)
            packed[packed_matrix, slot] = values[rows]
            right_of_group = right if len(chosen) == right.shape[0] else right[chosen]
            result[rows] = (packed @ right_of_group)[packed_matrix, slot]
        return result


def _jacobian_solve(
    basis: torch.Tensor,
    which: torch.Tensor,
    support: torch.Tensor,
    gram_diagonal: torch.Tensor,
    right: torch.Tensor,
    ridge: torch.Tensor,
) -> torch.Tensor:
    """Solve (Uᵀ diag(support) U + ridge I) x = right for each row, forming the matrices afresh.

    basis (M, L, k) with orthonormal or zero columns (so UᵀU = diag(gram_diagonal)); row r belongs to matrix
    which[r]; support (R, L) bool; gram_diagonal (R, k); right (R, k); ridge (R,). Returns (R, k).
    With Z the rows outside the support, UᵀDU = UᵀU - U_ZᵀU_Z: when |Z| ≤ k/2 the Woodbury identity needs only
    a |Z|×|Z| system; otherwise the k×k matrices U_SᵀU_S are formed from the gathered support rows. (Matrices
    with many rows keep their Jacobians up to date instead: `_TrackedJacobians`.)
    """
    k = basis.shape[-1]
    outside = int((~support).sum(-1).max()) if len(support) else 0
    if outside <= k // 2:
        diagonal = gram_diagonal + ridge[:, None]  # (R, k)
        outside_rows = _gather_rows(basis, which, ~support)  # (R, z, k)
        scaled = outside_rows / diagonal[:, None, :]
        capacitance = torch.eye(outside, dtype=basis.dtype) - scaled @ outside_rows.mT  # I - B D⁻¹ Bᵀ
        first = right / diagonal
        correction = _cholesky_solve_psd(capacitance, (outside_rows @ first[..., None])[..., 0])
        return first + (scaled.mT @ correction[..., None])[..., 0]
    support_rows = _gather_rows(basis, which, support)  # (R, s, k)
    jacobian = support_rows.mT @ support_rows
    jacobian.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
    return _cholesky_solve_psd(jacobian, right)


def _lower_to_symmetric(lower: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric matrices from their lower triangles in `torch.tril_indices(k, k)` order: (R, k(k+1)/2) -> (R, k, k)."""
    row, column = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    larger, smaller = torch.maximum(row, column), torch.minimum(row, column)
    packed_index = (larger * (larger + 1) // 2 + smaller).flatten()  # entry (i, j) -> its lower-triangle slot
    return lower.index_select(-1, packed_index).reshape(len(lower), k, k)


def _update_jacobians(
    lower: torch.Tensor,
    outer_flat: torch.Tensor,
    length: int,
    matrix_of_row: torch.Tensor,
    old_support: torch.Tensor,
    new_support: torch.Tensor,
) -> torch.Tensor | None:
    """The lower triangles of Uᵀ diag(new_support) U from those of Uᵀ diag(old_support) U, one row each.

    lower (R, k(k+1)/2); outer_flat (M·L, k(k+1)/2) the `basis_outer_products` of all M bases, flattened; row r
    belongs to matrix matrix_of_row[r]; old_support, new_support (R, L) bool. Only the entries whose membership
    changed add or remove their u_l u_lᵀ: one sparse (R, M·L) × (M·L, k(k+1)/2) product whose cost follows the
    number of changes (a few per row once the support settles), not L. Returns None where more than
    1/SPARSE_UPDATE_SHARE of the entries changed (then forming the matrices afresh is cheaper).
    """
    changed = old_support != new_support
    changes = int(changed.sum())
    if changes == 0:
        return lower
    if changes * SPARSE_UPDATE_SHARE > changed.numel():
        return None
    row, position = torch.nonzero(changed, as_tuple=True)  # row-major: sorted by row, as CSR wants
    sign = torch.where(new_support[row, position], 1.0, -1.0).to(lower.dtype)
    starts = torch.zeros(len(lower) + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(row, minlength=len(lower)), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        delta = torch.sparse_csr_tensor(
            starts,
            matrix_of_row[row] * length + position,
            sign,
            (len(lower), outer_flat.shape[0]),
            check_invariants=False,
        )
        return lower + delta @ outer_flat


def _packed_jacobian_solve(lower: torch.Tensor, k: int, right: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """Solve (J + ridge I) x = right with J given by its lower triangles: lower (R, k(k+1)/2), right (R, k)."""
    jacobian = _lower_to_symmetric(lower, k)
    jacobian.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
    return _cholesky_solve_psd(jacobian, right)


class _TrackedJacobians:
    """The Newton Jacobians Uᵀ diag(support) U of every row of a chunk, kept from one solve to the next.

    basis (M, L, k), outer its `basis_outer_products`, queries q rows per matrix. Each row's lower triangle starts
    at UᵀU = diag(gram_diagonal) (support: every entry) and follows its support by `_update_jacobians`.
    """

    def __init__(self, basis: torch.Tensor, outer: torch.Tensor, gram_diagonal: torch.Tensor, queries: int) -> None:
        count, length, k = basis.shape
        self.k, self.length = k, length
        self.outer_flat = outer.reshape(count * length, -1)
        rows, columns = torch.tril_indices(k, k)
        diagonal = torch.zeros((count, outer.shape[-1]), dtype=basis.dtype)
        diagonal[:, rows == columns] = gram_diagonal
        self.lower = diagonal[:, None, :].repeat(1, queries, 1)  # (M, q, k(k+1)/2)
        self.support = torch.ones((count, queries, length), dtype=torch.bool)

    def solve(
        self,
        matrix_of_row: torch.Tensor,
        query: torch.Tensor,
        support: torch.Tensor,
        right: torch.Tensor,
        ridge: torch.Tensor,
    ) -> torch.Tensor:
        """(Uᵀ diag(support) U + ridge I) x = right for rows (matrix_of_row, query) (R,): support (R, L) bool,
        right (R, k), ridge (R,). Returns x (R, k) and remembers the rows' new Jacobians."""
        lower = _update_jacobians(
            self.lower[matrix_of_row, query],
            self.outer_flat,
            self.length,
            matrix_of_row,
            self.support[matrix_of_row, query],
            support,
        )
        if lower is None:  # most entries changed: one matrix product per basis
            matrices, which = torch.unique(matrix_of_row, return_inverse=True)
            outer = self.outer_flat.reshape(-1, self.length, self.outer_flat.shape[-1])
            lower = RowLayout(which, len(matrices)).rows_times(support.to(self.outer_flat.dtype), outer[matrices])
        self.lower[matrix_of_row, query] = lower
        self.support[matrix_of_row, query] = support
        return _packed_jacobian_solve(lower, self.k, right, ridge)


def _root_on_pieces(
    breakpoints: torch.Tensor,
    slope0: torch.Tensor,
    curvature0: torch.Tensor,
    slope_changes: torch.Tensor,
    curvature_changes: torch.Tensor,
    complete: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The root t ≥ 0 of a non-decreasing piecewise linear φ'(t) = α + β t, from its sorted breakpoints.

    breakpoints (R, m) ascending (inf: none); slope0, curvature0 (R,) α, β on the first piece; slope_changes,
    curvature_changes (R, m) the changes of α, β at each breakpoint. complete: these are all the breakpoints (the
    last piece runs to infinity); otherwise the m nearest only, and a row whose root lies beyond them is not found.
    Returns found (R,) bool and the roots (R,) (meaningful where found).
    """
    rows = breakpoints.shape[0]
    piece_alpha = torch.cat([slope0[:, None], slope0[:, None] + torch.cumsum(slope_changes, dim=-1)], dim=-1)
    piece_beta = torch.cat([curvature0[:, None], curvature0[:, None] + torch.cumsum(curvature_changes, dim=-1)], -1)
    piece_beta = torch.clamp(piece_beta, min=0)
    piece_start = torch.cat([torch.zeros((rows, 1), dtype=breakpoints.dtype), breakpoints], dim=-1)
    piece_end = torch.cat([breakpoints, torch.full((rows, 1), torch.inf, dtype=breakpoints.dtype)], dim=-1)
    if not complete:  # the piece after the m-th breakpoint ends at a breakpoint not among them
        piece_alpha, piece_beta = piece_alpha[:, :-1], piece_beta[:, :-1]
        piece_start, piece_end = piece_start[:, :-1], piece_end[:, :-1]
    finite_end = torch.isfinite(piece_end)
    derivative_at_end = torch.where(
        finite_end,
        piece_alpha + piece_beta * torch.where(finite_end, piece_end, 0.0),
        torch.where(piece_beta > 0, torch.inf, piece_alpha),
    )
    reaches_zero = derivative_at_end >= 0
    found = reaches_zero.any(-1)
    last = piece_alpha.shape[-1] - 1
    first = torch.where(found, reaches_zero.to(torch.int8).argmax(-1), last)[:, None]
    alpha, beta = piece_alpha.gather(-1, first)[:, 0], piece_beta.gather(-1, first)[:, 0]
    start, end = piece_start.gather(-1, first)[:, 0], piece_end.gather(-1, first)[:, 0]
    root = torch.where(beta > 0, -alpha / torch.where(beta > 0, beta, 1.0), torch.where(alpha >= 0, start, end))
    root = torch.minimum(torch.maximum(root, start), end)
    largest_finite = torch.where(torch.isfinite(breakpoints), breakpoints, 0.0).amax(-1)
    root = torch.where(torch.isfinite(root), root, torch.clamp(2 * largest_finite, min=1.0))  # unbounded: a long step
    return found | complete, root


def _exact_line_search(
    combination: torch.Tensor, step: torch.Tensor, step_target: torch.Tensor, pieces: int = LINE_SEARCH_PIECES
) -> torch.Tensor:
    """Exact minimiser t ≥ 0 of the dual objective along a direction d, for each row.

    combination (R, L) = Uλ; step (R, L) = Ud; step_target (R,) = dᵀ(Uᵀa). Returns t (R,).
    φ(t) = ½‖max(Uλ + tUd, 0)‖² - (λ + td)ᵀUᵀa is convex and piecewise quadratic: its derivative
    φ'(t) = Σ_j u_j max(w_j + t u_j, 0) - dᵀUᵀa is non-decreasing and piecewise linear, with breakpoints
    t_j = -w_j/u_j where entry j switches sign. Sorting the breakpoints gives φ' on every piece; the root lies
    on the first piece whose right end has φ' ≥ 0 (`_root_on_pieces`). The nearest `pieces` breakpoints (a partial
    sort) usually hold it; only the other rows sort all L. (Derivatives are exact to round-off even where
    differences of φ are not, which matters when λ is large.)
    """
    w, u = combination, step
    length = w.shape[-1]
    active = (w > 0) | ((w == 0) & (u > 0))
    slope0 = (u * w * active).sum(-1) - step_target  # φ'(0) = α0 (+ β0·0)
    curvature0 = (u * u * active).sum(-1)
    switches = ((u > 0) & ~active) | ((u < 0) & active & (w > 0))
    breakpoint = torch.where(switches, -w / torch.where(switches, u, 1.0), torch.inf)
    breakpoint = torch.clamp(breakpoint, min=0)
    sign = torch.where(u > 0, 1.0, -1.0) * switches
    slope_change, curvature_change = sign * u * w, sign * u * u  # α and β change by these at t_j
    root = torch.zeros_like(slope0)  # not a descent direction (φ'(0) ≥ 0): no step
    todo = torch.nonzero(slope0 < 0).flatten()
    for complete in (False, True):
        if len(todo) == 0 or (not complete and pieces >= length):
            continue
        if complete:
            nearest, order = torch.sort(breakpoint[todo], dim=-1)
        else:
            nearest, order = torch.topk(breakpoint[todo], pieces, dim=-1, largest=False, sorted=True)
        found, value = _root_on_pieces(
            nearest,
            slope0[todo],
            curvature0[todo],
            slope_change[todo].gather(-1, order),
            curvature_change[todo].gather(-1, order),
            complete,
        )
        root[todo[found]] = value[found]
        todo = todo[~found]
    return root


def _active_set_start(rows: torch.Tensor, basis: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Starting duals λ0 (M, q, k) from a dual active-set QP solver (DAQP, compiled) on the reduced problem.

    rows (M, q, L); basis (M, L, k) with orthonormal or zero columns; target (M, q, k) = Uᵀa.
    With N (L, L-k) orthonormal and orthogonal to col(U) (the complete QR's last columns), every b = Pa + Nz is
    feasible for the equalities, and ‖b‖² = ‖Pa‖² + ‖z‖²: DAQP solves min ½‖z‖² s.t. Pa + Nz ≥ 0 per row (N is
    shared by the rows of a matrix: one DAQP workspace per matrix, each row started from the previous row's active
    set, and solved again from the empty one where that fails). Its multipliers μ ≤ 0 of the active bounds give the
    dual point λ0 = Uᵀ(b + μ), at which b = max(Uλ0, 0) when the active set is right: Newton then starts at its
    solution and only confirms it (residual at round-off), or corrects it where it is not. Rows whose P a is already
    non-negative, and rows DAQP does not solve (exit flag < 1), keep λ0 = Uᵀa.
    """
    start = target.clone()
    count, length, k = basis.shape
    projected = target @ basis.mT  # P a, (M, q, L)
    needs = (projected < 0).any(-1)
    if length <= k or not needs.any():
        return start
    free = length - k
    complement = torch.linalg.qr(basis, mode="complete").Q[..., k:]  # (M, L, L-k)
    upper_bounds = np.full(length, 1e30)
    hessian, linear = np.eye(free), np.zeros(free)
    matrix_index, query_index = torch.nonzero(needs, as_tuple=True)
    bounds = (-projected[matrix_index, query_index]).numpy()  # (S, L), row order grouped by matrix
    steps = np.zeros((len(bounds), free))
    multipliers = np.zeros((len(bounds), length))
    solved = np.zeros(len(bounds), dtype=bool)
    sense = np.zeros(length, dtype=np.int32)  # every constraint an inequality (DAQP leaves it unchanged)
    starts = torch.searchsorted(matrix_index, torch.arange(count + 1)).tolist()
    for matrix in torch.unique(matrix_index).tolist():
        # One workspace per matrix (its rows share N); each row starts from the previous row's active set.
        model = daqp.Model()
        directions = np.ascontiguousarray(complement[matrix].numpy())
        model.setup(hessian, linear, directions, upper_bounds, bounds[starts[matrix]], sense)
        model.settings = {"primal_tol": ACTIVE_SET_PRIMAL_TOLERANCE}
        for row in range(starts[matrix], starts[matrix + 1]):
            model.update(blower=bounds[row])
            step, _, flag, info = model.solve()
            if flag < 1:  # from the empty active set instead (a warm start can stall on degenerate rows)
                model.update(blower=bounds[row], sense=sense)
                step, _, flag, info = model.solve()
            if flag >= 1:
                steps[row], multipliers[row], solved[row] = step, info["lam"], True
    solved = torch.from_numpy(solved)
    matrix_index, query_index = matrix_index[solved], query_index[solved]
    all_steps = torch.zeros((count, target.shape[1], free), dtype=basis.dtype)
    all_steps[matrix_index, query_index] = torch.from_numpy(steps)[solved]
    all_multipliers = torch.zeros_like(projected)
    all_multipliers[matrix_index, query_index] = torch.from_numpy(multipliers)[solved]
    dual_point = projected + all_steps @ complement.mT + all_multipliers  # b + μ, (M, q, L)
    chosen = torch.zeros_like(needs)
    chosen[matrix_index, query_index] = True
    start[chosen] = (dual_point @ basis)[chosen]
    return start


def _simplex_chunk(
    rows: torch.Tensor, basis: torch.Tensor, max_iterations: int, tolerance: float, active_set_start: bool
):
    """Semismooth Newton on the dual for one chunk: rows (M, q, L) share basis (M, L, k) per matrix, from λ = Uᵀa
    or, with `active_set_start`, from DAQP's active set (`_active_set_start`).

    Each iteration works on the rows still iterating only (packed per matrix, `RowLayout`), so a few slow rows
    do not make their matrix's other rows pay for every extra iteration.
    Returns solution (M, q, L), iterations (M, q), converged (M, q), residual (M, q).
    """
    count, queries, length = rows.shape
    target = rows @ basis  # Uᵀa per row, (M, q, k)
    scale = torch.clamp(target.norm(dim=-1), min=tiny_like(target))  # (M, q)
    gram_diagonal = basis.square().sum(-2)  # diag(UᵀU), (M, k)
    # Uλ0 = P a (the stochastic row: optimal when it is already non-negative), or DAQP's active set's dual point
    lam = _active_set_start(rows, basis, target) if active_set_start else target.clone()
    iterations = torch.zeros((count, queries), dtype=torch.int64)
    residual = torch.zeros((count, queries), dtype=torch.float64)
    active = torch.ones((count, queries), dtype=torch.bool)
    polish_steps = torch.zeros((count, queries), dtype=torch.int64)  # steps taken after reaching the tolerance
    polish_tolerance = min(tolerance, POLISH_TOLERANCE)

    # From the active set few rows iterate: the outer products would cost more than they save (rt-sentiment: 14 %).
    use_outer = not active_set_start and _use_outer_products(queries, length, basis.shape[-1])
    outer = basis_outer_products(basis) if use_outer else None
    matrices = torch.arange(count)  # matrices that still have active rows
    tracked = None if outer is None else _TrackedJacobians(basis, outer, gram_diagonal, queries)
    basis_now = basis
    for step in range(max_iterations + 1):
        which, query = torch.nonzero(active[matrices], as_tuple=True)  # the active rows, (matrix in `matrices`, query)
        if len(which) == 0:
            break
        matrix_of_row = matrices[which]
        layout = RowLayout(which, len(matrices))
        row_lam, row_target = lam[matrix_of_row, query], target[matrix_of_row, query]
        combination = layout.rows_times(row_lam, basis_now.mT)  # Uλ, (R, L)
        gradient = layout.rows_times(torch.clamp(combination, min=0), basis_now) - row_target  # F(λ), (R, k)
        residual_now = gradient.norm(dim=-1) / scale[matrix_of_row, query]
        residual[matrix_of_row, query] = residual_now
        # Rows within the tolerance take up to POLISH_STEPS more steps towards round-off level: the exact support
        # (entries of size ~ residual) makes the final feasibility correction possible.
        polishing = (residual_now <= tolerance) & (residual_now > polish_tolerance)
        polish_now = polish_steps[matrix_of_row, query] + polishing
        polish_steps[matrix_of_row, query] = polish_now
        going = (residual_now > tolerance) | (polishing & (polish_now <= POLISH_STEPS))
        active[matrix_of_row, query] = going
        if step == max_iterations or not going.any():
            break
        which, query, matrix_of_row = which[going], query[going], matrix_of_row[going]
        combination, gradient = combination[going], gradient[going]
        row_lam, row_target = row_lam[going], row_target[going]
        keep = torch.bincount(which, minlength=len(matrices)) > 0
        if not keep.all():  # drop the matrices whose rows have all stopped
            matrices, basis_now = matrices[keep], basis_now[keep]
            which = (torch.cumsum(keep, 0) - 1)[which]
        layout = RowLayout(which, len(matrices))

        # Newton direction with the generalised Jacobian Uᵀ diag(1[Uλ > 0]) U and a tiny ridge.
        ridge = torch.full((len(which),), NEWTON_RIDGE, dtype=torch.float64)
        if tracked is None:
            direction = _jacobian_solve(
                basis_now, which, combination > 0, gram_diagonal[matrix_of_row], -gradient, ridge
            )
        else:
            direction = tracked.solve(matrix_of_row, query, combination > 0, -gradient, ridge)
        usable = torch.isfinite(direction).all(-1)  # a failed solve: no step, the row stops unconverged
        direction = torch.where(usable[:, None], direction, 0.0)
        combination_step = layout.rows_times(direction, basis_now.mT)  # U d, (R, L)

        # The full Newton step where it decreases the dual objective enough (Armijo), else the exact line search.
        step_target = (direction * row_target).sum(-1)
        step_size = torch.ones_like(step_target)
        full_step = combination + combination_step
        change = 0.5 * (torch.clamp(full_step, min=0).square() - torch.clamp(combination, min=0).square()).sum(-1)
        slope = (combination_step * torch.clamp(combination, min=0)).sum(-1) - step_target  # φ'(0) < 0
        search = ~((slope < 0) & (change - step_target <= ARMIJO * slope))
        if search.any():
            step_size[search] = _exact_line_search(combination[search], combination_step[search], step_target[search])
        accepted = (step_size > 0) & usable
        lam[matrix_of_row, query] = row_lam + (step_size * accepted)[:, None] * direction
        iterations[matrix_of_row, query] += 1
        # Rows whose line search found no decrease or whose solve failed stop here (flagged unconverged below).
        active[matrix_of_row[~accepted], query[~accepted]] = False

    solution, moved = _feasible_rows(rows, basis, tracked, lam, target, scale, gram_diagonal)
    converged = (residual <= tolerance) & (moved <= REPAIR_ALLOWANCE * tolerance * scale)
    return solution, iterations, converged, residual


def _feasible_rows(rows, basis, tracked, lam, target, scale, gram_diagonal):
    """Turn the final dual iterates into feasible rows (Uᵀb = Uᵀa to float precision, b ≥ 0).

    rows (M, q, L), basis (M, L, k), tracked the Newton loop's `_TrackedJacobians` or None, lam and target (M, q, k),
    scale (M, q), gram_diagonal (M, k).
    Returns solution (M, q, L) and moved (M, q), ‖solution - max(Uλ, 0)‖ (how far the repair moved the row).
    """
    count, queries, length = rows.shape
    combination = lam @ basis.mT
    last_iterate = torch.clamp(combination, min=0)
    support = combination > 0
    candidate = last_iterate.clone()
    equality_tolerance = 64 * EPS * scale

    # 1) Corrections on the support, δ = diag(s) U y with Uᵀ diag(s) U y = defect: they keep the zeros at zero.
    #    Entries a correction pushes below zero leave the support, and the next round corrects again. Each round
    #    works on the rows still needing it only (packed per matrix, `RowLayout`).
    missing = target - candidate @ basis  # equality defect, (M, q, k)
    needs = missing.norm(dim=-1) > equality_tolerance
    for _ in range(FEASIBILITY_ROUNDS):
        if not needs.any():
            break
        which, query = torch.nonzero(needs, as_tuple=True)
        layout = RowLayout(which, count)
        row_support, row_missing = support[which, query], missing[which, query]
        ridge = torch.full((len(which),), 1e-14, dtype=torch.float64)
        if tracked is None:
            correction = _jacobian_solve(basis, which, row_support, gram_diagonal[which], row_missing, ridge)
        else:
            correction = tracked.solve(which, query, row_support, row_missing, ridge)
        row_candidate = candidate[which, query] + row_support * layout.rows_times(correction, basis.mT)
        row_support &= ~(row_candidate < -NEGATIVE_ROUND_OFF)
        row_candidate = torch.clamp(row_candidate, min=0)
        row_missing = target[which, query] - layout.rows_times(row_candidate, basis)
        candidate[which, query], support[which, query], missing[which, query] = row_candidate, row_support, row_missing
        needs = torch.zeros_like(needs)
        needs[which, query] = row_missing.norm(dim=-1) > equality_tolerance[which, query]
    finite = torch.isfinite(candidate).all(-1)
    if not finite.all():
        candidate = torch.where(finite[..., None], candidate, last_iterate)
        missing = target - candidate @ basis
    failed = ~finite | (missing.norm(dim=-1) > equality_tolerance)
    if not failed.any():
        return candidate, (candidate - last_iterate).norm(dim=-1)

    # 2) Where that failed: the orthogonal projection onto the affine set {b : Uᵀb = Uᵀa}, and since a is
    #    feasible, a move from a towards it only as far as non-negativity allows.
    affine = candidate + missing @ basis.mT
    affine = torch.where((affine < 0) & (affine >= -NEGATIVE_ROUND_OFF), 0.0, affine)
    negative = affine < 0
    limits = torch.where(negative, rows / torch.where(negative, rows - affine, 1.0), torch.inf)
    step = torch.clamp(limits.amin(-1), max=1.0) if length else torch.ones((count, queries), dtype=rows.dtype)
    blended = torch.clamp(rows + step[..., None] * (affine - rows), min=0)  # only round-off can be negative
    solution = torch.where(failed[..., None], blended, candidate)
    return solution, (solution - last_iterate).norm(dim=-1)


def simplex_rows(
    rows,
    basis,
    max_iterations: int = 200,
    tolerance: float = 1e-10,
    active_set_start: bool | None = None,
    retry_from_active_set: bool = True,
) -> SimplexRowsResult:
    """Minimum-norm non-negative rows with the same projections: argmin ½‖b‖² s.t. Uᵀb = Uᵀa, b ≥ 0.

    rows: (..., q, L) the rows a (non-negative, so that a itself is feasible); the q rows of a batch entry
        share its basis.
    basis: (..., L, k) orthonormal columns (zero columns allowed), e.g. of col([T|1]) so that Σb = Σa.
    active_set_start: start Newton from DAQP's active set (`_active_set_start`); None (default): where few
        directions are free, 0 < L - k ≤ ACTIVE_SET_MAX_FREE.
    retry_from_active_set: rows Newton from Uᵀa leaves unconverged are solved again, each from the active set
        (their iterations add up; kept where that converges), where 0 < L - k ≤ ACTIVE_SET_RETRY_MAX_FREE.
    The dual b = max(Uλ, 0) with Uᵀmax(Uλ, 0) = Uᵀa is solved by semismooth Newton, starting from λ = Uᵀa
    (b = P a, optimal when already non-negative) or from the dual point of DAQP's active set: the generalised
    Jacobian Uᵀ diag(1[Uλ>0]) U plus a tiny ridge (through a Woodbury identity when few entries are zero; kept
    from iteration to iteration by the entries that changed when many rows share a basis, `_TrackedJacobians`),
    then the full step where it meets the Armijo condition on the piecewise quadratic dual objective
    ½‖max(Uλ,0)‖² - λᵀUᵀa, else an exact line search on it. Each row stops on its own, and an iteration's work
    covers the rows still iterating only (`RowLayout`). Rows within the tolerance take a few more steps towards
    round-off level. Every returned row is feasible: the last iterate is corrected on its support until the
    equalities hold to float precision; where that fails (degenerate, almost one-hot rows) it is projected onto
    the affine set and moved from a towards it only as far as non-negativity allows.
    Chunked over the leading dims. Returns a SimplexRowsResult (solution (..., q, L), per-row fields (..., q)).
    """
    rows = as_float64_tensor(rows)
    basis = as_float64_tensor(basis)
    same_leading = basis.ndim == rows.ndim and basis.shape[:-2] == rows.shape[:-2]
    if rows.ndim < 2 or not same_leading or basis.shape[-2] != rows.shape[-1]:
        raise ValueError(
            f"rows must be (..., q, L) and basis (..., L, k) with the same leading dims and L; got "
            f"{tuple(rows.shape)} and {tuple(basis.shape)}"
        )
    if (rows < 0).any():
        raise ValueError("simplex rows must be non-negative (a probability row is its own feasible point)")
    leading = rows.shape[:-2]
    queries, length = rows.shape[-2:]
    k = basis.shape[-1]
    rows = rows.reshape(-1, queries, length)
    basis = basis.reshape(-1, length, k)
    count = rows.shape[0]
    if active_set_start is None:
        active_set_start = 0 < length - k <= ACTIVE_SET_MAX_FREE

    solution = torch.zeros_like(rows)
    iterations = torch.zeros((count, queries), dtype=torch.int64)
    converged = torch.ones((count, queries), dtype=torch.bool)
    residual = torch.zeros((count, queries), dtype=torch.float64)
    per_matrix = length * k + queries * (6 * (length + k) + 2 * k * k)
    if _use_outer_products(queries, length, k):
        per_matrix += length * k * (k + 1) // 2
    per_chunk = max(1, 4 * CHUNK_ELEMENTS // max(1, per_matrix))
    for start in range(0, count, per_chunk):
        chunk = slice(start, start + per_chunk)
        solution[chunk], iterations[chunk], converged[chunk], residual[chunk] = _simplex_chunk(
            rows[chunk], basis[chunk], max_iterations, tolerance, active_set_start
        )
    retry = retry_from_active_set and not active_set_start and 0 < length - k <= ACTIVE_SET_RETRY_MAX_FREE
    if retry and not converged.all():
        # Rows Newton left unconverged (degenerate minimisers) again, each from the active set; kept where converged.
        matrix_index, query_index = torch.nonzero(~converged, as_tuple=True)
        again = simplex_rows(
            rows[matrix_index, query_index, None], basis[matrix_index], max_iterations, tolerance, active_set_start=True
        )
        better = again.converged[:, 0]
        matrix_index, query_index = matrix_index[better], query_index[better]
        solution[matrix_index, query_index] = again.solution[better, 0]
        iterations[matrix_index, query_index] += again.iterations[better, 0]
        converged[matrix_index, query_index] = True
        residual[matrix_index, query_index] = again.optimality_residual[better, 0]
    return SimplexRowsResult(
        solution=solution.reshape(*leading, queries, length),
        iterations=iterations.reshape(*leading, queries),
        converged=converged.reshape(*leading, queries),
        optimality_residual=residual.reshape(*leading, queries),
        support_size=(solution > 0).sum(-1).reshape(*leading, queries),
    )


def _simplex_block(
    attention: torch.Tensor,
    with_ones: torch.Tensor,
    hidden_size: int,
    causal: bool,
    max_iterations: int,
    tolerance: float,
    basis: torch.Tensor | None = None,
    rank: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simplex variant for a chunk of matrices.

    attention (n, L, L); with_ones (n, L, c) = [X | s·1]; hidden_size the D of its rank threshold; basis and rank
    optionally `column_space_basis(with_ones, hidden_size)` when already computed (non-causal only).
    Returns the simplex attention (n, L, L) and the per-matrix solver statistics (n,).
    """
    n, length, columns = with_ones.shape
    result = attention.clone()
    iterations = torch.zeros((n, length), dtype=torch.int64)
    converged = torch.ones((n, length), dtype=torch.bool)
    residual = torch.zeros((n, length), dtype=torch.float64)

    def store(matrix_index, query_index, found: SimplexRowsResult) -> None:
        result[matrix_index, query_index] = found.solution
        iterations[matrix_index, query_index] = found.iterations
        converged[matrix_index, query_index] = found.converged
        residual[matrix_index, query_index] = found.optimality_residual

    if not causal:
        if basis is None or rank is None:
            basis, rank = column_space_basis(with_ones, hidden_size)
        solve = torch.nonzero(rank < length).flatten()  # rank = L: the only feasible row is a itself
        if len(solve):
            found = simplex_rows(attention[solve], basis[solve], max_iterations, tolerance)
            store(solve, slice(None), found)
    else:
        certified = full_rank_certificate(with_ones, hidden_size)
        # Certified: a prefix of p ≤ c rows has rank p (the row stays a); longer ones have rank c (QR basis).
        chosen = torch.nonzero(certified).flatten()
        if len(chosen) and length > columns:
            keep_rows = (torch.arange(length)[None, :] <= torch.arange(columns, length)[:, None]).to(torch.float64)
            prefixes = with_ones[chosen][:, None] * keep_rows[None, :, :, None]  # (n', L-c, L, c)
            bases = torch.linalg.qr(prefixes).Q * keep_rows[None, :, :, None]
            found = simplex_rows(attention[chosen, columns:, None, :], bases, max_iterations, tolerance)
            found = SimplexRowsResult(
                *(
                    field[..., 0, :] if field.ndim == 4 else field[..., 0]
                    for field in (
                        found.solution,
                        found.iterations,
                        found.converged,
                        found.optimality_residual,
                        found.support_size,
                    )
                )
            )
            store(chosen[:, None], torch.arange(columns, length)[None, :], found)
        for matrix_index in torch.nonzero(~certified).flatten().tolist():  # the exact per-prefix path (rare)
            bases, ranks = prefix_column_space_bases(with_ones[matrix_index : matrix_index + 1], hidden_size)
            solve = torch.nonzero(ranks[0] < torch.arange(1, length + 1)).flatten()
            if len(solve):
                found = simplex_rows(
                    attention[matrix_index, solve, None, :], bases[0, solve], max_iterations, tolerance
                )
                found = SimplexRowsResult(
                    found.solution[:, 0],
                    found.iterations[:, 0],
                    found.converged[:, 0],
                    found.optimality_residual[:, 0],
                    found.support_size[:, 0],
                )
                store(matrix_index, solve, found)
        result = torch.tril(result)
    statistics = {
        "iterations": iterations.amax(-1),
        "converged": converged.all(-1),
        "optimality_residual": residual.amax(-1),
        "support_size": (result > 0).sum(-1).to(torch.float64).mean(-1),
    }
    return result, statistics


def _simplex_band(
    attention: torch.Tensor,
    with_ones: torch.Tensor,
    hidden_size: int,
    band: KeyBand,
    max_iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simplex variant restricted to a band: row i solved on the keys S_i it sees, against col([X|s·1][S_i]).

    attention (n, L, L) (zero outside the band); with_ones (n, L, c). Returns the simplex attention (n, L, L), zero
    outside the band, and the per-matrix solver statistics (n,) as `_simplex_block`.
    """
    n, length, columns = with_ones.shape
    result = torch.zeros_like(attention)
    iterations = torch.zeros((n, length), dtype=torch.int64)
    converged = torch.ones((n, length), dtype=torch.bool)
    residual = torch.zeros((n, length), dtype=torch.float64)
    for queries, keys in band_row_groups(length, band):
        count, size = keys.shape
        per_chunk = band_chunk(n, count, size, columns)
        for start in range(0, n, per_chunk):
            chosen = torch.arange(start, min(n, start + per_chunk))
            windows = with_ones[chosen][:, keys].reshape(-1, size, columns)  # (n'·r, p, c)
            basis, rank = column_space_basis(windows, hidden_size)
            rows = attention[chosen][:, queries[:, None], keys].reshape(-1, 1, size).clone()  # (n'·r, 1, p)
            solve = torch.nonzero(rank < size).flatten()  # rank = |S_i|: the only feasible row is a itself
            found_iterations = torch.zeros(len(rows), dtype=torch.int64)
            found_converged = torch.ones(len(rows), dtype=torch.bool)
            found_residual = torch.zeros(len(rows), dtype=torch.float64)
            if len(solve):
                found = simplex_rows(rows[solve], basis[solve], max_iterations, tolerance)
                rows[solve] = found.solution
                found_iterations[solve] = found.iterations[:, 0]
                found_converged[solve] = found.converged[:, 0]
                found_residual[solve] = found.optimality_residual[:, 0]
            result[chosen[:, None, None], queries[None, :, None], keys[None]] = rows.reshape(-1, count, size)
            where = (chosen[:, None], queries[None, :])
            iterations[where] = found_iterations.reshape(-1, count)
            converged[where] = found_converged.reshape(-1, count)
            residual[where] = found_residual.reshape(-1, count)
    statistics = {
        "iterations": iterations.amax(-1),
        "converged": converged.all(-1),
        "optimality_residual": residual.amax(-1),
        "support_size": (result > 0).sum(-1).to(torch.float64).mean(-1),
    }
    return result, statistics


def simplex_projection(inputs: VariantInputs, with_ones: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The simplex variant (`_simplex_block`, banded: `_simplex_band`): (n, L, L) and the solver's statistics (n,)."""
    if inputs.banded:
        return _simplex_band(
            inputs.attention,
            inputs.space(with_ones),
            inputs.space_hidden_size(with_ones),
            inputs.band,
            inputs.simplex_max_iterations,
            inputs.simplex_tolerance,
        )
    basis, rank = inputs.basis(with_ones)
    return _simplex_block(
        inputs.attention,
        inputs.space(with_ones),
        inputs.space_hidden_size(with_ones),
        inputs.causal,
        inputs.simplex_max_iterations,
        inputs.simplex_tolerance,
        basis,
        rank,
    )
