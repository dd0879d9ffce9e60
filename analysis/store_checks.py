"""Numeric invariants of stored attention and efficient attention, checked on one shard at a time (plain numpy).

Shapes: attention and efficient [example, layer, head, query, key]; value [example, layer, kv_head, position,
head_dim]; w_out [layer, head, head_dim, hidden]; length [example]. Query head h reads kv head h // (heads /
kv_heads). Everything beyond an example's `length` is padding and must be zero. Each function returns one number per
(example, layer, head) (per kv head for values): the worst violation of its invariant there, 0 when it holds exactly,
so that the caller can compare it with a tolerance and name the worst place.
"""

from __future__ import annotations

import numpy as np

# float32 attention rows sum to 1 within a few float32 eps times the row length; float16 rounds every entry to
# 2^-11 relative. The tolerances leave a margin of about 10 over what stored softmax rows show.
ROW_SUM_TOLERANCE = {"float32": 1e-4, "float16": 5e-3}
# ||(A_eff - A) T||_F / ||A T||_F: the efficient stage keeps it at float64 round-off; storing A_eff in float32 adds
# about 1e-7 relative.
OUTPUT_TOLERANCE = 1e-4
# Most negative entry allowed in a probability matrix (the simplex variant, stored attention).
NEGATIVE_TOLERANCE = 1e-7


def real_block_mask(length: np.ndarray, positions: int) -> np.ndarray:
    """[example, query, key] True inside each example's real length x length block."""
    inside = np.arange(positions)[None, :] < np.asarray(length)[:, None]  # [example, position]
    return inside[:, :, None] & inside[:, None, :]


def real_row_mask(length: np.ndarray, positions: int) -> np.ndarray:
    """[example, query] True for the real rows of each example."""
    return np.arange(positions)[None, :] < np.asarray(length)[:, None]


def outside_block_magnitude(matrices: np.ndarray, length: np.ndarray) -> np.ndarray:
    """[example, layer, head] largest |entry| outside the real block (padding must be exactly zero)."""
    largest = np.zeros(matrices.shape[:3], dtype=matrices.dtype)
    positions = matrices.shape[-1]
    for example, real in enumerate(np.asarray(length).tolist()):  # only the padding is read: no full-size copies
        if real < positions:
            rows = np.abs(matrices[example, :, :, real:, :]).max(axis=(-2, -1))  # the padding rows, every key
            keys = np.abs(matrices[example, :, :, :real, real:]).max(axis=(-2, -1), initial=0)  # real rows
            largest[example] = np.maximum(rows, keys)
    return largest


def value_padding_magnitude(value: np.ndarray, length: np.ndarray) -> np.ndarray:
    """[example, layer, kv_head] largest |value| at positions beyond the example's length."""
    largest = np.zeros(value.shape[:3], dtype=value.dtype)
    for example, real in enumerate(np.asarray(length).tolist()):
        if real < value.shape[3]:
            largest[example] = np.abs(value[example, :, :, real:, :]).max(axis=(-2, -1))
    return largest


def row_sum_error(matrices: np.ndarray, length: np.ndarray, target: np.ndarray | float = 1.0) -> np.ndarray:
    """[example, layer, head] max over real rows of |sum of the row - target| (target broadcast to [.., query])."""
    return row_sum_error_of_sums(row_sums(matrices), length, target)


def row_sums(matrices: np.ndarray) -> np.ndarray:
    """[example, layer, head, query] the rows' sums in float64 (summed in float64 without a float64 copy)."""
    return matrices.sum(-1, dtype=np.float64)


def row_sum_error_of_sums(sums: np.ndarray, length: np.ndarray, target: np.ndarray | float = 1.0) -> np.ndarray:
    """`row_sum_error` of row sums [example, layer, head, query] (`row_sums`; padding entries are checked apart)."""
    rows = real_row_mask(length, sums.shape[-1])[:, None, None]
    return np.where(rows, np.abs(sums - target), 0).max(axis=-1)


