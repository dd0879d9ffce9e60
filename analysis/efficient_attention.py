"""Efficient attention: the parts of an attention matrix that do (and do not) reach the model's output.

For one example, layer and head, on the real L×L block only (padding excluded):

    A  (L×L)   attention probabilities
    V  (L×d)   the values of the kv head that serves this head (bias included)
    W  (d×D)   W_O^h, this head's slice of the output projection
    T = V W    (L×D), what the head adds to the residual stream is A·T

Variants (DESIGN.md, "Efficient attention"; each declared once, as a record in analysis/variants.py that names its
compute function here, `orthogonal_projection` or `simplex_projection`):

    effective   A · P_T             P_T the orthogonal projector on col(T)      keeps A·T
    stochastic  A · P_[T|1]         a column of ones appended                   keeps A·T, rows sum like A's rows
    simplex     per row a: argmin ‖b‖ s.t. b·T = a·T, Σb = Σa, b ≥ 0           a probability distribution

(Row sums are kept, not forced: for probability rows Σa = 1, up to the precision the attention was stored in.)

and `null = A - efficient` for each. Decoder (causal) models: row i may only use keys ≤ i, so row i is
projected with the prefix T[:i+1] (a different projector per row; the result stays lower-triangular).
Layers with a key band (analysis.key_bands; a sliding window shorter than the block): row i may only use the keys
S_i its band lets it see, so it is projected with T[S_i] (`project_rows_in_band`, `_simplex_band`; rows grouped by
|S_i| and batched); the result is zero outside the band. Layers without one take the paths below unchanged.
Grouped-query attention: query head h uses kv head h // (heads // kv_heads) (in a store of selected heads too:
each stored kv head serves as many stored heads, storage_schemas.selection.StoreSelection.check_storable).

How it is computed (all float64, batched over many matrices, torch):

* `output_factor`: the SVD W = U S Zᵀ gives X = V·(U S) (L×m, m = min(d, D)) with T = X Zᵀ, Z orthonormal
  columns, so X has exactly T's column space and singular values: no L×D matrix is ever formed.
* Numerical rank of an L×c matrix M: singular values above σ_max · max(L, D) · eps(float64), where D is the
  hidden size (D + 1 for [T|1]). rank([T|1]) is the numerical rank of [T | s·1] with s = ‖T‖_F / √L (the
  ones column scaled to T's size, so the rank does not depend on the units of T).
* Cheap certificates prove full rank from the R of a QR factorisation (1/‖R⁻¹‖_F ≤ σ_min, compared with a
  bound on the threshold, `_certified_by_triangular`): non-causal, of M itself (`column_space_basis`: the same
  QR gives the basis; L ≤ c and full rank means col(M) = R^L, and the projection is skipped); causal, of its
  first min(L, c) rows, which covers every prefix (`full_rank_certificate`; then one nested left-null basis
  serves all prefixes, `nested_left_null_basis`). The others take the exact SVD path (per prefix when causal).
* simplex: the dual of the row problem, b = max(Uλ, 0) with Uᵀmax(Uλ, 0) = Uᵀa (U an orthonormal basis of
  col([T|1])), solved by semismooth Newton (the full step where it decreases the dual enough, else an exact line
  search; each iteration works on the rows still iterating only, `simplex_rows`); every returned row is
  feasible (equalities to float precision, b ≥ 0) even when the solver does not converge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.key_bands import KeyBand, default_band
from analysis.variants import VARIANTS, Variant, unknown_variants, variant_record

DIAGNOSTICS: tuple[str, ...] = (
    "rank", "null_dim", "output_residual", "row_sum_error", "negative_mass",
    "null_norm_ratio", "iterations", "converged", "support_size", "optimality_residual",
)

EPS = float(np.finfo(np.float64).eps)
# Largest number of float64 elements one batched temporary may hold (32 MiB); work is chunked to respect it.
CHUNK_ELEMENTS = 1 << 22
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
# A full Newton step is taken when it decreases the dual objective by at least this fraction of the slope's promise.
ARMIJO = 1e-4
# Tolerance for "attention is lower-triangular" when causal=True.
CAUSAL_UPPER_TOLERANCE = 1e-6

_DIAGNOSTIC_DTYPES = {
    "rank": np.int64, "null_dim": np.int64, "output_residual": np.float64, "row_sum_error": np.float64,
    "negative_mass": np.float64, "null_norm_ratio": np.float64, "iterations": np.int64,
    "converged": np.bool_, "support_size": np.float64, "optimality_residual": np.float64,
}


@dataclass
class EfficientAttentionResult:
    """One variant's result for a batch.

    efficient: [example, layer, head, query, key] (float64 unless asked otherwise), zero outside each example's
        real L×L block.
    diagnostics: name -> [example, layer, head], one entry per name in DIAGNOSTICS:
        rank                 rank(T) of the full sequence
        null_dim             L - rank(T) (effective) or L - rank([T|1]) (stochastic, simplex)
        output_residual      ‖A_eff·T - A·T‖_F / ‖A·T‖_F
        row_sum_error        max_i |Σ_j A_eff[i, j] - 1|
        negative_mass        Σ |negative entries of A_eff| / L (mean per row)
        null_norm_ratio      ‖A - A_eff‖_F / ‖A‖_F
        iterations           simplex: most Newton iterations over the rows; 0 for the closed-form variants
        converged            simplex: every row converged (dual residual ≤ tolerance and the feasibility
                             repair moved it by at most REPAIR_ALLOWANCE·tolerance·‖Uᵀa‖); True otherwise
        support_size         mean number of non-zero entries per row
        optimality_residual  simplex: largest relative dual residual over the rows; 0.0 otherwise
    """

    efficient: np.ndarray
    diagnostics: dict[str, np.ndarray]


@dataclass
class SimplexRowsResult:
    """Output of `simplex_rows` for rows (..., q, L).

    solution: (..., q, L) feasible rows: solutionᵀU = aᵀU to float precision, solution ≥ 0.
    iterations: (..., q) int64 Newton iterations taken.
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
# small helpers


def _as_float64_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to(dtype=torch.float64, device="cpu")
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


