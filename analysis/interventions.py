"""Interventions of the causal stage: which attention matrices are injected in place of the real ones.

For one example, layer and head (notation of analysis.efficient_attention: A the attention, E = A_eff the
stored efficient attention of a variant, T = V W_O^h, X = V·factor with col(X) = col(T)):

    replay                      A                          the stored original: must reproduce the stored logits
    efficient:<variant>         E                          sufficiency: does the prediction survive?
    null:<variant>              A - E                      necessity: the removed part alone
    efficient+null-noise:<v>    E + N                      N random, rows in the left null space of T ([T|1] for
                                                           variants that project against it: stochastic, simplex;
                                                           analysis/variants.py), ||N|| = ||A - E||: must not move
    colspace-noise:<variant>    A + C                      C random, rows in col(T), ||C|| = ||A - E||: must move
    uniform                     1/L on every real key      (causal: 1/(i+1) on keys <= i)
    ablate                      0                          the head adds nothing but the output bias
    minimality:effective:k=<k>  A P_(r-k)                  the effective projection with the k weakest directions
                                                           of col(T) (smallest singular values) dropped

Norms are Frobenius norms of the real L×L block. Causal (decoder) models: every row i uses the prefix T[:i+1],
so every matrix stays lower-triangular. In layers with a key band (a sliding window, analysis.key_bands) the noise
is drawn on the keys each query sees and projected against those rows of T only (uniform and minimality keep the
prefix / whole-sequence rule). Random matrices come from a generator seeded by (seed, example index,
intervention name): the same example gets the same noise however the examples are batched.

An intervention is an `Intervention` object from the moment its name is read (`Intervention.parse`) until it is
written into the results dataset (`Intervention.name` and `results_row`); it holds its kind's record
(`InterventionKind`) and its variant's record (analysis.variants.Variant). Adding a kind: one `InterventionKind`
in KIND_RECORDS below, its matrices in `intervention_matrices`, plus its tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.efficient_attention import VARIANTS, equal_length_blocks
from analysis.key_bands import KeyBand, default_band
from analysis.projections import (
    column_space_basis,
    output_factor,
    prefix_column_space_bases,
    project_rows,
    project_rows_causal,
    project_rows_in_band,
    rank_threshold,
    with_ones_column,
)
from analysis.variants import Variant, variant_record


@dataclass(frozen=True)
class InterventionKind:
    """One kind of intervention, the only place a kind is declared (its matrices: `intervention_matrices`).

    takes_variant: built from an efficient-attention variant (`kind:<variant>`).
    reads_efficient: reads the stored efficient attention of that variant (minimality recomputes its projection).
    per_layer_by_default: measured one layer at a time (scope "layer") unless --layer-interventions says otherwise.
    removes_directions: the minimality probe: `kind:<variant>:k=<k>`, k >= 1 directions removed.
    """

    name: str
    description: str
    takes_variant: bool = False
    reads_efficient: bool = False
    per_layer_by_default: bool = False
    removes_directions: bool = False


KIND_RECORDS: dict[str, InterventionKind] = {
    record.name: record
    for record in (
        InterventionKind("replay", "the stored attention A (must reproduce the stored logits)"),
        InterventionKind(
            "efficient",
            "efficient attention E of the variant (sufficiency)",
            takes_variant=True,
            reads_efficient=True,
            per_layer_by_default=True,
        ),
        InterventionKind(
            "null",
            "only the null part A − E, what the variant removes (necessity)",
            takes_variant=True,
            reads_efficient=True,
            per_layer_by_default=True,
        ),
        InterventionKind(
            "efficient+null-noise",
            "E + random left-null-space noise of norm ‖A − E‖ (must not move)",
            takes_variant=True,
            reads_efficient=True,
        ),
        InterventionKind(
            "colspace-noise",
            "A + random noise inside col(T) of norm ‖A − E‖ (must move)",
            takes_variant=True,
            reads_efficient=True,
        ),
        InterventionKind(
            "uniform", "uniform attention over the real (causal: visible) keys", per_layer_by_default=True
        ),
        InterventionKind("ablate", "zero attention: the head adds nothing", per_layer_by_default=True),
        InterventionKind(
            "minimality",
            "A projected on col(T) without its k weakest directions",
            takes_variant=True,
            removes_directions=True,
        ),
    )
}
KINDS: tuple[str, ...] = tuple(KIND_RECORDS)
KIND_DESCRIPTIONS: dict[str, str] = {name: record.description for name, record in KIND_RECORDS.items()}
DEFAULT_MINIMALITY_DIRECTIONS: tuple[int, ...] = (1, 2, 4, 8, 16)


def kind_record(name: str) -> InterventionKind:
    """The record of the intervention kind called `name` (a ValueError names the kinds)."""
    try:
        return KIND_RECORDS[name]
    except KeyError:
        raise ValueError(f"unknown intervention kind {name!r}: choose from {list(KINDS)}") from None


@dataclass(frozen=True, repr=False)
class Intervention:
    """One injected intervention: its kind's record, the record of the variant it is built from (None when the
    kind takes none) and, for the minimality probe, the k directions removed. The constructor also takes names:
    Intervention("null", "simplex")."""

    kind: InterventionKind
    variant: Variant | None = None
    removed_directions: int = 0  # minimality only: k

    def __post_init__(self) -> None:
        kind = self.kind if isinstance(self.kind, InterventionKind) else kind_record(self.kind)
        object.__setattr__(self, "kind", kind)
        variant = self.variant
        if kind.takes_variant:
            if not isinstance(variant, Variant) and variant not in VARIANTS:
                raise ValueError(
                    f"intervention {kind.name!r} needs a variant from {list(VARIANTS)}, e.g. '{kind.name}:effective'"
                )
            if not isinstance(variant, Variant):
                object.__setattr__(self, "variant", variant_record(variant))
        elif variant:
            name = variant.name if isinstance(variant, Variant) else variant
            raise ValueError(f"intervention {kind.name!r} takes no variant, got {name!r}")
        else:
            object.__setattr__(self, "variant", None)
        if kind.removes_directions:
            if self.variant.name != "effective":
                raise ValueError(
                    "the minimality probe truncates the effective projection: use minimality:effective:k=K"
                )
            if self.removed_directions < 1:
                raise ValueError(f"minimality needs k >= 1 directions removed, got {self.removed_directions}")
        elif self.removed_directions:
            raise ValueError(f"only minimality removes directions, got k={self.removed_directions} for {kind.name}")

    @property
    def name(self) -> str:
        """The name written into the results dataset and read on the command line."""
        if self.kind.removes_directions:
            return f"{self.kind.name}:{self.variant.name}:k={self.removed_directions}"
        return f"{self.kind.name}:{self.variant.name}" if self.variant else self.kind.name

    @property
    def variant_name(self) -> str:
        """The variant's name, '' when the kind takes none."""
        return self.variant.name if self.variant else ""

    @property
    def needs_efficient(self) -> bool:
        """Whether the stored efficient attention of `variant` is read (minimality recomputes its projection)."""
        return self.kind.reads_efficient

    def results_row(self) -> dict[str, str | int]:
        """Its entries in the results dataset's coordinates (storage_schemas.causal_results)."""
        return {
            "name": self.name,
            "kind": self.kind.name,
            "variant": self.variant_name,
            "removed_directions": self.removed_directions,
        }

    def __repr__(self) -> str:
        return f"Intervention.parse({self.name!r})"

    @classmethod
    def parse(cls, name: str) -> Intervention:
        """'efficient:stochastic', 'null:simplex', 'minimality:effective:k=4', 'ablate', ..."""
        parts = name.strip().split(":")
        if parts[0] in KIND_RECORDS and KIND_RECORDS[parts[0]].removes_directions:
            if len(parts) != 3 or not parts[2].startswith("k=") or not parts[2][2:].isdigit():
                raise ValueError(f"cannot read {name!r}: write the minimality probe as minimality:effective:k=4")
            return cls(parts[0], parts[1], int(parts[2][2:]))
        if len(parts) > 2:
            raise ValueError(f"cannot read intervention {name!r}: write KIND or KIND:VARIANT, e.g. null:effective")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)


