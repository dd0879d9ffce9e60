"""Efficient attention: the parts of an attention matrix that do (and do not) reach the model's output.

For one example, layer and head, on the real L×L block only (padding excluded):

    A  (L×L)   attention probabilities
    V  (L×d)   the values of the kv head that serves this head (bias included)
    W  (d×D)   W_O^h, this head's slice of the output projection
    T = V W    (L×D), what the head adds to the residual stream is A·T

Variants (DESIGN.md, "Efficient attention"; each declared once, as a record in analysis/variants.py that names its
compute function, `analysis.projections.orthogonal_projection` or `analysis.simplex_solver.simplex_projection`):

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
from analysis.projections import (
    CHUNK_ELEMENTS,
    EPS,
    VariantInputs,
    as_float64_tensor,
    output_factor,
    safe_ratio,
)
from analysis.variants import VARIANTS, unknown_variants, variant_record

DIAGNOSTICS: tuple[str, ...] = (
    "rank",
    "null_dim",
    "output_residual",
    "row_sum_error",
    "negative_mass",
    "null_norm_ratio",
    "iterations",
    "converged",
    "support_size",
    "optimality_residual",
)
# Tolerance for "attention is lower-triangular" when causal=True.
CAUSAL_UPPER_TOLERANCE = 1e-6

_DIAGNOSTIC_DTYPES = {
    "rank": np.int64,
    "null_dim": np.int64,
    "output_residual": np.float64,
    "row_sum_error": np.float64,
    "negative_mass": np.float64,
    "null_norm_ratio": np.float64,
    "iterations": np.int64,
    "converged": np.bool_,
    "support_size": np.float64,
    "optimality_residual": np.float64,
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
        raise ValueError(f"attention must have 5 dims [example, layer, head, query, key]; got shape {attention.shape}")
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
        raise ValueError(f"w_out's [layer, head] dims {w_out.shape[:2]} do not match attention's {(layers, heads)}")
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
        raise ValueError(
            f"causal=True but the key bands {[band for band in bands if band.right != 0]} let queries see "
            "later keys: a causal model's bands have right reach 0 (pass causal=False for encoders)"
        )
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
        len(bands), len(distinct)
    )
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


class _SharedDiagnosticTerms:
    """The terms of the diagnostics that depend on the attention only, computed once per chunk for all variants and
    only for the matrices some variant changed: ‖A·X‖_F and ‖A‖_F, (n,) each (NaN where not computed yet)."""

    def __init__(self, attention: torch.Tensor, matrix: torch.Tensor) -> None:
        self.attention = attention
        self.matrix = matrix
        self.output_norm = torch.full((attention.shape[0],), torch.nan, dtype=torch.float64)
        self.attention_norm = torch.full((attention.shape[0],), torch.nan, dtype=torch.float64)

    def norms(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖A·X‖_F, ‖A‖_F) of the matrices `chosen` (n,) bool."""
        missing = chosen & torch.isnan(self.output_norm)
        if missing.any():
            attention = self.attention[missing]
            # ‖A·T‖ = ‖A·X‖ because T = X Zᵀ with orthonormal Z
            self.output_norm[missing] = torch.linalg.matrix_norm(attention @ self.matrix[missing])
            self.attention_norm[missing] = torch.linalg.matrix_norm(attention)
        return self.output_norm[chosen], self.attention_norm[chosen]


def _diagnostics_of(
    efficient: torch.Tensor,
    attention: torch.Tensor,
    matrix: torch.Tensor,
    length: int,
    shared: _SharedDiagnosticTerms | None = None,
) -> dict[str, torch.Tensor]:
    """Per-matrix diagnostics independent of the solver. Shapes (n, L, L), (n, L, L), (n, L, m) -> (n,).

    Matrices whose efficient attention is the attention itself (L ≤ rank: nothing to remove) have output residual
    and null-norm ratio exactly 0; the products are formed only for the others. `shared`: the attention's own
    terms, shared by the variants of one chunk (computed here when None).
    """
    shared = shared if shared is not None else _SharedDiagnosticTerms(attention, matrix)
    output_residual = torch.zeros(efficient.shape[0], dtype=torch.float64)
    null_norm_ratio = torch.zeros(efficient.shape[0], dtype=torch.float64)
    difference = efficient - attention  # zero exactly where the entries are equal (finite inputs)
    changed = difference.flatten(1).any(-1)
    if changed.all():
        output_norm, attention_norm = shared.norms(changed)
        output_residual = safe_ratio(torch.linalg.matrix_norm(difference @ matrix), output_norm)
        null_norm_ratio = safe_ratio(torch.linalg.matrix_norm(difference), attention_norm)
    elif changed.any():
        difference = difference[changed]
        output_norm, attention_norm = shared.norms(changed)
        output_residual[changed] = safe_ratio(torch.linalg.matrix_norm(difference @ matrix[changed]), output_norm)
        null_norm_ratio[changed] = safe_ratio(torch.linalg.matrix_norm(difference), attention_norm)
    return {
        "output_residual": output_residual,
        "row_sum_error": (efficient.sum(-1) - 1.0).abs().amax(-1),
        "negative_mass": torch.clamp(efficient, max=0).abs().sum((-2, -1)) / length,
        "null_norm_ratio": null_norm_ratio,
        "support_size": torch.count_nonzero(efficient, dim=-1).to(torch.float64).mean(-1),
    }


def _efficient_block(
    attention: torch.Tensor,
    matrix: torch.Tensor,
    hidden_size: int,
    causal: bool,
    variants: Sequence[str],
    simplex_max_iterations: int,
    simplex_tolerance: float,
    band: KeyBand | None = None,
) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """All requested variants for a chunk of equal-length matrices, each by its record's compute function.

    attention (n, L, L) real blocks (lower-triangular when causal, zero outside `band`); matrix (n, L, m) = X, with
    T = X Zᵀ. Returns {variant: (efficient (n, L, L), {diagnostic: (n,)})}.
    """
    length = attention.shape[-1]
    with_ones = any(variant_record(name).projects_with_ones for name in variants)  # then both bases are asked for
    inputs = VariantInputs(
        attention, matrix, hidden_size, causal, simplex_max_iterations, simplex_tolerance, band, with_ones
    )
    rank = inputs.basis(False)[1]
    shared = _SharedDiagnosticTerms(attention, matrix)
    results = {}
    for name in variants:
        record = variant_record(name)
        result, statistics = record.compute(inputs, record.projects_with_ones)
        stats = _diagnostics_of(result, attention, matrix, length, shared)
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
            block = as_float64_tensor(attention[example, layer, head, :size, :size])  # (n, L, L)
            values = as_float64_tensor(value[example, layer, head // group, :size, :])  # (n, L, d)
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
            part, part_matrix = (
                (block, matrix)
                if chosen is None
                else (block[torch.from_numpy(chosen)], matrix[torch.from_numpy(chosen)])
            )
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