def _tiny(reference: torch.Tensor) -> torch.Tensor:
    return torch.finfo(reference.dtype).tiny


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where both are 0 and inf where only the denominator is."""
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ratio, torch.where(numerator > 0, torch.inf, 0.0))


def rank_threshold(largest_singular_value: torch.Tensor, rows: int | torch.Tensor, hidden_size: int) -> torch.Tensor:
    """σ_max · max(rows, hidden_size) · eps: singular values above it count towards the numerical rank."""
    size = torch.clamp(torch.as_tensor(rows, dtype=torch.float64), min=float(hidden_size))
    return largest_singular_value * size * EPS


# --------------------------------------------------------------------------------------------------------------
# bases


def output_factor(w_out) -> torch.Tensor:
    """Factor of the output projection that keeps column spaces and singular values.

    w_out: (..., d, D). Returns factor (..., d, m), m = min(d, D), such that W = factor · Zᵀ with Z (D×m)
    orthonormal columns (from the QR factorisation Wᵀ = Z R, factor = Rᵀ). Hence for any V (L×d):
    T = V W = X Zᵀ with X = V · factor, and X has the column space and the singular values of T.
    """
    w_out = _as_float64_tensor(w_out)
    if w_out.ndim < 2:
        raise ValueError(f"w_out must have shape (..., head_dim, hidden); got shape {tuple(w_out.shape)}")
    return torch.linalg.qr(w_out.mT).R.mT


def with_ones_column(matrix: torch.Tensor) -> torch.Tensor:
    """[M | s·1] with s = ‖M‖_F / √L (1 when M = 0).

    matrix: (n, L, c). Returns (n, L, c + 1). The scale makes rank([T|1]) independent of T's units and
    does not change the column space.
    """
    n, length, _ = matrix.shape
    scale = torch.linalg.matrix_norm(matrix) / max(length, 1) ** 0.5
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    ones = scale[:, None, None] * torch.ones((n, length, 1), dtype=matrix.dtype)
    return torch.cat([matrix, ones], dim=-1)


def _certified_by_triangular(triangular: torch.Tensor, matrix: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """True where 1/‖R⁻¹‖_F (a lower bound of the smallest singular value of R) proves full numerical rank.

    triangular: (n, r, r) upper-triangular R of a QR factorisation; matrix: (n, L, c) the matrix whose rank
    threshold σ_max·max(L, hidden_size)·eps is bounded by ‖M‖_F·max(L, hidden_size)·eps (times 4 for round-off).
    """
    length = matrix.shape[1]
    size = triangular.shape[-1]
    identity = torch.eye(size, dtype=triangular.dtype).expand(triangular.shape[0], size, size)
    inverse = torch.linalg.solve_triangular(triangular, identity, upper=True)
    smallest_lower_bound = 1.0 / torch.linalg.matrix_norm(inverse)
    threshold_bound = torch.linalg.matrix_norm(matrix) * max(length, hidden_size) * EPS
    return torch.isfinite(smallest_lower_bound) & (smallest_lower_bound > 4.0 * threshold_bound)


def full_rank_certificate(matrix: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """True where the matrix and every prefix of its rows provably have full numerical rank.

    matrix: (n, L, c). Returns (n,) bool. With r = min(L, c) and H = the first r rows, certified means
    1/‖R⁻¹‖_F (a lower bound of σ_min(H), R from a QR of Hᵀ) > 4 ‖M‖_F max(L, hidden_size) eps, a bound of
    every prefix's rank threshold. By interlacing, a prefix of p ≤ r rows then has rank p and a prefix of
    p ≥ r rows has rank c. False only means "not proved": those matrices take the exact SVD path.
    """
    n, length, columns = matrix.shape
    if length == 0 or columns == 0:
        return torch.zeros(n, dtype=torch.bool)
    leading = min(length, columns)
    return _certified_by_triangular(torch.linalg.qr(matrix[:, :leading, :].mT).R, matrix, hidden_size)


def column_space_basis(matrix, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the numerical column space, for a batch.

    matrix: (n, L, c); hidden_size: the D of the rank threshold σ_max·max(L, D)·eps.
    Returns basis (n, L, min(L, c)) with orthonormal columns followed by zero columns (one non-zero column
    per unit of rank) and rank (n,) int64.
    Fast path: one QR (of M when L ≥ c, of Mᵀ otherwise) whose R certifies full rank (`_certified_by_triangular`);
    certified matrices take the QR basis (L ≥ c) or the identity (L < c: rank L, col(M) = R^L). The others
    take the exact SVD path.
    """
    matrix = _as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    width = min(length, columns)
    basis = torch.zeros((n, length, width), dtype=torch.float64)
    rank = torch.zeros(n, dtype=torch.int64)
    if n == 0 or width == 0:
        return basis, rank
    if length >= columns:
        orthonormal, triangular = torch.linalg.qr(matrix)
        certified = _certified_by_triangular(triangular, matrix, hidden_size)
        basis[certified] = orthonormal[certified]
    else:
        certified = _certified_by_triangular(torch.linalg.qr(matrix.mT).R, matrix, hidden_size)
        basis[certified] = torch.eye(length, dtype=torch.float64)
    rank[certified] = width
    uncertified = ~certified
    if uncertified.any():
        left, singular_values, _ = torch.linalg.svd(matrix[uncertified], full_matrices=False)
        keep = singular_values > rank_threshold(singular_values[:, :1], length, hidden_size)
        basis[uncertified] = left * keep[:, None, :]
        rank[uncertified] = keep.sum(-1)
    return basis, rank


