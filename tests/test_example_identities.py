"""analysis.example_identities: identities of (text, label name) and the keyed per-identity draw."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.example_identities import identity_digests, identity_hex, keyed_share, seed_keys, share_for_count


@pytest.mark.unit
def test_identities_cover_text_and_label_name_not_the_row():
    a = identity_digests(["same", "same", "other"], ["pos", "neg", "pos"])
    b = identity_digests(["other", "same"], ["pos", "pos"])
    assert bytes(a[0]) == bytes(b[1]) and bytes(a[2]) == bytes(b[0]) and bytes(a[0]) != bytes(a[1])
    assert identity_hex(a[0]) == bytes(a[0]).hex() and len(identity_hex(a[0])) == 32


@pytest.mark.unit
def test_keyed_share_is_per_identity_and_differs_by_purpose_and_seed():
    identities = identity_digests([f"text {i}" for i in range(4000)], [None] * 4000)
    shares = keyed_share(identities, 0, "split")
    np.testing.assert_array_equal(keyed_share(identities[100:200], 0, "split"), shares[100:200])
    assert 0.0 <= shares.min() and shares.max() < 1.0 and abs((shares < 0.2).mean() - 0.2) < 0.03
    assert not np.array_equal(shares, keyed_share(identities, 1, "split"))
    assert not np.array_equal(shares, keyed_share(identities, 0, "scope"))


@pytest.mark.unit
def test_the_share_for_a_count_picks_exactly_that_many_now_and_a_like_share_of_later_examples():
    identities = identity_digests([f"text {i}" for i in range(400)], ["pos"] * 400)
    first = keyed_share(identities[:100], 0, "explain")
    share = share_for_count(first, 10)
    assert (first < share).sum() == 10
    assert np.sort(first)[9] < share < np.sort(first)[10]
    later = keyed_share(identities[100:], 0, "explain")  # growth: the same share, a draw that never changes
    assert 0.05 < (later < share).mean() < 0.2  # about 10 %
    assert share_for_count(first, None) == share_for_count(first, 100) == share_for_count(first, 500) == 1.0
    assert share_for_count(first, 0) == 0.0 and not (first < 0.0).any()


@pytest.mark.unit
def test_seed_keys_follow_the_identity_not_the_row():
    identities = identity_digests(["a", "b", "c"], ["pos", "neg", None])
    keys = seed_keys(identities)
    assert keys.dtype == np.int64 and (keys >= 0).all() and len(set(keys.tolist())) == 3
    np.testing.assert_array_equal(seed_keys(identities[::-1]), keys[::-1])
    assert int(keys[0]) == int.from_bytes(bytes(identities[0, :8]), "big") >> 1
