"""The efficient-attention variants: one record each, the only place a variant is declared.

Everything that treats variants differently reads these records: the computation (analysis.efficient_attention),
the noise interventions (analysis.interventions: which null space), the efficient stage's scheduling
(tasks/efficient.py: the cost class), the arrays' descriptions (storage_schemas/efficient_store.py), `effattn
verify` (storage_schemas/verification.py: the guaranteed invariants), the report (order and colours) and the CLI.
This module imports no torch (storage_schemas reads it): the built-in compute functions import their kernels
(analysis.projections, analysis.simplex_solver, which import no registry) when they are first called.

Adding a variant: one `Variant` record in REGISTRY below, plus its tests (or `register_variant(Variant(...))` at
run time, e.g. in a notebook). A variant registered at run time exists in this process only: Dask workers in other
processes must register it too (import the module that does, e.g. with a worker plugin), else the efficient
stage's workers refuse it as unknown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for the annotations
    import torch

    from analysis.projections import VariantInputs

# Cost classes, for scheduling: a closed-form variant costs about the same per shard (reading and writing
# dominate) and is computed a whole shard at a time; an iterative one's solver cost grows steeply with the length,
# so its shards are cut into one piece per layer that spread over the workers.
CLOSED_FORM = "closed-form"
ITERATIVE = "iterative"
COST_CLASSES = (CLOSED_FORM, ITERATIVE)

# compute(inputs, with_ones) -> (efficient (n, L, L) float64, {statistic: (n,)}), inputs an
# analysis.projections.VariantInputs (a chunk of n equal-length real blocks and their shared bases),
# with_ones the record's `projects_with_ones`. The statistics override the solver-free diagnostics of the same
# name (e.g. the simplex solver's iterations); closed forms return {}.
ComputeFunction = Callable[["VariantInputs", bool], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def _no_extra_temporaries(columns: int, causal: bool) -> int:
    return 0


@dataclass(frozen=True)
class Variant:
    """One efficient-attention variant.

    name: its name in stores (`efficient/<name>`), interventions (`null:<name>`) and on the command line.
    compute: see ComputeFunction.
    projects_with_ones: whether it keeps the output against [T|1] (a column of ones appended to T) rather than T:
        its null space, `null_dim` and the noise of `efficient+null-noise:<name>` live in the left null space of
        [T|1].
    keeps_output, keeps_row_sums, non_negative: the invariants it guarantees (A_eff·T = A·T; every row sums like
        A's row, to 1 for probabilities; no negative entry), checked by `effattn verify`. A non-negative variant
        needs non-negative attention (A itself must be feasible).
    cost: CLOSED_FORM or ITERATIVE (how the efficient stage cuts a shard).
    description: one line, stored as the `description` attribute of `efficient/<name>`.
    colour: its colour in every figure of the report.
    extra_temporaries: (columns m of X, causal) -> how many more L×L float64 temporaries per matrix it holds than
        the projections (the chunk size of the batched computation shrinks by that).
    default_max_length: stores of more positions than this leave the variant out of the default variant list
        (`default_variants`; None: always in it): its cost grows too steeply with the length for a default run.
        Named in --variants, it is computed at any length.
    """

    name: str
    compute: ComputeFunction
    projects_with_ones: bool
    keeps_output: bool
    keeps_row_sums: bool
    non_negative: bool
    cost: str
    description: str
    colour: str
    extra_temporaries: Callable[[int, bool], int] = _no_extra_temporaries
    default_max_length: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(character in self.name for character in ":/,= "):
            raise ValueError(
                f"variant name {self.name!r} must be non-empty without ':', '/', ',', '=' or spaces "
                "(it names arrays, interventions and command-line lists)"
            )
        if self.cost not in COST_CLASSES:
            raise ValueError(f"variant {self.name!r}: cost {self.cost!r} must be one of {COST_CLASSES}")
        if self.default_max_length is not None and (
            not isinstance(self.default_max_length, int) or self.default_max_length < 1
        ):
            raise ValueError(
                f"variant {self.name!r}: default_max_length must be a positive number of positions or "
                f"None, got {self.default_max_length!r}"
            )
        if not callable(self.compute):
            raise ValueError(
                f"variant {self.name!r}: compute must be a function (inputs, with_ones) -> (efficient, statistics)"
            )

    @property
    def guarantees(self) -> str:
        """What its rows are, in words (the report's caption)."""
        if self.keeps_row_sums and self.non_negative:
            return f"{self.name} rows are probability distributions"
        if self.keeps_row_sums:
            return f"{self.name} rows sum to 1 but can be negative"
        if self.non_negative:
            return f"{self.name} E is non-negative but its rows need not sum to 1"
        return f"{self.name} E can be negative and its rows need not sum to 1"


class VariantRegistry:
    """The registered variants, in registration order (the order of stores, figures and default runs).

    `VARIANTS` is the live sequence of their names: `name in VARIANTS`, `list(VARIANTS)` and default arguments
    `variants=VARIANTS` read the variants registered when they are used, also where a module bound the name at
    import time. `variant_record(name)` is a name's record.
    """

    def __init__(self, variants: tuple[Variant, ...] = ()) -> None:
        self._records: dict[str, Variant] = {}
        self.names = VariantNames(self._records)
        for record in variants:
            self.register(record)

    def __getitem__(self, name: str) -> Variant:
        try:
            return self._records[name]
        except KeyError:
            raise KeyError(
                f"unknown efficient-attention variant {name!r}: choose from {list(self._records)}, "
                "or register it with analysis.variants.register_variant(Variant(...))"
            ) from None

    def records(self) -> tuple[Variant, ...]:
        return tuple(self._records.values())

    def register(self, record: Variant) -> Variant:
        if record.name in self._records:
            raise ValueError(f"a variant named {record.name!r} is registered already: choose another name")
        self._records[record.name] = record
        return record

    def unregister(self, name: str) -> Variant:
        return self._records.pop(self[name].name)


class VariantNames(Sequence[str]):
    """A live view of the registered variants' names (a read-only sequence; equal to any sequence of the same
    names in the same order)."""

    def __init__(self, records: dict[str, Variant]) -> None:
        self._records = records

    def __getitem__(self, index):
        return tuple(self._records)[index]

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._records))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self._records))


