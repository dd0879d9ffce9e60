"""analysis.splits: the stratified permutation split, the growth-stable keyed split and limit (no model, no
Prefect)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from analysis.example_identities import keyed_share
from analysis.splits import (
    SPLITS,
    group_identities_of,
    select_split,
    split_indices,
    split_rows,
    stable_split_indices,
)


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


# --------------------------------------------------------------------------------------
# growth-stable: keyed share, stable split, stable limit


def identities_of(n: int, start: int = 0) -> np.ndarray:
    """``uint8 [n, 16]`` distinct identities (sha256 of the row number, like analysis.corpora's content hashes)."""
    return np.array(
        [np.frombuffer(hashlib.sha256(str(i).encode()).digest()[:16], dtype=np.uint8) for i in range(start, start + n)],
        dtype=np.uint8,
    ).reshape(n, 16)


def test_keyed_share_is_the_documented_blake2b_draw():
    identities = identities_of(5)
    share = keyed_share(identities, seed=3, purpose="split")
    key = b"effattn:split:3"
    expected = [
        int.from_bytes(hashlib.blake2b(row.tobytes(), key=key, digest_size=8).digest(), "big") / 2**64
        for row in identities
    ]
    assert share.dtype == np.float64 and share.shape == (5,)
    np.testing.assert_allclose(share, expected, rtol=0, atol=2**-53)
    assert np.all((share >= 0) & (share < 1))
    # The draw of a row depends on that row alone: the same in a longer array, at another position.
    np.testing.assert_array_equal(keyed_share(identities_of(50)[::-1], 3, "split")[-5:][::-1], share)


def test_keyed_share_differs_by_purpose_and_seed():
    identities = identities_of(1000)
    split = keyed_share(identities, 0, "split")
    assert np.corrcoef(split, keyed_share(identities, 0, "explain"))[0, 1] < 0.1
    assert np.corrcoef(split, keyed_share(identities, 1, "split"))[0, 1] < 0.1
    with pytest.raises(ValueError, match=r"identities must be uint8 \[n_examples, 16\]"):
        keyed_share(identities.astype(np.int64), 0, "split")
    with pytest.raises(ValueError, match="use a short purpose name"):
        keyed_share(identities, 0, "x" * 80)


def test_stable_split_keeps_every_earlier_example_on_its_side_as_the_corpus_grows():
    before = stable_split_indices(identities_of(200), held_out_fraction=0.2, seed=0)
    after = stable_split_indices(identities_of(250), held_out_fraction=0.2, seed=0)  # 50 new rows appended
    for part in after.values():
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    np.testing.assert_array_equal(after["held_out"][after["held_out"] < 200], before["held_out"])
    np.testing.assert_array_equal(after["train"][after["train"] < 200], before["train"])
    assert len(after["held_out"]) > len(before["held_out"])  # some new rows are held out too
    np.testing.assert_array_equal(np.sort(np.concatenate(list(after.values()))), np.arange(250))
    # The permutation split, by contrast, moves earlier examples.
    permuted = [split_indices(n, np.zeros(n, dtype=np.int64))["held_out"] for n in (200, 250)]
    assert not np.array_equal(permuted[1][permuted[1] < 200], permuted[0])


def test_stable_split_keeps_groups_together_as_the_corpus_grows():
    groups = np.repeat(np.arange(60), 5)  # 60 documents of 5 passages; 12 documents more later
    grown_groups = np.concatenate([groups, np.repeat(np.arange(60, 72), 5)])
    identities, grown = identities_of(300), identities_of(360)
    before = stable_split_indices(identities, 0.2, 0, group_identities=group_identities_of(identities, groups))
    after = stable_split_indices(grown, 0.2, 0, group_identities=group_identities_of(grown, grown_groups))
    for split, member_groups in ((before, groups), (after, grown_groups)):
        assert not set(member_groups[split["held_out"]]) & set(member_groups[split["train"]])
    np.testing.assert_array_equal(after["held_out"][after["held_out"] < 300], before["held_out"])
    assert 0 < len(set(groups[before["held_out"]])) < 60
    # split_rows derives the group identities itself.
    derived = split_rows(300, np.zeros(300, dtype=np.int64), 0.2, 0, groups=groups, identities=identities)
    np.testing.assert_array_equal(derived["held_out"], before["held_out"])


def test_stable_split_share_is_near_the_fraction():
    n, fraction = 10_000, 0.2
    held = len(stable_split_indices(identities_of(n), held_out_fraction=fraction, seed=0)["held_out"])
    sd = (n * fraction * (1 - fraction)) ** 0.5  # binomial: 40
    assert abs(held - n * fraction) < 4 * sd


def test_stable_split_depends_on_the_seed():
    identities = identities_of(500)
    first = stable_split_indices(identities, seed=0)["held_out"]
    np.testing.assert_array_equal(stable_split_indices(identities.copy(), seed=0)["held_out"], first)
    assert not np.array_equal(stable_split_indices(identities, seed=1)["held_out"], first)
    with pytest.raises(ValueError, match="held_out_fraction must be strictly between 0 and 1"):
        stable_split_indices(identities, held_out_fraction=1.0)


def test_select_split_with_identities_is_the_stable_split():
    identities, labels = identities_of(100), labels_of(60, 40)
    stable = stable_split_indices(identities, 0.25, 4)
    for name in ("train", "held_out"):
        np.testing.assert_array_equal(select_split(100, labels, name, 4, 0.25, identities=identities), stable[name])
    np.testing.assert_array_equal(select_split(100, labels, "all", 4, identities=identities), np.arange(100))
    # Without identities: the permutation split, unchanged.
    np.testing.assert_array_equal(
        select_split(100, labels, "held_out", 4, 0.25), split_indices(100, labels, 0.25, 4)["held_out"]
    )
    with pytest.raises(ValueError, match=r"identities must have one row per example \(100\), got 99 rows"):
        select_split(100, labels, "train", 0, identities=identities[:99])
