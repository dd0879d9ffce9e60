"""The projections of efficient attention: numerical rank, column-space bases and the row projections.

The numerical kernels of the closed-form variants (effective, stochastic), shared by the simplex solver and the
driver (analysis.efficient_attention, whose docstring describes the method). Nothing here reads the variant registry:
analysis.variants names `orthogonal_projection` as a compute function and analysis.efficient_attention iterates it.
All shapes are batched: (n, L, c) for n matrices of L rows.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.key_bands import KeyBand, default_band

EPS = float(np.finfo(np.float64).eps)
# Largest number of float64 elements one batched temporary may hold (32 MiB); work is chunked to respect it.
CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# small helpers


def as_float64_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to(dtype=torch.float64, device="cpu")
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


def tiny_like(reference: torch.Tensor) -> torch.Tensor:
    return torch.finfo(reference.dtype).tiny


def safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
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
    w_out = as_float64_tensor(w_out)
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


def column_space_basis(matrix, hidden_size: int, qr=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the numerical column space, for a batch.

    matrix: (n, L, c); hidden_size: the D of the rank threshold σ_max·max(L, D)·eps; qr: optionally (Q (n, L, c),
    R (n, c, c)), the reduced QR of `matrix` when L ≥ c, already computed (`column_space_bases_with_ones`).
    Returns basis (n, L, min(L, c)) with orthonormal columns followed by zero columns (one non-zero column
    per unit of rank) and rank (n,) int64.
    Fast path: one QR (of M when L ≥ c, of Mᵀ otherwise) whose R certifies full rank (`_certified_by_triangular`);
    certified matrices take the QR basis (L ≥ c) or the identity (L < c: rank L, col(M) = R^L). The others
    take the exact SVD path.
    """
    matrix = as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    width = min(length, columns)
    basis = torch.zeros((n, length, width), dtype=torch.float64)
    rank = torch.zeros(n, dtype=torch.int64)
    if n == 0 or width == 0:
        return basis, rank
    if length >= columns:
        orthonormal, triangular = qr if qr is not None else torch.linalg.qr(matrix)
        certified = _certified_by_triangular(triangular, matrix, hidden_size)
        if certified.all():
            basis = orthonormal.clone() if qr is not None else orthonormal
        else:
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


def column_space_bases_with_ones(
    matrix: torch.Tensor, with_ones: torch.Tensor, hidden_size: int
) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """`column_space_basis` of M and of [M | s·1] from one QR, when L > c (else each its own).

    matrix: (n, L, c); with_ones: (n, L, c + 1), `with_ones_column(matrix)`; hidden_size: the D of M's threshold
    (D + 1 for [M | s·1]). Returns {False: (basis, rank) of M, True: (basis, rank) of [M | s·1]}.
    Householder QR factors the columns in order, so the QR of [M | s·1] restricted to its first c columns is a QR
    of M (Q[:, :c], R[:c, :c]): the two bases and certificates agree with separate QRs up to round-off.
    """
    n, length, columns = matrix.shape
    if n == 0 or length <= columns:
        return {
            False: column_space_basis(matrix, hidden_size),
            True: column_space_basis(with_ones, hidden_size + 1),
        }
    orthonormal, triangular = torch.linalg.qr(with_ones)
    return {
        False: column_space_basis(
            matrix, hidden_size, qr=(orthonormal[..., :columns], triangular[..., :columns, :columns])
        ),
        True: column_space_basis(with_ones, hidden_size + 1, qr=(orthonormal, triangular)),
    }