def value_output_basis(value, w_out, append_ones: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of col(T) (or col([T|1])), T = V·W, for a batch of heads.

    value: (n, L, d) the real rows of each head's values; w_out: (n, d, D) each head's W_O^h.
    Returns basis (n, L, r) (r = min(L, min(d, D)), +1 with append_ones; zero columns beyond the rank) and
    rank (n,) int64, the numerical rank of T (of [T | s·1] with append_ones, see `with_ones_column`).
    """
    value = _as_float64_tensor(value)
    w_out = _as_float64_tensor(w_out)
    if value.ndim != 3 or w_out.ndim != 3 or value.shape[0] != w_out.shape[0] or value.shape[2] != w_out.shape[1]:
        raise ValueError(
            f"value must be (n, L, d) and w_out (n, d, D) with the same n and d; got {tuple(value.shape)} and "
            f"{tuple(w_out.shape)}"
        )
    matrix = value @ output_factor(w_out)
    hidden_size = w_out.shape[-1]
    if append_ones:
        return column_space_basis(with_ones_column(matrix), hidden_size + 1)
    return column_space_basis(matrix, hidden_size)


def prefix_column_space_bases(matrix, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (SVD) orthonormal bases of the column spaces of every prefix of rows.

    matrix: (n, L, c). Returns bases (n, L, L, r), r = min(L, c): bases[:, i] spans col(matrix[:, :i+1]) as
    a subspace of R^L (rows > i are zero; zero columns beyond the rank), and ranks (n, L) int64. The prefix
    of p rows uses the threshold σ_max · max(p, hidden_size) · eps. Memory n·L²·c: the slow exact path.
    """
    matrix = _as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    rows_of_prefix = torch.tril(torch.ones((length, length), dtype=torch.float64))  # [prefix i, row j] = j ≤ i
    prefixes = matrix[:, None, :, :] * rows_of_prefix[None, :, :, None]  # (n, L, L, c)
    left, singular_values, _ = torch.linalg.svd(prefixes, full_matrices=False)
    prefix_rows = torch.arange(1, length + 1, dtype=torch.float64)
    keep = singular_values > rank_threshold(singular_values[..., :1], prefix_rows[:, None], hidden_size)
    bases = left * keep[..., None, :] * rows_of_prefix[None, :, :, None]
    return bases, keep.sum(-1)


def nested_left_null_basis(matrix: torch.Tensor) -> torch.Tensor:
    """One orthonormal left-null basis that serves every prefix of rows (causal projections).

    matrix: (n, L, c) with L > c and every prefix of ≥ c rows of full column rank (see
    `full_rank_certificate`). Returns null (n, L, L - c): orthonormal columns with nullᵀ·matrix ≈ 0 and
    column j supported on rows ≤ c + j. So for a prefix of p rows the columns j < p - c are an orthonormal
    basis of its left null space, and P_p = I_p - null[:p, :p-c] null[:p, :p-c]ᵀ.
    Construction: the complete QR gives some left-null basis N0; the RQ factorisation of its bottom
    (L-c)×(L-c) block (a QR of the flipped transpose) rotates it to this staircase form.
    """
    n, length, columns = matrix.shape
    complete = torch.linalg.qr(matrix, mode="complete").Q  # (n, L, L)
    null = complete[..., columns:]  # (n, L, L-c)
    bottom = null[..., columns:, :]  # (n, L-c, L-c)
    rotation = torch.linalg.qr(bottom.flip(-2).mT).Q.flip(-1)
    null = null @ rotation
    row = torch.arange(length)[:, None]
    column = torch.arange(length - columns)[None, :]
    return null * (row <= columns + column)


# --------------------------------------------------------------------------------------------------------------
# projections


def projector(basis) -> torch.Tensor:
    """P = B Bᵀ. basis: (..., L, r) orthonormal (or zero) columns. Returns (..., L, L)."""
    basis = _as_float64_tensor(basis)
    return basis @ basis.mT


def project_rows(rows, basis) -> torch.Tensor:
    """Rows times the projector on col(basis): rows · B · Bᵀ.

    rows: (..., q, L); basis: (..., L, r) orthonormal (or zero) columns, batch dims broadcast.
    Returns (..., q, L).
    """
    rows = _as_float64_tensor(rows)
    basis = _as_float64_tensor(basis)
    return (rows @ basis) @ basis.mT


def project_rows_unless_identity(rows, basis, rank) -> torch.Tensor:
    """`project_rows`, except that matrices whose basis spans all of R^L (rank = L) keep their rows exactly.

    rows: (n, q, L); basis: (n, L, r); rank: (n,). Returns (n, q, L). (For rank L the projector is the identity;
    B·Bᵀ would only add round-off, and skipping it saves two products per matrix.)
    """
    rows = _as_float64_tensor(rows)
    projected = rank < rows.shape[-1]
    if projected.all():
        return project_rows(rows, basis)
    result = rows.clone()
    if projected.any():
        result[projected] = project_rows(rows[projected], basis[projected])
    return result


def project_rows_causal(rows, matrix, hidden_size: int) -> torch.Tensor:
    """Causal projection: row i times the projector on col(matrix[:i+1]) (as a subspace of R^(i+1)).

    rows: (n, L, L) (entries above the diagonal are ignored); matrix: (n, L, c), e.g. X or [X | s·1];
    hidden_size: the D of the rank threshold. Returns (n, L, L), lower-triangular.
    Certified matrices use `nested_left_null_basis`, the others `prefix_column_space_bases`.
    """
    rows = torch.tril(_as_float64_tensor(rows))
    matrix = _as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    result = rows.clone()
    certified = full_rank_certificate(matrix, hidden_size)
    if length > columns and certified.any():
        null = nested_left_null_basis(matrix[certified])  # (n', L, L-c)
        coefficients = rows[certified] @ null  # (n', L, L-c)
        query = torch.arange(length)[:, None]
        column = torch.arange(length - columns)[None, :]
        coefficients = coefficients * (column <= query - columns)
        result[certified] = rows[certified] - coefficients @ null.mT
    uncertified = torch.nonzero(~certified).flatten()
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, length * length * max(columns, 1)))
    for start in range(0, len(uncertified), per_chunk):
        chosen = uncertified[start:start + per_chunk]
        bases, _ = prefix_column_space_bases(matrix[chosen], hidden_size)  # (k, L, L, r)
        coefficients = torch.einsum("nil,nilr->nir", rows[chosen], bases)
        result[chosen] = torch.einsum("nir,nilr->nil", coefficients, bases)
    return torch.tril(result)


