"""analysis.key_bands: the band of visible keys, read from an observed mask, stored and read back."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.key_bands import (
    CAUSAL_BAND,
    FULL_BAND,
    KeyBand,
    band_of_visible,
    default_band,
    outside_band_magnitude,
    store_key_bands,
)


def test_visible_keys_follow_the_band():
    # mistral's window 4: i - 4 < j <= i; a ModernBERT local layer: |i - j| <= 2
    np.testing.assert_array_equal(
        KeyBand(3, 0).visible(6), np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -4)
    )
    offset = np.subtract.outer(np.arange(6), np.arange(6))
    np.testing.assert_array_equal(KeyBand(2, 2).visible(6), np.abs(offset) <= 2)
    assert FULL_BAND.visible(5).all() and np.array_equal(CAUSAL_BAND.visible(5), np.tril(np.ones((5, 5), bool)))
    assert KeyBand(3, 0).window(1, 6) == (0, 2) and KeyBand(3, 0).window(5, 6) == (2, 6)
    assert KeyBand(2, 2).window(5, 6) == (3, 6)


@pytest.mark.parametrize("band", [KeyBand(3, 0), KeyBand(2, 2), KeyBand(0, 0), KeyBand(1, 4), CAUSAL_BAND, FULL_BAND])
def test_an_observed_band_is_read_back_exactly(band):
    assert band_of_visible(band.visible(9)) == band


def test_a_reach_of_the_whole_probe_is_unbounded():
    # a window as long as the probe (or longer) hides nothing from any length the store holds
    assert band_of_visible(KeyBand(8, 0).visible(9)) == CAUSAL_BAND
    assert KeyBand(8, 8).within(9) == FULL_BAND and KeyBand(3, 0).within(9) == KeyBand(3, 0)
    assert KeyBand(3, 0).within(4) == CAUSAL_BAND


def test_a_mask_that_is_not_a_band_is_refused():
    chunked = np.kron(np.eye(3, dtype=bool), np.ones((3, 3), bool))  # chunked attention: blocks on the diagonal
    with pytest.raises(ValueError, match="not exactly a band around the diagonal"):
        band_of_visible(chunked)
    holed = KeyBand(3, 0).visible(6)
    holed[5, 4] = False
    with pytest.raises(ValueError, match="not exactly a band"):
        band_of_visible(holed)
    with pytest.raises(ValueError, match="some query sees no key"):
        band_of_visible(np.zeros((3, 3), bool))


def test_stored_bands_and_the_rule_of_stores_written_before_them():
    stored = {"causal": True, "key_bands": [{"left": 3, "right": 0}, {"left": None, "right": 0}]}
    assert store_key_bands(stored, 2) == (KeyBand(3, 0), CAUSAL_BAND)
    assert [band.to_attribute() for band in store_key_bands(stored, 2)] == stored["key_bands"]
    # no key_bands: the prefix for decoders, every key for encoders (today's rule, exact without windows)
    assert store_key_bands({"causal": True}, 3) == (CAUSAL_BAND,) * 3 == (default_band(True),) * 3
    assert store_key_bands({"causal": False}, 2) == (FULL_BAND, FULL_BAND)
    with pytest.raises(ValueError, match="model.key_bands has 2 entries for 3 layers"):
        store_key_bands(stored, 3)
    with pytest.raises(ValueError, match="a stored key band must be"):
        KeyBand.from_attribute({"left": 3})
    with pytest.raises(ValueError, match="non-negative integer or None"):
        KeyBand(-1, 0)


def test_outside_band_magnitude_finds_the_weight_a_query_may_not_see():
    matrices = np.zeros((2, 2, 1, 6, 6))
    matrices[:, 0, 0] = KeyBand(3, 0).visible(6) / 4.0
    matrices[:, 1, 0] = 1.0 / 6  # full attention in layer 1
    bands = (KeyBand(3, 0), FULL_BAND)
    assert not outside_band_magnitude(matrices, np.array([6, 6]), bands).any()
    matrices[1, 0, 0, 5, 0] = 0.125  # query 5 may not see key 0 through a window of 4
    found = outside_band_magnitude(matrices, np.array([6, 6]), bands)
    assert found[1, 0, 0] == 0.125 and found.sum() == 0.125
    with pytest.raises(ValueError, match="1 key bands for 2 layers"):
        outside_band_magnitude(matrices, np.array([6, 6]), bands[:1])


def test_the_bands_of_a_stores_selected_layers():
    stored = {
        "causal": True,
        "layers": 3,
        "key_bands": [KeyBand(3, 0).to_attribute(), CAUSAL_BAND.to_attribute(), KeyBand(1, 0).to_attribute()],
    }
    assert store_key_bands(stored, (0, 2)) == (KeyBand(3, 0), KeyBand(1, 0))
    assert store_key_bands({"causal": False}, (1, 4)) == (FULL_BAND, FULL_BAND)  # no bands: the default rule
    with pytest.raises(ValueError, match="model.key_bands has 3 entries, but the store's selection names layer 3"):
        store_key_bands(stored, (3,))
