"""Fixed train / held-out splits of a corpus, the same on every machine: two methods, one entry point.

Which method a corpus gets (:func:`split_rows` / :func:`select_split` choose by whether example identities are
given; training and extraction both go through them, so they agree on which example is held out):

- Bundled corpora (never grow) keep the permutation split, :func:`split_indices`: stratified by label, exactly
  ``round(held_out_fraction * n)`` held out, a function of (number of examples, labels, fraction, seed). One new
  row would reshuffle which earlier rows are held out, so it is not used for corpora that grow.
- User files and folders (``Corpus.growable``) use the keyed split, :func:`stable_split_indices`: each example's
  side is decided by a keyed hash of its content identity (analysis.corpora.example_identities) alone, so
  appending examples never moves an earlier one. It is not stratified and the held-out count is binomial around
  ``held_out_fraction * n`` (standard deviation ``sqrt(n * f * (1 - f))``). The keyed hash,
  analysis.example_identities.keyed_share, is the one every per-example choice uses, so growth never changes an
  earlier example's draw; the growth-stable ``--limit`` is analysis.extraction.rows_to_append.

Stratification (:func:`split_indices`): every label value (``-1``, unknown, counts as one more group) gives the
held-out split its share of that group; the shares are allocated by largest remainder so the held-out split has
exactly ``round(held_out_fraction * n_examples)`` examples (at least one and at most ``n_examples - 1`` when there
are two or more examples). Within a group, which examples are held out is decided by
``numpy.random.default_rng(seed).permutation``, groups taken in increasing label order.
"""

from __future__ import annotations

import numpy as np

from analysis.example_identities import check_identities, keyed_share

__all__ = [
    "SPLITS",
    "STABLE_SPLIT_METHOD",
    "group_identities_of",
    "select_split",
    "split_indices",
    "split_rows",
    "stable_split_indices",
]

SPLITS: tuple[str, ...] = ("train", "held_out", "all")
# What a model card or store records as the split method of a growable corpus.
STABLE_SPLIT_METHOD = (
    "analysis.splits.stable_split_indices (keyed blake2b share of each example identity, purpose 'split', "
    "below held_out_fraction is held out; not stratified; whole groups when the corpus has groups)"
)


def _check_fraction(held_out_fraction: float) -> None:
    if not (isinstance(held_out_fraction, (int, float)) and 0.0 < float(held_out_fraction) < 1.0):
        raise ValueError(
            f"held_out_fraction must be strictly between 0 and 1, got {held_out_fraction!r} "
            "(e.g. 0.2 holds out a fifth of the examples)"
        )


