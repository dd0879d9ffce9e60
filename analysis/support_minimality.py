"""Token-level minimality of the simplex variant's rows.

A simplex row b (b ≥ 0, Σb = 1, b·T = a·T) has a support S. Carathéodory's bound says that some feasible row has at
most rank([T|1]) tokens; the minimum-norm row the simplex variant picks need not be that one. S is *minimal* when no
token can be dropped: for every j in S, no non-negative row on S \\ {j} reproduces a·[T | s·1] (the head's output
and the row sum). That is a non-negative least-squares problem per dropped token, min_{c ≥ 0} ‖c·M[S\\{j}] − a·M‖
with M = [X | s·1] and X = V·factor (analysis.efficient_attention.output_factor: the column space and singular
values of T = V W_O^h without forming it); its relative residual above the tolerance for every j ⇒ minimal. A
support of more than rank(M) tokens is never minimal (its rows are linearly dependent). The simplex solver
(analysis.simplex_solver.simplex_rows) cannot answer this itself: it needs a feasible starting row, and whether the
smaller support has one is the question.

Decoder rows use only their prefix (row i has keys ≤ i), which the support already respects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls

from analysis.projections import output_factor, with_ones_column


def _relative_residual(rows: np.ndarray, target: np.ndarray) -> float:
    """min_{c ≥ 0} ‖c·rows − target‖ / ‖target‖; rows: [s, c] (s may be 0), target: [c]."""
    scale = float(np.linalg.norm(target)) or 1.0
    if rows.shape[0] == 0:
        return float(np.linalg.norm(target)) / scale
    _, residual = nnls(rows.T, target)
    return float(residual) / scale


def drop_residuals(support_rows: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """support_rows: [s, c] the rows of M on the support; target: [c] = a·M.
    Returns (the residual on the whole support, [s] the residual with each support token dropped)."""
    support_rows = np.asarray(support_rows, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    whole = _relative_residual(support_rows, target)
    dropped = np.array(
        [_relative_residual(np.delete(support_rows, j, axis=0), target) for j in range(support_rows.shape[0])]
    )
    return whole, dropped


@dataclass
class RowMinimality:
    """minimal: every dropped token leaves a residual above the tolerance (None: untestable, the support itself
    does not reproduce the output within the tolerance, e.g. after storage rounding); support_size; whole_residual;
    smallest_drop_residual (inf for an empty support)."""

    minimal: bool | None
    support_size: int
    whole_residual: float
    smallest_drop_residual: float


def row_minimality(
    attention_row: np.ndarray, simplex_row: np.ndarray, output_rows: np.ndarray, tolerance: float
) -> RowMinimality:
    """attention_row, simplex_row: [L]; output_rows: [L, c] = M = [X | s·1]."""
    support = np.flatnonzero(np.asarray(simplex_row) > 0)
    target = np.asarray(attention_row, dtype=np.float64) @ np.asarray(output_rows, dtype=np.float64)
    whole, dropped = drop_residuals(np.asarray(output_rows, dtype=np.float64)[support], target)
    smallest = float(dropped.min()) if len(dropped) else float("inf")
    minimal = None if whole > tolerance else bool(smallest > tolerance)
    return RowMinimality(minimal, len(support), whole, smallest)


def output_rows(value: np.ndarray, w_out: np.ndarray) -> np.ndarray:
    """value: [L, d] one head's values (its kv head's); w_out: [d, D]. Returns M = [X | s·1], [L, min(d, D) + 1]."""
    factor = output_factor(w_out)
    matrix = torch.as_tensor(np.asarray(value, dtype=np.float64)) @ factor
    return with_ones_column(matrix[None])[0].numpy()


def layer_minimality(
    attention: np.ndarray,
    simplex: np.ndarray,
    value: np.ndarray,
    w_out: np.ndarray,
    rows: int,
    rng: np.random.Generator,
    tolerance: float,
) -> dict[str, np.ndarray]:
    """Sampled rows of one example, layer by layer.

    attention, simplex: [layer, head, L, L] on the real block; value: [layer, kv_head, L, d]; w_out: [layer, head,
    d, D]; rows: (head, query) pairs drawn per layer (without replacement). Returns {name: [layer]}: 'tested'
    (rows judged), 'minimal', 'untestable', 'support_size' (mean over the judged rows, NaN when none)."""
    layers, heads, length, _ = attention.shape
    group = heads // value.shape[1]
    result = {name: np.zeros(layers) for name in ("tested", "minimal", "untestable")}
    result["support_size"] = np.full(layers, np.nan)
    for layer in range(layers):
        chosen = rng.choice(heads * length, size=min(rows, heads * length), replace=False)
        bases = {}
        sizes = []
        for pair in chosen:
            head, query = divmod(int(pair), length)
            if head not in bases:
                bases[head] = output_rows(value[layer, head // group], w_out[layer, head])
            found = row_minimality(attention[layer, head, query], simplex[layer, head, query], bases[head], tolerance)
            if found.minimal is None:
                result["untestable"][layer] += 1
                continue
            result["tested"][layer] += 1
            result["minimal"][layer] += found.minimal
            sizes.append(found.support_size)
        if sizes:
            result["support_size"][layer] = float(np.mean(sizes))
    return result


def minimal_share_by_layer(minimal: np.ndarray, tested: np.ndarray) -> np.ndarray:
    """minimal, tested: [example, layer] counts (negative: not measured). Returns [layer] the share of the judged
    rows that are minimal (NaN where none was judged)."""
    measured = np.asarray(tested) >= 0
    minimal_sum = np.where(measured, minimal, 0).sum(0).astype(np.float64)
    tested_sum = np.where(measured, tested, 0).sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tested_sum > 0, minimal_sum / tested_sum, np.nan)