def value_output_basis(value, w_out, append_ones: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of col(T) (or col([T|1])), T = V·W, for a batch of heads.

    value: (n, L, d) the real rows of each head's values; w_out: (n, d, D) each head's W_O^h.
    Returns basis (n, L, r) (r = min(L, min(d, D)), +1 with append_ones; zero columns beyond the rank) and
    rank (n,) int64, the numerical rank of T (of [T | s·1] with append_ones, see `with_ones_column`).
    """
    value = as_float64_tensor(value)
    w_out = as_float64_tensor(w_out)
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
    matrix = as_float64_tensor(matrix)
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
    basis = as_float64_tensor(basis)
    return basis @ basis.mT


def project_rows(rows, basis) -> torch.Tensor:
    """Rows times the projector on col(basis): rows · B · Bᵀ.

    rows: (..., q, L); basis: (..., L, r) orthonormal (or zero) columns, batch dims broadcast.
    Returns (..., q, L).
    """
    rows = as_float64_tensor(rows)
    basis = as_float64_tensor(basis)
    return (rows @ basis) @ basis.mT


def project_rows_unless_identity(rows, basis, rank) -> torch.Tensor:
    """`project_rows`, except that matrices whose basis spans all of R^L (rank = L) keep their rows exactly.

    rows: (n, q, L); basis: (n, L, r); rank: (n,). Returns (n, q, L). (For rank L the projector is the identity;
    B·Bᵀ would only add round-off, and skipping it saves two products per matrix.)
    """
    rows = as_float64_tensor(rows)
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
    rows = torch.tril(as_float64_tensor(rows))
    matrix = as_float64_tensor(matrix)
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
        chosen = uncertified[start : start + per_chunk]
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


def band_chunk(matrices: int, rows: int, size: int, columns: int) -> int:
    """How many matrices of a band group fit one chunk of about CHUNK_ELEMENTS float64 per temporary."""
    return max(1, CHUNK_ELEMENTS // max(1, 4 * rows * size * max(columns, size)))


def project_rows_in_band(rows, matrix, hidden_size: int, band: KeyBand) -> torch.Tensor:
    """Band projection: row i times the projector on col(matrix[S_i]), S_i the keys query i sees in `band`.

    rows: (n, L, L) (entries outside the band are ignored); matrix: (n, L, c), e.g. X or [X | s·1]; hidden_size: the
    D of the rank threshold σ_max·max(|S_i|, D)·eps. Returns (n, L, L), zero outside the band. A row whose keys span
    all of R^|S_i| (rank |S_i|) keeps its entries exactly (`project_rows_unless_identity`).
    """
    rows = as_float64_tensor(rows)
    matrix = as_float64_tensor(matrix)
    n, length, columns = matrix.shape
    result = torch.zeros_like(rows)
    for queries, keys in band_row_groups(length, band):
        count, size = keys.shape
        per_chunk = band_chunk(n, count, size, columns)
        for start in range(0, n, per_chunk):
            chosen = slice(start, start + per_chunk)
            windows = matrix[chosen][:, keys].reshape(-1, size, columns)  # (n'·r, p, c)
            basis, rank = column_space_basis(windows, hidden_size)
            visible = rows[chosen][:, queries[:, None], keys].reshape(-1, 1, size)  # (n'·r, 1, p)
            projected = project_rows_unless_identity(visible, basis, rank)
            result[chosen, queries[:, None], keys] = projected.reshape(-1, count, size)
    return result


class VariantInputs:
    """A chunk of n equal-length real blocks, what every variant's compute function reads (analysis.variants).

    attention (n, L, L) float64 (lower-triangular when causal, zero outside the band); matrix (n, L, m) = X, with
    T = X Zᵀ; hidden_size the D of the rank threshold of T (D + 1 for [T|1]); band the keys each query sees
    (analysis.key_bands; default: the prefix when causal, every key otherwise). `banded` is True when the band
    restricts this block beyond that default: each row is then projected on the keys it sees only. The
    column-space bases are computed once per chunk, when a variant first asks, and shared by all variants;
    with_both_bases (set when both will be asked for: the rank of T is always a diagnostic) computes the bases of X
    and [X | s·1] together from one QR.
    """

    def __init__(
        self,
        attention: torch.Tensor,
        matrix: torch.Tensor,
        hidden_size: int,
        causal: bool,
        simplex_max_iterations: int,
        simplex_tolerance: float,
        band: KeyBand | None = None,
        with_both_bases: bool = False,
    ) -> None:
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
        self.with_both_bases = with_both_bases

    def space(self, with_ones: bool) -> torch.Tensor:
        """(n, L, c): X, or [X | s·1] when `with_ones`."""
        if with_ones not in self._spaces:
            self._spaces[with_ones] = with_ones_column(self.matrix)
        return self._spaces[with_ones]

    def space_hidden_size(self, with_ones: bool) -> int:
        """The D of the rank threshold of `space(with_ones)`."""
        return self.hidden_size + 1 if with_ones else self.hidden_size

    def basis(self, with_ones: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`column_space_basis` of `space(with_ones)` over the whole block: (basis (n, L, c), rank (n,)). When
        `with_both_bases` was set, the first call computes both bases from one QR (`column_space_bases_with_ones`)."""
        if with_ones not in self._bases:
            if self.with_both_bases:
                self._bases.update(column_space_bases_with_ones(self.matrix, self.space(True), self.hidden_size))
            else:
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