def _check_labels(n_examples: int, labels: np.ndarray) -> np.ndarray:
    if int(n_examples) != n_examples or n_examples < 1:
        raise ValueError(f"n_examples must be a positive integer, got {n_examples!r}")
    labels = np.asarray(labels)
    if labels.shape != (n_examples,):
        raise ValueError(
            f"labels must have shape ({n_examples},) (one label per example, -1 for unknown), got {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (class ids, -1 for unknown), got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def split_indices(
    n_examples: int,
    labels: np.ndarray,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The train and held-out example indices of a corpus.

    Args:
        n_examples: corpus size (>= 1).
        labels: ``int [n_examples]``, class ids, ``-1`` for unknown (one more stratum).
        held_out_fraction: share of examples held out, strictly between 0 and 1.
        seed: seed of ``numpy.random.default_rng``.
        groups: ``int [n_examples]`` or None. With groups, whole groups (e.g. the passages of one speech) are
            split: the groups are stratified by the label of their first example and `held_out_fraction` is
            the share of groups held out, so no group straddles the two splits.

    Returns:
        ``{"train": int64 [n_train], "held_out": int64 [n_held_out]}``: sorted, disjoint, together
        ``0 .. n_examples - 1``. With one example, it is in "train".

    Raises:
        ValueError: a fraction outside (0, 1), labels of the wrong shape or dtype, n_examples < 1.
    """
    _check_fraction(held_out_fraction)
    labels = _check_labels(n_examples, labels)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n_examples,):
            raise ValueError(f"groups must have shape ({n_examples},) like the labels, got {groups.shape}")
        group_ids, first_member, member_group = np.unique(groups, return_index=True, return_inverse=True)
        by_group = split_indices(len(group_ids), labels[first_member], held_out_fraction, seed)
        held = np.isin(member_group, by_group["held_out"])
        return {"train": np.flatnonzero(~held).astype(np.int64), "held_out": np.flatnonzero(held).astype(np.int64)}
    n_held = int(round(held_out_fraction * n_examples))
    if n_examples >= 2:
        n_held = min(max(n_held, 1), n_examples - 1)
    else:
        n_held = 0

    groups = np.unique(labels)  # sorted: -1 first
    members = [np.flatnonzero(labels == group) for group in groups]
    # Largest-remainder allocation of n_held over the groups, proportional to their sizes.
    exact = np.array([len(m) * n_held / n_examples for m in members])
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    # Ties are broken by group order (a stable sort on -remainder).
    for position in np.argsort(-remainder, kind="stable")[: n_held - int(quota.sum())]:
        quota[position] += 1

    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for group_members, group_quota in zip(members, quota):
        held.append(rng.permutation(group_members)[:group_quota])
    held_out = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
    is_held = np.zeros(n_examples, dtype=bool)
    is_held[held_out] = True
    return {"train": np.flatnonzero(~is_held).astype(np.int64), "held_out": held_out}


def select_split(
    n_examples: int,
    labels: np.ndarray,
    split: str,
    seed: int = 0,
    held_out_fraction: float = 0.2,
    groups: np.ndarray | None = None,
    identities: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted example indices of one split: "train", "held_out" (see :func:`split_rows`: the permutation split,
    or with `identities` ``uint8 [n_examples, IDENTITY_BYTES]`` the growth-stable one) or "all" (arange).

    Raises:
        ValueError: an unknown split name (the message lists :data:`SPLITS`), or the errors of split_rows.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "all":
        _check_fraction(held_out_fraction)
        _check_labels(n_examples, labels)
        return np.arange(n_examples, dtype=np.int64)
    return split_rows(n_examples, labels, held_out_fraction, seed, groups=groups, identities=identities)[split]


# --------------------------------------------------------------------------------------
# growth-stable choices: keyed by example identity


def stable_split_indices(
    identities: np.ndarray,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    group_identities: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The growth-stable train and held-out indices: example i is held out iff its keyed share is below the fraction.

    ``keyed_share(identities, seed, "split")[i] < held_out_fraction`` decides example i alone, so a corpus that
    grows keeps every earlier example on its side (and an example keeps its side wherever it moves in the file).
    Not stratified: the held-out count is binomial around ``held_out_fraction * n`` (it may even be 0 or n for a
    tiny corpus), unlike :func:`split_indices`, which bundled corpora keep.

    Args:
        identities: ``uint8 [n_examples, IDENTITY_BYTES]`` (analysis.corpora.example_identities).
        held_out_fraction: strictly between 0 and 1.
        seed: part of the hash key: another seed, another split.
        group_identities: ``uint8 [n_examples, IDENTITY_BYTES]`` or None: the identity of each example's group
            (e.g. of its document); the share of the group's identity decides, so a group stays on one side.

    Returns:
        ``{"train": int64 [n_train], "held_out": int64 [n_held_out]}``: sorted, disjoint, together ``0 .. n - 1``.
    """
    _check_fraction(held_out_fraction)
    identities = check_identities(identities)
    deciding = identities
    if group_identities is not None:
        deciding = check_identities(group_identities, "group_identities")
        if deciding.shape != identities.shape:
            raise ValueError(
                f"group_identities must have one row per example like identities {identities.shape}, got "
                f"{deciding.shape}"
            )
    held = keyed_share(deciding, seed, "split") < float(held_out_fraction)
    return {"train": np.flatnonzero(~held).astype(np.int64), "held_out": np.flatnonzero(held).astype(np.int64)}


def group_identities_of(identities: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``uint8 [n, IDENTITY_BYTES]``: for each example, the identity of the first example of its group (in corpus
    order). Growth-stable as long as a group only gains later members."""
    identities = check_identities(identities)
    groups = np.asarray(groups)
    if groups.shape != (len(identities),):
        raise ValueError(f"groups must have shape ({len(identities)},) like the identities, got {groups.shape}")
    _, first_member, member_group = np.unique(groups, return_index=True, return_inverse=True)
    return identities[first_member][member_group]


def split_rows(
    n_examples: int,
    labels: np.ndarray,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    groups: np.ndarray | None = None,
    identities: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The train and held-out rows of a corpus: the entry point training and extraction both use.

    Without `identities`: :func:`split_indices` (the permutation split of bundled corpora). With `identities`
    (``uint8 [n_examples, IDENTITY_BYTES]``, for a growable corpus): :func:`stable_split_indices`, groups decided
    by the identity of their first example (:func:`group_identities_of`); `labels` are then only checked.
    """
    if identities is None:
        return split_indices(n_examples, labels, held_out_fraction=held_out_fraction, seed=seed, groups=groups)
    _check_labels(n_examples, labels)
    identities = check_identities(identities)
    if len(identities) != n_examples:
        raise ValueError(f"identities must have one row per example ({n_examples}), got {len(identities)} rows")
    group_identities = None if groups is None else group_identities_of(identities, groups)
    return stable_split_indices(identities, held_out_fraction, seed, group_identities=group_identities)
