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
    outside = ~real_block_mask(length, matrices.shape[-1])[:, None, None]
    return np.where(outside, np.abs(matrices), 0).max(axis=(-2, -1))


def value_padding_magnitude(value: np.ndarray, length: np.ndarray) -> np.ndarray:
    """[example, layer, kv_head] largest |value| at positions beyond the example's length."""
    beyond = ~real_row_mask(length, value.shape[3])[:, None, None, :, None]
    return np.where(beyond, np.abs(value), 0).max(axis=(-2, -1))


def row_sum_error(matrices: np.ndarray, length: np.ndarray, target: np.ndarray | float = 1.0) -> np.ndarray:
    """[example, layer, head] max over real rows of |sum of the row - target| (target broadcast to [.., query])."""
    sums = matrices.astype(np.float64).sum(-1)  # [example, layer, head, query]; padding entries are checked apart
    rows = real_row_mask(length, matrices.shape[-2])[:, None, None]
    return np.where(rows, np.abs(sums - target), 0).max(axis=-1)


def most_negative(matrices: np.ndarray) -> np.ndarray:
    """[example, layer, head] max(0, -smallest entry)."""
    return np.maximum(-matrices.min(axis=(-2, -1)), 0).astype(np.float64)


def future_magnitude(matrices: np.ndarray) -> np.ndarray:
    """[example, layer, head] largest |entry| above the diagonal (decoder attention may not look ahead)."""
    return np.abs(np.triu(matrices, k=1)).max(axis=(-2, -1)).astype(np.float64)


def output_factors(w_out: np.ndarray) -> np.ndarray:
    """[layer, head, head_dim, m] U·S of the SVD W_O^h = U S Zᵀ: ‖M·V·W_O^h‖_F = ‖M·V·(U S)‖_F for any M, so
    output norms need no [L x hidden] product."""
    left, singular, _ = np.linalg.svd(w_out.astype(np.float64), full_matrices=False)
    return left * singular[..., None, :]


def output_residual(
    efficient: np.ndarray, attention: np.ndarray, value: np.ndarray, w_out: np.ndarray
) -> np.ndarray:
    """[example, layer, head] ‖(A_eff - A)·T‖_F / ‖A·T‖_F with T = V_kv(h)·W_O^h (0 where both are 0, inf where
    only A·T is, NaN where an input is). Padding is included as stored (it is zero in a sound store and checked
    apart)."""
    examples, layers, heads = attention.shape[:3]
    group = heads // value.shape[2]
    factors = output_factors(w_out)  # [layer, head, d, m]
    residual = np.zeros((examples, layers, heads))
    for example in range(examples):  # one example at a time bounds memory: [layer, head, L, m] float64
        values = np.repeat(value[example].astype(np.float64), group, axis=1)  # [layer, head, L, d]
        projected = values @ factors  # [layer, head, L, m]
        a = attention[example].astype(np.float64)
        difference = np.linalg.norm((efficient[example].astype(np.float64) - a) @ projected, axis=(-2, -1))
        reference = np.linalg.norm(a @ projected, axis=(-2, -1))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reference > 0, difference / reference, np.where(difference > 0, np.inf, 0))
        residual[example] = np.where(np.isnan(difference) | np.isnan(reference), np.nan, ratio)  # NaN stays NaN
    return residual


def worst(values: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """The largest entry (NaN counts as largest) and its index."""
    flat = np.where(np.isnan(values), np.inf, values)
    index = np.unravel_index(int(np.argmax(flat)), values.shape)
    return float(values[index]), tuple(int(i) for i in index)
