"""analysis/support_minimality.py: constructed rows whose minimality is known, and the simplex solver's rows."""

from __future__ import annotations

import numpy as np
import torch

from analysis.projections import value_output_basis
from analysis.simplex_solver import simplex_rows
from analysis.support_minimality import (
    drop_residuals,
    layer_minimality,
    minimal_share_by_layer,
    output_rows,
    row_minimality,
)

TOLERANCE = 1e-8


def test_a_row_on_affinely_independent_tokens_is_minimal():
    # T rows are the corners of a triangle, with the ones column: no corner is a mix of the others
    rows = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    centroid = np.full(3, 1 / 3)
    found = row_minimality(centroid, centroid, rows, TOLERANCE)
    assert found.minimal is True and found.support_size == 3
    assert found.whole_residual <= 1e-12 and found.smallest_drop_residual > 1e-3


def test_a_row_with_a_redundant_token_is_not_minimal():
    # the fourth token is the midpoint of the first two: its weight can move to them
    rows = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.5, 0.0, 1.0]])
    row = np.full(4, 0.25)
    found = row_minimality(row, row, rows, TOLERANCE)
    assert found.minimal is False
    whole, dropped = drop_residuals(rows, row @ rows)
    assert dropped[3] <= 1e-12  # dropping the midpoint keeps the output
    assert dropped[2] > 1e-3  # the third corner cannot be dropped


def test_a_support_that_does_not_reproduce_the_output_is_untestable():
    rows = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    found = row_minimality(np.full(3, 1 / 3), np.array([0.5, 0.5, 0.0]), rows, TOLERANCE)
    assert found.minimal is None


def test_simplex_rows_are_minimal_exactly_when_their_support_is_within_the_rank():
    """Carathéodory: a support of more than rank([T|1]) tokens has linearly dependent rows, so a token can go; a
    support of at most rank generic rows is linearly independent, so the row on it is unique: minimal."""
    rng = np.random.default_rng(1)
    length, head_dim, hidden = 12, 3, 5
    value = rng.normal(size=(length, head_dim))
    w_out = rng.normal(size=(head_dim, hidden))
    attention = rng.dirichlet(np.full(length, 0.1), size=length)  # peaked rows: some small supports
    basis, rank = value_output_basis(value[None], w_out[None], append_ones=True)
    solution = simplex_rows(torch.as_tensor(attention)[None], basis).solution[0].numpy()
    matrix = output_rows(value, w_out)
    verdicts = [row_minimality(attention[i], solution[i], matrix, TOLERANCE) for i in range(length)]
    sizes = np.array([found.support_size for found in verdicts])
    large = sizes > int(rank[0])
    assert large.any() and (~large).any()  # both cases occur, so the checks below can fail
    assert all(found.minimal is False for found, big in zip(verdicts, large) if big)
    assert all(found.minimal is True for found, big in zip(verdicts, large) if not big)
    assert all(found.whole_residual <= TOLERANCE for found in verdicts)


def test_layer_minimality_counts_sampled_rows_and_shares_aggregate():
    rng = np.random.default_rng(0)
    layers, heads, length, head_dim, hidden = 2, 2, 6, 2, 4
    value = rng.normal(size=(layers, 1, length, head_dim))  # one kv head serves both heads
    w_out = rng.normal(size=(layers, heads, head_dim, hidden))
    attention = rng.dirichlet(np.ones(length), size=(layers, heads, length))
    counts = layer_minimality(attention, attention, value, w_out, rows=5, rng=rng, tolerance=TOLERANCE)
    # A itself as the "simplex" row: full support of 6 > rank 3, never minimal
    np.testing.assert_array_equal(counts["tested"] + counts["untestable"], [5, 5])
    np.testing.assert_array_equal(counts["minimal"], [0, 0])
    np.testing.assert_allclose(counts["support_size"], [6, 6])
    share = minimal_share_by_layer(np.array([[1, 0], [2, -1]]), np.array([[2, 0], [2, -1]]))
    assert share[0] == 0.75 and np.isnan(share[1])