def band_row_groups(length: int, band: KeyBand) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of an L×L block grouped by how many keys they see in `band`: [(queries (r,), keys (r, p))], keys[k]
    the p consecutive keys query queries[k] sees (interior rows share one group; edge rows see fewer keys)."""
    windows = [band.window(query, length) for query in range(length)]
    groups: dict[int, list[int]] = {}
    for query, (start, stop) in enumerate(windows):
        groups.setdefault(stop - start, []).append(query)
    result = []
    for size, queries in sorted(groups.items()):
        starts = torch.tensor([windows[query][0] for query in queries])
        result.append((torch.tensor(queries), starts[:, None] + torch.arange(size)[None, :]))
    return result


def _band_chunk(matrices: int, rows: int, size: int, columns: int) -> int:
    """How many matrices of a band group fit one chunk of about CHUNK_ELEMENTS float64 per temporary."""
    return max(1, CHUNK_ELEMENTS // max(1, 4 * rows * size * max(columns, size)))


def project_rows_in_band(rows, matrix, hidden_size: int, band: KeyBand) -> torch.Tensor:
    """Band projection: row i times the projector on col(matrix[S_i]), S_i the keys query i sees in `band`.

    rows: (n, L, L) (entries outside the band are ignored); matrix: (n, L, c), e.g. X or [X | s·1]; hidden_size: the
    D of the rank threshold σ_max·max(|S_i|, D)·eps. Returns (n, L, L), zero outside the band. A row whose keys span
    all of R^|S_i| (rank |S_i|) keeps its entries exactly (`project_rows_unless_identity`).
    """
    rows = _as_float64_tensor(rows)
    matrix = _as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    result = torch.zeros_like(rows)
    for queries, keys in band_row_groups(length, band):
        count, size = keys.shape
        per_chunk = _band_chunk(n, count, size, columns)
        for start in range(0, n, per_chunk):
            chosen = slice(start, start + per_chunk)
            windows = matrix[chosen][:, keys].reshape(-1, size, columns)  # (n'·r, p, c)
            basis, rank = column_space_basis(windows, hidden_size)
            visible = rows[chosen][:, queries[:, None], keys].reshape(-1, 1, size)  # (n'·r, 1, p)
            projected = project_rows_unless_identity(visible, basis, rank)
            result[chosen, queries[:, None], keys] = projected.reshape(-1, count, size)
    return result


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
    """Jacobians by matrix products pay off when many rows share a basis and the zero sets are large."""
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
            self.groups.append((rows, chosen, packed_matrix[which[rows]], slot[rows], 2 ** group))

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
    basis: torch.Tensor, outer: torch.Tensor | None, which: torch.Tensor, layout: RowLayout,
    support: torch.Tensor, gram_diagonal: torch.Tensor, right: torch.Tensor, ridge: torch.Tensor,
) -> torch.Tensor:
    """Solve (Uᵀ diag(support) U + ridge I) x = right for each row.

    basis (M, L, k) with orthonormal or zero columns (so UᵀU = diag(gram_diagonal)); outer (M, L, k(k+1)/2) its
    `basis_outer_products` (or None); row r belongs to matrix which[r] (`layout` packs the rows per matrix);
    support (R, L) bool; gram_diagonal (R, k); right (R, k); ridge (R,). Returns (R, k).
    With Z the rows outside the support, UᵀDU = UᵀU - U_ZᵀU_Z: when |Z| ≤ k/2 the Woodbury identity needs only
    a |Z|×|Z| system; otherwise the k×k matrices U_SᵀU_S are formed, by one matrix product per basis from
    `outer` when given, else from the gathered support rows.
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
    if outer is None:
        support_rows = _gather_rows(basis, which, support)  # (R, s, k)
        jacobian = support_rows.mT @ support_rows
    else:
        lower = layout.rows_times(support.to(basis.dtype), outer)  # (R, k(k+1)/2)
        rows, columns = torch.tril_indices(k, k)
        jacobian = torch.zeros((len(which), k, k), dtype=basis.dtype)
        jacobian[:, rows, columns] = lower
        jacobian[:, columns, rows] = lower
    jacobian.diagonal(dim1=-2, dim2=-1).add_(ridge[:, None])
    return _cholesky_solve_psd(jacobian, right)


def _exact_line_search(combination: torch.Tensor, step: torch.Tensor, step_target: torch.Tensor) -> torch.Tensor:
    """Exact minimiser t ≥ 0 of the dual objective along a direction d, for each row.

    combination (R, L) = Uλ; step (R, L) = Ud; step_target (R,) = dᵀ(Uᵀa). Returns t (R,).
    φ(t) = ½‖max(Uλ + tUd, 0)‖² - (λ + td)ᵀUᵀa is convex and piecewise quadratic: its derivative
    φ'(t) = Σ_j u_j max(w_j + t u_j, 0) - dᵀUᵀa is non-decreasing and piecewise linear, with breakpoints
    t_j = -w_j/u_j where entry j switches sign. Sorting the breakpoints gives φ' on every piece; the root lies
    on the first piece whose right end has φ' ≥ 0. (Derivatives are exact to round-off even where differences
    of φ are not, which matters when λ is large.)
    """
    w, u = combination, step
    rows, length = w.shape
    active = (w > 0) | ((w == 0) & (u > 0))
    slope0 = (u * w * active).sum(-1) - step_target  # φ'(0) = α0 (+ β0·0)
    curvature0 = (u * u * active).sum(-1)
    switches = ((u > 0) & ~active) | ((u < 0) & active & (w > 0))
    breakpoint = torch.where(switches, -w / torch.where(switches, u, 1.0), torch.inf)
    breakpoint = torch.clamp(breakpoint, min=0)
    order = torch.argsort(breakpoint, dim=-1)
    sorted_breakpoint = breakpoint.gather(-1, order)
    sign = torch.where(u > 0, 1.0, -1.0) * switches
    slope = slope0[:, None] + torch.cumsum((sign * u * w).gather(-1, order), dim=-1)  # α after each breakpoint
    curvature = curvature0[:, None] + torch.cumsum((sign * u * u).gather(-1, order), dim=-1)  # β after each
    piece_alpha = torch.cat([slope0[:, None], slope], dim=-1)  # (R, L+1): φ'(t) = α + β t on piece i
    piece_beta = torch.clamp(torch.cat([curvature0[:, None], curvature], dim=-1), min=0)
    piece_start = torch.cat([torch.zeros((rows, 1), dtype=w.dtype), sorted_breakpoint], dim=-1)
    piece_end = torch.cat([sorted_breakpoint, torch.full((rows, 1), torch.inf, dtype=w.dtype)], dim=-1)
    finite_end = torch.isfinite(piece_end)
    derivative_at_end = torch.where(
        finite_end, piece_alpha + piece_beta * torch.where(finite_end, piece_end, 0.0),
        torch.where(piece_beta > 0, torch.inf, piece_alpha),
    )
    reaches_zero = derivative_at_end >= 0
    first = torch.where(reaches_zero.any(-1), reaches_zero.to(torch.int8).argmax(-1), length)[:, None]
    alpha, beta = piece_alpha.gather(-1, first)[:, 0], piece_beta.gather(-1, first)[:, 0]
    start, end = piece_start.gather(-1, first)[:, 0], piece_end.gather(-1, first)[:, 0]
    root = torch.where(beta > 0, -alpha / torch.where(beta > 0, beta, 1.0), torch.where(alpha >= 0, start, end))
    root = torch.minimum(torch.maximum(root, start), end)
    largest_finite = torch.where(torch.isfinite(sorted_breakpoint), sorted_breakpoint, 0.0).amax(-1)
    root = torch.where(torch.isfinite(root), root, torch.clamp(2 * largest_finite, min=1.0))  # unbounded: a long step
    return torch.where(slope0 < 0, root, torch.zeros_like(root))  # not a descent direction: no step