def most_negative(matrices: np.ndarray) -> np.ndarray:
    """[example, layer, head] max(0, -smallest entry)."""
    return np.maximum(-matrices.min(axis=(-2, -1)), 0).astype(np.float64)


def future_magnitude(matrices: np.ndarray) -> np.ndarray:
    """[example, layer, head] largest |entry| above the diagonal (decoder attention may not look ahead)."""
    return np.abs(np.triu(matrices, k=1)).max(axis=(-2, -1)).astype(np.float64)


def output_factors(w_out: np.ndarray) -> np.ndarray:
    """[layer, head, head_dim, head_dim] F with F·Fᵀ = W_O^h·W_O^hᵀ (F = Q·√Λ of the eigendecomposition of that
    head_dim x head_dim Gram matrix; the same as U·S of the SVD W_O^h = U S Zᵀ, up to signs and round-off):
    ‖M·V·W_O^h‖_F = ‖M·V·F‖_F for any M, so output norms need no [L x hidden] product. The Gram matrix's
    eigendecomposition costs a fraction of the SVD of W_O^h."""
    weights = w_out.astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(weights @ np.swapaxes(weights, -1, -2))
    return eigenvectors * np.sqrt(np.maximum(eigenvalues, 0.0))[..., None, :]


def output_residual(
    efficient: np.ndarray,
    attention: np.ndarray,
    value: np.ndarray,
    w_out: np.ndarray,
    factors: np.ndarray | None = None,
    length: np.ndarray | None = None,
) -> np.ndarray:
    """[example, layer, head] ‖(A_eff - A)·T‖_F / ‖A·T‖_F with T = V_kv(h)·W_O^h (0 where both are 0, inf where
    only A·T is, NaN where an input is). Padding is included as stored (it is zero in a sound store and checked
    apart). factors: `output_factors(w_out)`, when the caller has them already (they are the same for every
    variant). length [example]: when given, an example whose A and A_eff are zero outside the real block (and
    whose values are finite there) is computed on its real block alone: the same numbers, without the padding's
    products of zeros."""
    examples, layers, heads = attention.shape[:3]
    group = heads // value.shape[2]
    factors = output_factors(w_out) if factors is None else factors  # [layer, head, d, m]
    residual = np.zeros((examples, layers, heads))
    for example in range(examples):  # one example at a time bounds memory: [layer, head, L, m] float64
        block = slice(None)
        if length is not None and _padding_is_zero(
            efficient[example], attention[example], value[example], int(length[example])
        ):
            block = slice(0, int(length[example]))
        values = np.repeat(value[example, :, :, block].astype(np.float64), group, axis=1)  # [layer, head, L, d]
        projected = values @ factors  # [layer, head, L, m]
        a = attention[example, :, :, block, block].astype(np.float64)
        efficient_block = efficient[example, :, :, block, block].astype(np.float64)
        difference = np.linalg.norm((efficient_block - a) @ projected, axis=(-2, -1))
        reference = np.linalg.norm(a @ projected, axis=(-2, -1))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reference > 0, difference / reference, np.where(difference > 0, np.inf, 0))
        residual[example] = np.where(np.isnan(difference) | np.isnan(reference), np.nan, ratio)  # NaN stays NaN
    return residual


def _padding_is_zero(efficient: np.ndarray, attention: np.ndarray, value: np.ndarray, length: int) -> bool:
    """Whether one example's A and A_eff [layer, head, L, L] are exactly zero outside the real length x length
    block and its values [layer, kv_head, L, d] finite beyond the length: the padding then adds nothing to
    output_residual's products (a non-finite value would: 0 x inf is NaN)."""
    return not (
        efficient[..., length:, :].any()
        or efficient[..., :length, length:].any()
        or attention[..., length:, :].any()
        or attention[..., :length, length:].any()
    ) and bool(np.isfinite(value[:, :, length:]).all())


def worst(values: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """The largest entry (NaN counts as largest) and its index."""
    flat = np.where(np.isnan(values), np.inf, values)
    index = np.unravel_index(int(np.argmax(flat)), values.shape)
    return float(values[index]), tuple(int(i) for i in index)