def default_interventions(
    variants: Sequence[str] = VARIANTS, minimality_directions: Sequence[int] = DEFAULT_MINIMALITY_DIRECTIONS
) -> list[Intervention]:
    """Every intervention of the causal tests for these variants (minimality only when 'effective' is among them):
    replay, then each kind with a variant for every variant, then the kinds without one, then the minimality
    probes."""
    interventions = [Intervention("replay")]
    for kind in KIND_RECORDS.values():
        if kind.takes_variant and not kind.removes_directions:
            interventions += [Intervention(kind, variant) for variant in variants]
    interventions += [
        Intervention(kind) for kind in KIND_RECORDS.values() if not kind.takes_variant and kind.name != "replay"
    ]
    if "effective" in variants:
        interventions += [Intervention("minimality", "effective", k) for k in minimality_directions]
    return interventions


def parse_interventions(names: Sequence[str]) -> list[Intervention]:
    """Interventions from their names, in order, without duplicates (an error names a duplicate)."""
    interventions = [Intervention.parse(name) for name in names]
    seen = set()
    for intervention in interventions:
        if intervention.name in seen:
            raise ValueError(f"intervention {intervention.name} is listed twice")
        seen.add(intervention.name)
    return interventions


def default_layer_interventions(interventions: Sequence[Intervention]) -> list[Intervention]:
    """The interventions measured one layer at a time by default: those whose kind says so."""
    return [item for item in interventions if item.kind.per_layer_by_default]


