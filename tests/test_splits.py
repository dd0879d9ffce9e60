"""analysis.splits: fixed, stratified, seeded train / held-out splits (no model, no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.splits import SPLITS, select_split, split_indices


def labels_of(*counts: int, unknown: int = 0) -> np.ndarray:
    """Labels 0..k-1 with the given counts plus `unknown` -1s, interleaved deterministically."""
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)] + [np.full(unknown, -1)])
    return np.random.default_rng(123).permutation(labels).astype(np.int64)


def test_split_is_sorted_disjoint_and_covers_everything():
    labels = labels_of(50, 30, 7, unknown=13)
    split = split_indices(len(labels), labels, held_out_fraction=0.2, seed=0)
    assert set(split) == {"train", "held_out"}
    for part in split.values():
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates
    assert not set(split["train"]) & set(split["held_out"])
    np.testing.assert_array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(len(labels)))
    assert len(split["held_out"]) == round(0.2 * len(labels))


def test_split_is_stratified_including_unknown_labels():
    labels = labels_of(500, 300, 70, unknown=130)
    held = labels[split_indices(len(labels), labels, held_out_fraction=0.25, seed=3)["held_out"]]
    for label, count in zip((0, 1, 2, -1), (500, 300, 70, 130)):
        assert abs(np.sum(held == label) - 0.25 * count) <= 1, label


def test_split_is_deterministic_and_depends_on_the_seed():
    labels = labels_of(40, 40)
    first = split_indices(80, labels, seed=7)
    again = split_indices(80, labels.copy(), seed=7)
    other = split_indices(80, labels, seed=8)
    for name in ("train", "held_out"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["held_out"], other["held_out"])


def test_split_ids_are_stable_across_versions_and_machines():
    """Pinned: a change here silently reshuffles every cached head's held-out set."""
    alternating = np.arange(20) % 2
    assert split_indices(20, alternating)["held_out"].tolist() == [5, 8, 12, 19]
    assert split_indices(20, alternating, seed=1)["held_out"].tolist() == [1, 3, 8, 16]
    mixed = np.array([0, 0, 0, 0, 0, 0, 1, 1, -1, -1])
    assert split_indices(10, mixed, held_out_fraction=0.3)["held_out"].tolist() == [2, 3, 8]


def test_small_corpora_keep_both_splits_non_empty():
    assert split_indices(2, np.array([0, 1]), held_out_fraction=0.01)["held_out"].size == 1
    assert split_indices(3, np.array([0, 1, 1]), held_out_fraction=0.99)["train"].size == 1
    one = split_indices(1, np.array([0]))
    assert one["train"].tolist() == [0] and one["held_out"].size == 0


def test_select_split():
    labels = labels_of(12, 8)
    assert SPLITS == ("train", "held_out", "all")
    split = split_indices(20, labels, seed=2)
    np.testing.assert_array_equal(select_split(20, labels, "train", 2), split["train"])
    np.testing.assert_array_equal(select_split(20, labels, "held_out", 2), split["held_out"])
    np.testing.assert_array_equal(select_split(20, labels, "all", 2), np.arange(20))


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_fraction_outside_the_open_unit_interval_is_an_error(fraction):
    with pytest.raises(ValueError, match="held_out_fraction must be strictly between 0 and 1"):
        split_indices(10, np.zeros(10, dtype=np.int64), held_out_fraction=fraction)


def test_unknown_split_and_bad_labels_are_errors():
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="unknown split 'test': expected one of train, held_out, all"):
        select_split(10, labels, "test", 0)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        split_indices(10, np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="labels must be integers"):
        split_indices(10, np.zeros(10))


def test_groups_are_never_split_and_split_by_label():
    labels = np.repeat([0, 0, 1, 1, 0, 1, 0, 1, 0, 1], 3)  # 10 groups of 3 examples
    groups = np.repeat(np.arange(10), 3)
    split = split_indices(len(labels), labels, held_out_fraction=0.2, seed=0, groups=groups)
    held_groups, train_groups = set(groups[split["held_out"]]), set(groups[split["train"]])
    assert not held_groups & train_groups and len(held_groups) == 2
    assert sorted(labels[split["held_out"]][::3].tolist()) == [0, 1]  # one group of each label
    assert sorted(np.concatenate([split["train"], split["held_out"]]).tolist()) == list(range(30))
    np.testing.assert_array_equal(select_split(30, labels, "held_out", 0, groups=groups), split["held_out"])
    with pytest.raises(ValueError, match=r"groups must have shape \(30,\) like the labels, got \(29,\)"):
        split_indices(30, labels, groups=groups[:29])