def _simplex_chunk(rows: torch.Tensor, basis: torch.Tensor, max_iterations: int, tolerance: float):
    """Semismooth Newton on the dual for one chunk: rows (M, q, L) share basis (M, L, k) per matrix.

    Each iteration works on the rows still iterating only (packed per matrix, `RowLayout`), so a few slow rows
    do not make their matrix's other rows pay for every extra iteration.
    Returns solution (M, q, L), iterations (M, q), converged (M, q), residual (M, q).
    """
    count, queries, length = rows.shape
    target = rows @ basis  # Uᵀa per row, (M, q, k)
    scale = torch.clamp(target.norm(dim=-1), min=_tiny(target))  # (M, q)
    gram_diagonal = basis.square().sum(-2)  # diag(UᵀU), (M, k)
    lam = target.clone()  # Uλ0 = P a (the stochastic row): optimal when it is already non-negative
    iterations = torch.zeros((count, queries), dtype=torch.int64)
    residual = torch.zeros((count, queries), dtype=torch.float64)
    active = torch.ones((count, queries), dtype=torch.bool)
    polish_steps = torch.zeros((count, queries), dtype=torch.int64)  # steps taken after reaching the tolerance
    polish_tolerance = min(tolerance, POLISH_TOLERANCE)

    outer = basis_outer_products(basis) if _use_outer_products(queries, length, basis.shape[-1]) else None
    matrices = torch.arange(count)  # matrices that still have active rows
    basis_now, outer_now = basis, outer
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
            outer_now = None if outer is None else outer_now[keep]
            which = (torch.cumsum(keep, 0) - 1)[which]
        layout = RowLayout(which, len(matrices))

        # Newton direction with the generalised Jacobian Uᵀ diag(1[Uλ > 0]) U and a tiny ridge.
        ridge = torch.full((len(which),), NEWTON_RIDGE, dtype=torch.float64)
        direction = _jacobian_solve(
            basis_now, outer_now, which, layout, combination > 0, gram_diagonal[matrix_of_row], -gradient, ridge
        )
        combination_step = layout.rows_times(direction, basis_now.mT)  # U d, (R, L)

        # The full Newton step where it decreases the dual objective enough (Armijo), else the exact line search.
        step_target = (direction * row_target).sum(-1)
        step_size = torch.ones_like(step_target)
        full_step = combination + combination_step
        change = 0.5 * (torch.clamp(full_step, min=0).square() - torch.clamp(combination, min=0).square()).sum(-1)
        slope = (combination_step * torch.clamp(combination, min=0)).sum(-1) - step_target  # φ'(0) < 0
        search = ~((slope < 0) & (change - step_target <= ARMIJO * slope))
        if search.any():
            step_size[search] = _exact_line_search(
                combination[search], combination_step[search], step_target[search])
        accepted = step_size > 0
        lam[matrix_of_row, query] = row_lam + (step_size * accepted)[:, None] * direction
        iterations[matrix_of_row, query] += 1
        # Rows whose line search found no decrease stop here (they are flagged unconverged below).
        active[matrix_of_row[~accepted], query[~accepted]] = False

    solution, moved = _feasible_rows(rows, basis, outer, lam, target, scale, gram_diagonal)
    converged = (residual <= tolerance) & (moved <= REPAIR_ALLOWANCE * tolerance * scale)
    return solution, iterations, converged, residual