def default_head_interventions(interventions: Sequence[Intervention]) -> list[Intervention]:
    """The intervention measured one head at a time by default: ablate where it is run; otherwise a null part (the
    same by construction, (A - E)·T = 0), else the first intervention."""
    ablate = [item for item in interventions if item.kind.name == "ablate"]
    nulls = [item for item in interventions if item.kind.name == "null"]
    return ablate or nulls[:1] or list(interventions[:1])


# --------------------------------------------------------------------------------------------------------------
# the matrices


def _noise_seed(seed: int, example_index: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{example_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_blocks(
    example_indices: np.ndarray, layers: int, heads: int, size: int, seed: int, name: str
) -> torch.Tensor:
    """[example, layer, head, size, size] standard normal float64, reproducible per example."""
    blocks = torch.empty((len(example_indices), layers, heads, size, size), dtype=torch.float64)
    for position, example_index in enumerate(example_indices):
        generator = torch.Generator().manual_seed(_noise_seed(seed, int(example_index), name))
        blocks[position] = torch.randn((layers, heads, size, size), generator=generator, dtype=torch.float64)
    return blocks


def _scaled_to(matrices: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """matrices (n, L, L) rescaled to Frobenius norms `norms` (n,); a zero matrix stays zero."""
    current = torch.linalg.matrix_norm(matrices)
    factor = torch.where(current > 0, norms / torch.where(current > 0, current, torch.ones_like(current)), 0.0)
    return matrices * factor[:, None, None]


def _truncated_projection(
    attention: torch.Tensor,
    matrix: torch.Tensor,
    hidden_size: int,
    removed: int,
    causal: bool,
    shared: SharedBases,
    chunk_number: int,
) -> torch.Tensor:
    """Rows of `attention` (n, L, L) projected on the span of the leading rank - `removed` left singular vectors
    of `matrix` (n, L, m) (causal: of every row's prefix matrix[:i+1]). Returns (n, L, L). The singular vectors
    come from `shared`: the probes for several k share one decomposition."""
    length = attention.shape[-1]
    if not causal:

        def decompose() -> tuple[torch.Tensor, torch.Tensor]:
            left, singular_values, _ = torch.linalg.svd(matrix, full_matrices=False)
            return left, (singular_values > rank_threshold(singular_values[:, :1], length, hidden_size)).sum(-1)

        left, rank = shared.get("left singular vectors", chunk_number, matrix, decompose)
        keep = torch.arange(left.shape[-1])[None, :] < (rank - removed)[:, None]
        return project_rows(attention, left * keep[:, None, :])
    bases, ranks = shared.get(  # (n, L, L, r), (n, L)
        "prefix bases", chunk_number, matrix, lambda: prefix_column_space_bases(matrix, hidden_size)
    )
    keep = torch.arange(bases.shape[-1])[None, None, :] < (ranks - removed)[:, :, None]  # (n, L, r)
    bases = bases * keep[:, :, None, :]
    coefficients = torch.einsum("nil,nilr->nir", attention, bases)
    return torch.tril(torch.einsum("nir,nilr->nil", coefficients, bases))


# Bases shared by the interventions of one batch are kept up to this many float64 elements in all (512 MiB).
SHARED_BASES_ELEMENTS = 1 << 26


class SharedBases:
    """Decompositions that several interventions of one batch need, computed once per chunk of equal-length
    matrices: the SVD behind every minimality probe, the bases of col(T) and col([T|1]) behind the noise.

    The chunks of a batch are the same for every intervention (they depend only on the lengths and the shapes), so
    an entry is keyed by what it is and the chunk's number, and checked against the chunk's matrix X (a different
    matrix under the same key is computed afresh, not served). Up to `limit` float64 elements are kept; beyond
    that, entries are computed each time they are asked for. Use one per batch.
    """

    def __init__(self, limit: int = SHARED_BASES_ELEMENTS) -> None:
        self._kept: dict[tuple[str, int], tuple[torch.Tensor, tuple]] = {}
        self._elements = 0
        self._limit = limit

    def get(self, what: str, chunk_number: int, matrix: torch.Tensor, compute):
        """The entry `what` of chunk `chunk_number` whose matrix X is `matrix` (n, L, m): kept or computed now."""
        key = (what, chunk_number)
        if key in self._kept:
            kept_matrix, value = self._kept[key]
            if kept_matrix.shape == matrix.shape and torch.equal(kept_matrix, matrix):
                return value
            return compute()  # another chunk under this number (a SharedBases used for two batches): not shared
        value = compute()
        size = sum(part.numel() for part in value if isinstance(part, torch.Tensor))
        if self._elements + size + matrix.numel() <= self._limit:
            self._kept[key] = (matrix, value)
            self._elements += size + matrix.numel()
        return value


def _noise_in_bands(
    random: torch.Tensor,
    space: torch.Tensor,
    hidden_size: int,
    causal: bool,
    bands: Sequence[KeyBand],
    project_whole_chunk,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (k, n, n) kept to the keys each query sees, and its rows projected on col(space) over those keys.

    space (k, n, c), X or [X | s·1]; bands: each matrix's band within n rows; project_whole_chunk(rows) projects
    rows of the whole chunk on col(space) (non-causal, no band: the chunk's shared basis). Returns (noise, inside),
    both (k, n, n) and zero outside each band."""
    default = default_band(causal)
    if all(band == default for band in bands):
        if causal:
            random = torch.tril(random)
            return random, project_rows_causal(random, space, hidden_size)
        return random, project_whole_chunk(random)
    random = random.clone()
    inside = torch.zeros_like(random)
    for band in set(bands):
        chosen = torch.tensor([each == band for each in bands])
        random[chosen] = random[chosen] * torch.from_numpy(band.visible(random.shape[-1]))
        if band != default:
            inside[chosen] = project_rows_in_band(random[chosen], space[chosen], hidden_size, band)
        elif causal:
            inside[chosen] = project_rows_causal(random[chosen], space[chosen], hidden_size)
        else:
            inside[chosen] = project_rows(random[chosen], column_space_basis(space[chosen], hidden_size)[0])
    return random, inside


def _uniform_block(n: int, size: int, causal: bool) -> torch.Tensor:
    if causal:
        visible = torch.tril(torch.ones((size, size), dtype=torch.float64))
        block = visible / visible.sum(-1, keepdim=True)
    else:
        block = torch.full((size, size), 1.0 / size, dtype=torch.float64)
    return block.expand(n, size, size)


@dataclass
class _Chunk:
    """Equal-length matrices of a batch: where they are and their float64 blocks."""

    example: np.ndarray  # (n,) position in the batch
    layer: np.ndarray
    head: np.ndarray
    attention: torch.Tensor  # (n, L, L)
    matrix: torch.Tensor  # (n, L, m) = X with col(X) = col(T)
    efficient: torch.Tensor | None  # (n, L, L) stored efficient attention of the variant


def _chunks(attention, value, w_out, length, efficient, extra_per_matrix: int) -> Iterator[_Chunk]:
    """analysis.efficient_attention.equal_length_blocks, with the stored efficient blocks beside them."""
    blocks = equal_length_blocks(attention, value, output_factor(w_out), length, extra_per_matrix)
    for example, layer, head, block, matrix in blocks:
        size = block.shape[-1]
        yield _Chunk(
            example=example,
            layer=layer,
            head=head,
            attention=block,
            matrix=matrix,
            efficient=None
            if efficient is None
            else torch.as_tensor(np.asarray(efficient[example, layer, head, :size, :size]), dtype=torch.float64),
        )


def intervention_matrices(
    intervention: Intervention,
    attention: np.ndarray,
    value: np.ndarray,
    w_out: np.ndarray,
    length: np.ndarray,
    causal: bool,
    efficient: np.ndarray | None = None,
    example_indices: np.ndarray | None = None,
    seed: int = 0,
    shared: SharedBases | None = None,
    key_bands: Sequence[KeyBand] | None = None,
) -> np.ndarray:
    """The matrices `intervention` injects for every (example, layer, head) of a batch.

    attention: [example, layer, head, L, L] stored probabilities; value: [example, layer, kv_head, L, head_dim];
    w_out: [layer, head, head_dim, hidden]; length: [example] real tokens; efficient: [example, layer, head, L, L]
    the stored efficient attention of `intervention.variant` (required when `intervention.needs_efficient`);
    example_indices: [example] the examples' indices in the store (they seed the noise; default 0..n-1).
    shared: decompositions shared by the interventions of this batch (`SharedBases`; default: none shared).
    key_bands: one analysis.key_bands.KeyBand per layer (a store's `store_key_bands`; None: the prefix when causal,
        every key otherwise): the noise of `efficient+null-noise` and `colspace-noise` is drawn on the keys each
        query sees and projected row by row against those rows of T, as the efficient stage projected them.
    Returns [example, layer, head, L, L] float32, zero outside each example's real block.
    """
    attention = np.asarray(attention)
    examples, layers, heads, size, _ = attention.shape
    length = np.asarray(length).astype(np.int64)
    if example_indices is None:
        example_indices = np.arange(examples)
    if intervention.needs_efficient and efficient is None:
        raise ValueError(
            f"{intervention.name} needs the stored efficient attention of variant {intervention.variant_name}"
        )
    result = np.zeros(attention.shape, dtype=np.float32)
    kind = intervention.kind.name
    if kind == "ablate":
        return result
    if kind in ("replay", "efficient", "null", "uniform"):
        for index, n in enumerate(length):
            if kind == "replay":
                block = attention[index, :, :, :n, :n]
            elif kind == "efficient":
                block = efficient[index, :, :, :n, :n]
            elif kind == "null":
                block = attention[index, :, :, :n, :n].astype(np.float64) - efficient[index, :, :, :n, :n]
            else:
                block = _uniform_block(1, int(n), causal)[0].numpy()
            result[index, :, :, :n, :n] = block
        return result

    hidden_size = w_out.shape[-1]
    bands = tuple(key_bands) if key_bands is not None else (default_band(causal),) * layers
    with_ones = intervention.variant.projects_with_ones  # the null space the variant removes
    noise = None
    if kind in ("efficient+null-noise", "colspace-noise"):
        noise = {}
        for n in sorted(set(length.tolist()) - {0}):
            chosen = np.flatnonzero(length == n)
            noise[n] = (chosen, _random_blocks(example_indices[chosen], layers, heads, n, seed, intervention.name))
    extra = (size + 2) if causal else 2
    shared = shared if shared is not None else SharedBases(limit=0)
    chunks = _chunks(attention, value, w_out, length, efficient if intervention.needs_efficient else None, extra)
    for chunk_number, chunk in enumerate(chunks):
        n = chunk.attention.shape[-1]
        if kind == "minimality":
            block = _truncated_projection(
                chunk.attention,
                chunk.matrix,
                hidden_size,
                intervention.removed_directions,
                causal,
                shared,
                chunk_number,
            )
        else:
            chosen, blocks = noise[n]
            random = blocks[np.searchsorted(chosen, chunk.example), chunk.layer, chunk.head]  # (k, n, n)
            removed_norm = torch.linalg.matrix_norm(chunk.attention - chunk.efficient)
            chunk_bands = [bands[layer].within(n) for layer in chunk.layer.tolist()]
            if kind == "colspace-noise":
                random, inside = _noise_in_bands(
                    random,
                    chunk.matrix,
                    hidden_size,
                    causal,
                    chunk_bands,
                    (
                        lambda rows: project_rows(
                            rows,
                            shared.get(
                                "basis of T",
                                chunk_number,
                                chunk.matrix,
                                lambda: column_space_basis(chunk.matrix, hidden_size),
                            )[0],
                        )
                    ),
                )
                block = chunk.attention + _scaled_to(inside, removed_norm)
            else:
                space = with_ones_column(chunk.matrix) if with_ones else chunk.matrix
                space_hidden = hidden_size + 1 if with_ones else hidden_size
                random, inside = _noise_in_bands(
                    random,
                    space,
                    space_hidden,
                    causal,
                    chunk_bands,
                    (
                        lambda rows: project_rows(
                            rows,
                            shared.get(
                                "basis of [T|1]" if with_ones else "basis of T",
                                chunk_number,
                                chunk.matrix,
                                lambda: column_space_basis(space, space_hidden),
                            )[0],
                        )
                    ),
                )
                block = chunk.efficient + _scaled_to(random - inside, removed_norm)
        result[chunk.example, chunk.layer, chunk.head, :n, :n] = block.numpy()
    return result