def _orthogonal_projection(inputs: VariantInputs, with_ones: bool) -> tuple[Any, dict]:
    from analysis.projections import orthogonal_projection

    return orthogonal_projection(inputs, with_ones)


def _simplex_projection(inputs: VariantInputs, with_ones: bool) -> tuple[Any, dict]:
    from analysis.simplex_solver import simplex_projection

    return simplex_projection(inputs, with_ones)


REGISTRY = VariantRegistry(
    (
        Variant(
            name="effective",
            compute=_orthogonal_projection,
            projects_with_ones=False,
            keeps_output=True,
            keeps_row_sums=False,
            non_negative=False,
            cost=CLOSED_FORM,
            description="A P_T: projection of each attention row on col(T), T = V W_O^h (Brunner's effective "
            "attention); keeps A T, rows need not sum to 1 and entries can be negative",
            colour="#1f77b4",
        ),
        Variant(
            name="stochastic",
            compute=_orthogonal_projection,
            projects_with_ones=True,
            keeps_output=True,
            keeps_row_sums=True,
            non_negative=False,
            cost=CLOSED_FORM,
            description="A P_[T|1]: projection on col([T|1]); keeps A T and every row sums to 1; entries can be "
            "negative",
            colour="#ff7f0e",
        ),
        Variant(
            name="simplex",
            compute=_simplex_projection,
            projects_with_ones=True,
            keeps_output=True,
            keeps_row_sums=True,
            non_negative=True,
            cost=ITERATIVE,
            description="per row the minimum-norm b with b T = a T, sum(b) = 1, b >= 0: a probability distribution "
            "that "
            "keeps the output (dual semismooth Newton; rows are feasible even where the solver did not "
            "converge)",
            colour="#2ca02c",
            # causal: the prefix bases of every row, (L - c) x L x c per matrix, and their QR
            extra_temporaries=lambda columns, causal: columns + 2 if causal else 0,
            # its solver costs 7-56x the closed forms per example, ~20 CPU s per example of 512 tokens: hours for a
            # corpus of long texts (benchmarks/simplex_cost.py; README, "Efficient attention at length")
            default_max_length=256,
        ),
    )
)

# The names of the registered variants (a live sequence, see VariantRegistry).
VARIANTS: Sequence[str] = REGISTRY.names


def variant_record(name: str) -> Variant:
    """The record of the variant called `name` (a KeyError names the registered ones)."""
    return REGISTRY[name]


def _in_default_run(record: Variant, positions: int) -> bool:
    """Whether `record`'s `default_max_length` allows a store of `positions` positions."""
    return record.default_max_length is None or positions <= record.default_max_length


def default_variants(positions: int) -> list[str]:
    """The variants computed when none are named, for a store of `positions` positions: every registered one
    whose `default_max_length` allows that length, in registration order."""
    return [record.name for record in REGISTRY.records() if _in_default_run(record, positions)]


def left_out_by_default(positions: int) -> str | None:
    """Why `default_variants(positions)` leaves variants out, in one sentence that says how to compute them
    anyway; None when it leaves none out."""
    left_out = [record for record in REGISTRY.records() if not _in_default_run(record, positions)]
    if not left_out:
        return None
    names = ", ".join(f"{record.name} (up to {record.default_max_length})" for record in left_out)
    return (
        f"the store holds {positions} positions, more than the default lengths of {names}: not computed by "
        f"default, because their cost grows steeply with the length; name them in --variants to compute them"
    )


def variant_records() -> tuple[Variant, ...]:
    """Every registered variant's record, in order."""
    return REGISTRY.records()


def unknown_variants(names) -> list[str]:
    """The names among `names` that name no registered variant."""
    return [name for name in names if name not in VARIANTS]


def require_known_variants(names, flag: str = "--variants") -> None:
    """Refuse (ValueError naming `flag`) a list of variant names with an unknown or no name in it."""
    unknown = unknown_variants(names)
    if unknown or not names:
        raise ValueError(
            f"{flag} {','.join(names)}: unknown efficient-attention variants {unknown or list(names)}: "
            f"choose from {','.join(VARIANTS)} (comma-separated)"
        )


def register_variant(record: Variant) -> Variant:
    """Add a variant: from now on this process computes, verifies, injects and reports it (see the module doc)."""
    return REGISTRY.register(record)


def unregister_variant(name: str) -> Variant:
    return REGISTRY.unregister(name)


@contextlib.contextmanager
def registered_variant(record: Variant) -> Iterator[Variant]:
    """`record` registered for the duration of a `with` block (tests, experiments)."""
    register_variant(record)
    try:
        yield record
    finally:
        unregister_variant(record.name)