def _feasible_rows(rows, basis, outer, lam, target, scale, gram_diagonal):
    """Turn the final dual iterates into feasible rows (Uᵀb = Uᵀa to float precision, b ≥ 0).

    rows (M, q, L), basis (M, L, k), outer its `basis_outer_products` or None, lam and target (M, q, k),
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
    #    Entries a correction pushes below zero leave the support, and the next round corrects again.
    for _ in range(FEASIBILITY_ROUNDS):
        missing = target - candidate @ basis  # equality defect, (M, q, k)
        needs = missing.norm(dim=-1) > equality_tolerance
        if not needs.any():
            break
        which, query = torch.nonzero(needs, as_tuple=True)
        correction = torch.zeros_like(lam)
        correction[which, query] = _jacobian_solve(
            basis, outer, which, RowLayout(which, count), support[which, query], gram_diagonal[which],
            missing[which, query], torch.full((len(which),), 1e-14, dtype=torch.float64),
        )
        candidate = torch.where(needs[..., None], candidate + support * (correction @ basis.mT), candidate)
        support &= ~(needs[..., None] & (candidate < -NEGATIVE_ROUND_OFF))
        candidate = torch.clamp(candidate, min=0)
    finite = torch.isfinite(candidate).all(-1)
    candidate = torch.where(finite[..., None], candidate, last_iterate)
    missing = target - candidate @ basis
    failed = ~finite | (missing.norm(dim=-1) > equality_tolerance)

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
) -> SimplexRowsResult:
    """Minimum-norm non-negative rows with the same projections: argmin ½‖b‖² s.t. Uᵀb = Uᵀa, b ≥ 0.

    rows: (..., q, L) the rows a (non-negative, so that a itself is feasible); the q rows of a batch entry
        share its basis.
    basis: (..., L, k) orthonormal columns (zero columns allowed), e.g. of col([T|1]) so that Σb = Σa.
    The dual b = max(Uλ, 0) with Uᵀmax(Uλ, 0) = Uᵀa is solved by semismooth Newton, starting from λ = Uᵀa
    (b = P a, optimal when already non-negative): the generalised Jacobian Uᵀ diag(1[Uλ>0]) U plus a tiny
    ridge (through a Woodbury identity when few entries are zero), then the full step where it meets the
    Armijo condition on the piecewise quadratic dual objective ½‖max(Uλ,0)‖² - λᵀUᵀa, else an exact line
    search on it. Each row stops on its own, and an iteration's work covers the rows still iterating only
    (`RowLayout`). Rows within the tolerance take a few more steps towards round-off level. Every returned row
    is feasible: the last iterate is corrected on its support until the equalities hold to float precision;
    where that fails (degenerate, almost one-hot rows) it is projected onto the affine set and moved from a
    towards it only as far as non-negativity allows.
    Chunked over the leading dims. Returns a SimplexRowsResult (solution (..., q, L), per-row fields (..., q)).
    """
    rows = _as_float64_tensor(rows)
    basis = _as_float64_tensor(basis)
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
            rows[chunk], basis[chunk], max_iterations, tolerance
        )
    return SimplexRowsResult(
        solution=solution.reshape(*leading, queries, length),
        iterations=iterations.reshape(*leading, queries),
        converged=converged.reshape(*leading, queries),
        optimality_residual=residual.reshape(*leading, queries),
        support_size=(solution > 0).sum(-1).reshape(*leading, queries),
    )


# --------------------------------------------------------------------------------------------------------------
# the reference implementation (deliberately naive)


def effective_attention_reference_loop(attention, value, w_out, length) -> np.ndarray:
    """Effective attention the way published implementations compute it: a Python loop over matrices.

    Same array layout as `efficient_attention` (non-causal; grouped-query heads use kv head h // group).
    For each (example, layer, head): T = V W, full SVD of T, N = the left singular vectors beyond the
    numerical rank, A_eff = A - A N Nᵀ. Returns [example, layer, head, query, key] float64.
    """
    attention = np.asarray(attention)
    value = np.asarray(value)
    w_out = np.asarray(w_out)
    examples, layers, heads = attention.shape[:3]
    group = heads // value.shape[2]
    result = np.zeros(attention.shape, dtype=np.float64)
    for example in range(examples):
        size = int(length[example])
        for layer in range(layers):
            for head in range(heads):
                a = attention[example, layer, head, :size, :size].astype(np.float64)
                v = value[example, layer, head // group, :size].astype(np.float64)
                t = v @ w_out[layer, head].astype(np.float64)
                left, singular_values, _ = np.linalg.svd(t, full_matrices=True)
                threshold = (singular_values[0] if singular_values.size else 0.0) * max(t.shape) * EPS
                rank = int((singular_values > threshold).sum())
                null = left[:, rank:]
                result[example, layer, head, :size, :size] = a - (a @ null) @ null.T
    return result


# --------------------------------------------------------------------------------------------------------------
# the batch entry point


def _check_inputs(attention, value, w_out, length, variants) -> tuple[np.ndarray, int]:
    if attention.ndim != 5:
        raise ValueError(
            f"attention must have 5 dims [example, layer, head, query, key]; got shape {attention.shape}"
        )
    if value.ndim != 5:
        raise ValueError(
            f"value must have 5 dims [example, layer, kv_head, position, head_dim]; got shape {value.shape}"
        )
    if w_out.ndim != 4:
        raise ValueError(f"w_out must have 4 dims [layer, head, head_dim, hidden]; got shape {w_out.shape}")
    examples, layers, heads, queries, keys = attention.shape
    if queries != keys:
        raise ValueError(f"attention must be square in (query, key); got {queries} queries and {keys} keys")
    if value.shape[0] != examples or value.shape[1] != layers:
        raise ValueError(
            f"value's [example, layer] dims {value.shape[:2]} do not match attention's {(examples, layers)}"
        )
    if w_out.shape[0] != layers or w_out.shape[1] != heads:
        raise ValueError(
            f"w_out's [layer, head] dims {w_out.shape[:2]} do not match attention's {(layers, heads)}"
        )
    if w_out.shape[2] != value.shape[4]:
        raise ValueError(f"w_out's head_dim {w_out.shape[2]} does not match value's head_dim {value.shape[4]}")
    kv_heads = value.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"the number of heads ({heads}) must be a multiple of the number of kv heads ({kv_heads}); "
            "pass value with one entry per kv head"
        )
    length = np.asarray(length)
    if length.shape != (examples,) or not np.issubdtype(length.dtype, np.integer):
        raise ValueError(f"length must be an integer array of shape ({examples},); got {length.dtype} {length.shape}")
    longest = min(queries, value.shape[3])
    if (length < 0).any() or (length > longest).any():
        raise ValueError(
            f"every length must lie in [0, {longest}] (attention has {queries} positions, value has "
            f"{value.shape[3]}); got lengths from {length.min()} to {length.max()}"
        )
    unknown = unknown_variants(variants)
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    for name, array, dims in (
        ("attention", attention, "[example, layer, head, query, key]"),
        ("value", value, "[example, layer, kv_head, position, head_dim]"),
        ("w_out", w_out, "[layer, head, head_dim, hidden]"),
    ):
        finite = np.isfinite(array)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"{name} holds {int((~finite).sum())} NaN or infinite values (the first at {dims} {first}): "
                "efficient attention needs finite inputs. The stored tensors are damaged or the model overflowed "
                "(e.g. float16 storage): `effattn verify STORE` names the damaged shards; extract them again"
            )
    return length.astype(np.int64), heads // kv_heads


def _check_key_bands(key_bands, layers: int, causal: bool) -> tuple[KeyBand, ...]:
    """One band per layer (the default band of `causal` when None); a causal model's band may not look ahead."""
    if key_bands is None:
        return (default_band(causal),) * layers
    bands = tuple(key_bands)
    if len(bands) != layers or not all(isinstance(band, KeyBand) for band in bands):
        raise ValueError(f"key_bands must hold one analysis.key_bands.KeyBand per layer ({layers}); got {bands!r}")
    if causal and any(band.right != 0 for band in bands):
        raise ValueError(f"causal=True but the key bands {[band for band in bands if band.right != 0]} let queries see "
                         "later keys: a causal model's bands have right reach 0 (pass causal=False for encoders)")
    return bands


def _band_groups(layer: np.ndarray, bands: tuple[KeyBand, ...], size: int, causal: bool):
    """Split a chunk's matrices by the band of their layer within blocks of `size` rows: yields (chosen, band), chosen
    a (n,) numpy bool array (None: the whole chunk) and band None where it is the default (the unrestricted paths)."""
    within = [band.within(size) for band in bands]
    default = default_band(causal)
    distinct = sorted({within[index] for index in layer.tolist()}, key=lambda band: (band == default, repr(band)))
    if len(distinct) == 1:
        yield None, None if distinct[0] == default else distinct[0]
        return
    of_layer = np.array([within[index] == band for index in range(len(bands)) for band in distinct]).reshape(
        len(bands), len(distinct))
    for column, band in enumerate(distinct):
        chosen = of_layer[layer, column]
        if chosen.any():
            yield chosen, None if band == default else band


def _restricted_to_band(block: torch.Tensor, band: KeyBand, where: tuple) -> torch.Tensor:
    """block (n, L, L) with entries outside `band` set to zero; weight beyond round-off there is refused."""
    visible = torch.from_numpy(band.visible(block.shape[-1]))
    outside = torch.where(visible, 0.0, block.abs())
    if outside.numel() and outside.max() > CAUSAL_UPPER_TOLERANCE:
        worst = int(outside.flatten(1).amax(-1).argmax())
        raise ValueError(
            f"attention of (example, layer, head) {tuple(int(index[worst]) for index in where)} has weight "
            f"{outside.max().item():.3g} on keys outside the band its layer's mask allows ({band.left} left, "
            f"{band.right} right of the diagonal): the stored attention and the store's model.key_bands disagree; "
            "extract the store again"
        )
    return torch.where(visible, block, 0.0)


def _diagnostics_of(
    efficient: torch.Tensor, attention: torch.Tensor, matrix: torch.Tensor, length: int
) -> dict[str, torch.Tensor]:
    """Per-matrix diagnostics independent of the solver. Shapes (n, L, L), (n, L, L), (n, L, m) -> (n,).

    Matrices whose efficient attention is the attention itself (L ≤ rank: nothing to remove) have output residual
    and null-norm ratio exactly 0; the products are formed only for the others.
    """
    output_residual = torch.zeros(efficient.shape[0], dtype=torch.float64)
    null_norm_ratio = torch.zeros(efficient.shape[0], dtype=torch.float64)
    changed = (efficient != attention).flatten(1).any(-1)
    if changed.any():
        difference = efficient[changed] - attention[changed]
        output = attention[changed] @ matrix[changed]  # A·X; ‖A·T‖ = ‖A·X‖ because T = X Zᵀ with orthonormal Z
        output_residual[changed] = _safe_ratio(
            torch.linalg.matrix_norm(difference @ matrix[changed]), torch.linalg.matrix_norm(output)
        )
        null_norm_ratio[changed] = _safe_ratio(
            torch.linalg.matrix_norm(difference), torch.linalg.matrix_norm(attention[changed])
        )
    return {
        "output_residual": output_residual,
        "row_sum_error": (efficient.sum(-1) - 1.0).abs().amax(-1),
        "negative_mass": torch.clamp(efficient, max=0).abs().sum((-2, -1)) / length,
        "null_norm_ratio": null_norm_ratio,
        "support_size": (efficient != 0).sum(-1).to(torch.float64).mean(-1),
    }


def _simplex_block(
    attention: torch.Tensor, with_ones: torch.Tensor, hidden_size: int, causal: bool,
    max_iterations: int, tolerance: float, basis: torch.Tensor | None = None, rank: torch.Tensor | None = None,
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
            found = SimplexRowsResult(*(field[..., 0, :] if field.ndim == 4 else field[..., 0]
                                        for field in (found.solution, found.iterations, found.converged,
                                                      found.optimality_residual, found.support_size)))
            store(chosen[:, None], torch.arange(columns, length)[None, :], found)
        for matrix_index in torch.nonzero(~certified).flatten().tolist():  # the exact per-prefix path (rare)
            bases, ranks = prefix_column_space_bases(with_ones[matrix_index:matrix_index + 1], hidden_size)
            solve = torch.nonzero(ranks[0] < torch.arange(1, length + 1)).flatten()
            if len(solve):
                found = simplex_rows(
                    attention[matrix_index, solve, None, :], bases[0, solve], max_iterations, tolerance
                )
                found = SimplexRowsResult(found.solution[:, 0], found.iterations[:, 0], found.converged[:, 0],
                                          found.optimality_residual[:, 0], found.support_size[:, 0])
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
    attention: torch.Tensor, with_ones: torch.Tensor, hidden_size: int, band: KeyBand,
    max_iterations: int, tolerance: float,
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
        per_chunk = _band_chunk(n, count, size, columns)
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


class VariantInputs:
    """A chunk of n equal-length real blocks, what every variant's compute function reads (analysis.variants).

    attention (n, L, L) float64 (lower-triangular when causal, zero outside the band); matrix (n, L, m) = X, with
    T = X Zᵀ; hidden_size the D of the rank threshold of T (D + 1 for [T|1]); band the keys each query sees
    (analysis.key_bands; default: the prefix when causal, every key otherwise). `banded` is True when the band
    restricts this block beyond that default: each row is then projected on the keys it sees only. The
    column-space bases are computed once per chunk, when a variant first asks, and shared by all variants.
    """

    def __init__(self, attention: torch.Tensor, matrix: torch.Tensor, hidden_size: int, causal: bool,
                 simplex_max_iterations: int, simplex_tolerance: float, band: KeyBand | None = None) -> None:
        self.attention = attention
        self.matrix = matrix
        self.hidden_size = hidden_size
        self.causal = causal
        self.band = (band or default_band(causal)).within(attention.shape[-1])
        self.banded = self.band != default_band(causal)
        self.simplex_max_iterations = simplex_max_iterations
        self.simplex_tolerance = simplex_tolerance
        self._spaces: dict[bool, torch.Tensor] = {False: matrix}
        self._bases: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def space(self, with_ones: bool) -> torch.Tensor:
        """(n, L, c): X, or [X | s·1] when `with_ones`."""
        if with_ones not in self._spaces:
            self._spaces[with_ones] = with_ones_column(self.matrix)
        return self._spaces[with_ones]

    def space_hidden_size(self, with_ones: bool) -> int:
        """The D of the rank threshold of `space(with_ones)`."""
        return self.hidden_size + 1 if with_ones else self.hidden_size

    def basis(self, with_ones: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`column_space_basis` of `space(with_ones)` over the whole block: (basis (n, L, c), rank (n,))."""
        if with_ones not in self._bases:
            self._bases[with_ones] = column_space_basis(self.space(with_ones), self.space_hidden_size(with_ones))
        return self._bases[with_ones]


def orthogonal_projection(inputs: VariantInputs, with_ones: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A·P on col(T) (effective) or col([T|1]) (stochastic); causal: every row with its prefix; banded: every row
    with the keys it sees. (n, L, L), {}."""
    if inputs.banded:
        return project_rows_in_band(
            inputs.attention, inputs.space(with_ones), inputs.space_hidden_size(with_ones), inputs.band
        ), {}
    if inputs.causal:
        return project_rows_causal(inputs.attention, inputs.space(with_ones), inputs.space_hidden_size(with_ones)), {}
    basis, rank = inputs.basis(with_ones)
    return project_rows_unless_identity(inputs.attention, basis, rank), {}


def simplex_projection(inputs: VariantInputs, with_ones: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The simplex variant (`_simplex_block`, banded: `_simplex_band`): (n, L, L) and the solver's statistics (n,)."""
    if inputs.banded:
        return _simplex_band(inputs.attention, inputs.space(with_ones), inputs.space_hidden_size(with_ones),
                             inputs.band, inputs.simplex_max_iterations, inputs.simplex_tolerance)
    basis, rank = inputs.basis(with_ones)
    return _simplex_block(
        inputs.attention, inputs.space(with_ones), inputs.space_hidden_size(with_ones), inputs.causal,
        inputs.simplex_max_iterations, inputs.simplex_tolerance, basis, rank,
    )


def _efficient_block(
    attention: torch.Tensor, matrix: torch.Tensor, hidden_size: int, causal: bool, variants: Sequence[str],
    simplex_max_iterations: int, simplex_tolerance: float, band: KeyBand | None = None,
) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """All requested variants for a chunk of equal-length matrices, each by its record's compute function.

    attention (n, L, L) real blocks (lower-triangular when causal, zero outside `band`); matrix (n, L, m) = X, with
    T = X Zᵀ. Returns {variant: (efficient (n, L, L), {diagnostic: (n,)})}.
    """
    length = attention.shape[-1]
    inputs = VariantInputs(attention, matrix, hidden_size, causal, simplex_max_iterations, simplex_tolerance, band)
    rank = inputs.basis(False)[1]
    results = {}
    for name in variants:
        record = variant_record(name)
        result, statistics = record.compute(inputs, record.projects_with_ones)
        stats = _diagnostics_of(result, attention, matrix, length)
        stats["rank"] = rank
        stats["null_dim"] = length - inputs.basis(record.projects_with_ones)[1]
        stats.update(statistics)
        results[name] = (result, stats)
    return results


def equal_length_blocks(
    attention, value, factor: torch.Tensor, length: np.ndarray, extra_per_matrix: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
    """Every (example, layer, head) of a batch in chunks of equal-length matrices, real blocks only, float64.

    attention: [example, layer, head, L, L]; value: [example, layer, kv_head, L, head_dim]; factor:
    output_factor(w_out), (layer, head, d, m); length: [example]. Yields (example, layer, head) index arrays (n,),
    the attention blocks (n, size, size) and X = V·factor (n, size, m), with about CHUNK_ELEMENTS float64 per
    temporary for a computation holding (10 + extra_per_matrix) L×L matrices per block.
    """
    layers, heads = attention.shape[1:3]
    group = heads // value.shape[2]
    columns = factor.shape[-1]
    for size in sorted(set(np.asarray(length).tolist()) - {0}):
        chosen_examples = np.flatnonzero(length == size)
        total = len(chosen_examples) * layers * heads
        per_chunk = max(1, CHUNK_ELEMENTS // (size * size * (10 + extra_per_matrix) + 4 * size * columns))
        for start in range(0, total, per_chunk):
            flat = np.arange(start, min(total, start + per_chunk))
            example_position, layer, head = np.unravel_index(flat, (len(chosen_examples), layers, heads))
            example = chosen_examples[example_position]
            block = _as_float64_tensor(attention[example, layer, head, :size, :size])  # (n, L, L)
            values = _as_float64_tensor(value[example, layer, head // group, :size, :])  # (n, L, d)
            yield example, layer, head, block, values @ factor[torch.from_numpy(layer), torch.from_numpy(head)]


def efficient_attention(
    attention: np.ndarray,
    value: np.ndarray,
    w_out: np.ndarray,
    length: np.ndarray,
    causal: bool,
    variants: Sequence[str] = VARIANTS,
    simplex_max_iterations: int = 200,
    simplex_tolerance: float = 1e-10,
    output_dtype=np.float64,
    key_bands: Sequence[KeyBand] | None = None,
) -> dict[str, EfficientAttentionResult]:
    """Efficient attention of every (example, layer, head) for the chosen variants.

    attention: [example, layer, head, query, key] probabilities; the real block of example e is
        [:length[e], :length[e]], everything else is padding and ignored.
    value: [example, layer, kv_head, position, head_dim] values (bias included).
    w_out: [layer, head, head_dim, hidden] each head's slice of the output projection.
    length: [example] int, real tokens per example.
    causal: decoder attention (row i uses keys ≤ i and is projected with the prefix T[:i+1]).
    output_dtype: the dtype of the returned efficient arrays (computed in float64 either way; the stage asks for
        the store's float32 and so never holds a float64 copy of a shard).
    key_bands: one analysis.key_bands.KeyBand per layer of `attention` (a store's `store_key_bands`), the keys each
        query of that layer sees; None: the prefix when causal, every key otherwise. Where a band restricts a block
        (a sliding window shorter than it), row i is projected on the rows of T inside its band only, so no variant
        puts weight on a key the model hid from query i; attention with weight outside its band is refused.
    Returns {variant: EfficientAttentionResult} (see there for the diagnostics). The null part is
    `attention - efficient` on the real block.

    Matrices of equal length are batched together and processed in chunks of at most about CHUNK_ELEMENTS
    float64 per temporary.
    """
    attention = np.asarray(attention)
    value = np.asarray(value)
    w_out = np.asarray(w_out)
    variants = tuple(variants)
    length, _ = _check_inputs(attention, value, w_out, length, variants)
    examples, layers, heads = attention.shape[:3]
    hidden_size = w_out.shape[3]

    factor = output_factor(w_out)  # (layer, head, d, m)
    columns = factor.shape[-1]
    efficient = {name: np.zeros(attention.shape, dtype=output_dtype) for name in variants}
    diagnostics = {
        name: {key: np.zeros((examples, layers, heads), dtype=_DIAGNOSTIC_DTYPES[key]) for key in DIAGNOSTICS}
        for name in variants
    }
    for name in variants:
        diagnostics[name]["converged"][...] = True

    bands = _check_key_bands(key_bands, layers, causal)
    extra = max((variant_record(name).extra_temporaries(columns, causal) for name in variants), default=0)
    non_negative = [name for name in variants if variant_record(name).non_negative]
    for example, layer, head, block, matrix in equal_length_blocks(attention, value, factor, length, extra):
        size = block.shape[-1]
        if causal:
            upper = torch.triu(block, diagonal=1).abs()
            if upper.numel() and upper.max() > CAUSAL_UPPER_TOLERANCE:
                raise ValueError(
                    f"causal=True but attention has weight {upper.max().item():.3g} on future keys (above the "
                    "diagonal of the real block); pass causal=False for encoder models"
                )
            block = torch.tril(block)
        if non_negative and (block < 0).any():
            names = " and ".join(non_negative)
            raise ValueError(
                f"the {names} variant{'s need' if len(non_negative) > 1 else ' needs'} non-negative attention "
                f"(probabilities); got negative entries in the real block — pass variants without {names} for "
                "signed matrices"
            )
        for chosen, band in _band_groups(layer, bands, size, causal):
            where = (example, layer, head) if chosen is None else (example[chosen], layer[chosen], head[chosen])
            part, part_matrix = (block, matrix) if chosen is None else (
                block[torch.from_numpy(chosen)], matrix[torch.from_numpy(chosen)])
            if band is not None:
                part = _restricted_to_band(part, band, where)
            results = _efficient_block(
                part, part_matrix, hidden_size, causal, variants, simplex_max_iterations, simplex_tolerance, band
            )
            for name, (result, stats) in results.items():
                efficient[name][where[0], where[1], where[2], :size, :size] = result.numpy()
                for key, values_of_key in stats.items():
                    diagnostics[name][key][where] = values_of_key.numpy()
    return {
        name: EfficientAttentionResult(efficient=efficient[name], diagnostics=diagnostics[name]) for name in variants
    }
