"""Tests of analysis.projections: the bases and projections of the closed-form variants, checked against
independent numpy computations (SVD projectors), on random problems and with hypothesis (the problem makers are
tests/test_efficient_attention.py's). Projectors are idempotent and symmetric to 1e-12.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis import projections
from analysis.projections import (
    nested_left_null_basis,
    project_rows,
    project_rows_causal,
    projector,
    value_output_basis,
)
from tests.test_efficient_attention import PROPERTY, problem_sizes, reference_projector, softmax_rows, svd_basis


@PROPERTY
@given(problem_sizes, st.booleans())
def test_projectors_are_idempotent_symmetric_and_contain_the_output(sizes, append_ones):
    rng = np.random.default_rng(sizes["seed"])
    size, head_dim, hidden = sizes["positions"], sizes["head_dim"], sizes["hidden"]
    value = rng.normal(size=(3, size, head_dim))
    w_out = rng.normal(size=(3, head_dim, hidden))
    basis, rank = value_output_basis(value, w_out, append_ones=append_ones)
    p = projector(basis).numpy()
    assert np.abs(p @ p - p).max() <= 1e-12
    assert np.abs(p - p.transpose(0, 2, 1)).max() <= 1e-12
    for index in range(3):
        t = value[index] @ w_out[index]
        assert np.abs(p[index] @ t - t).max() <= 1e-12 * np.abs(t).max()
        assert np.allclose(p[index], reference_projector(t, "stochastic" if append_ones else "effective"), atol=1e-10)
        expected_rank = min(size, head_dim) + (1 if append_ones and size > head_dim else 0)
        assert rank[index] == expected_rank
        if append_ones:
            assert np.allclose(p[index] @ np.ones(size), np.ones(size), atol=1e-12)


def test_projection_skips_only_the_bases_that_span_everything():
    """`project_rows_unless_identity`: rank = L keeps the rows bit for bit; other ranks are projected."""
    rng = np.random.default_rng(3)
    rows = torch.from_numpy(rng.random((3, 4, 6)))
    full = torch.linalg.qr(torch.from_numpy(rng.normal(size=(6, 6)))).Q
    partial = torch.linalg.qr(torch.from_numpy(rng.normal(size=(6, 6)))).Q * torch.tensor([1, 1, 1, 0, 0, 0.0])
    basis = torch.stack([full, partial, full])
    rank = torch.tensor([6, 3, 5])  # the third claims rank 5 < L: projected, even with a full basis
    result = projections.project_rows_unless_identity(rows, basis, rank)
    assert torch.equal(result[0], rows[0])
    torch.testing.assert_close(result[1], projections.project_rows(rows[1], partial), rtol=0, atol=1e-15)
    assert not torch.equal(result[2], rows[2])
    torch.testing.assert_close(result[2], rows[2], rtol=0, atol=1e-12)


def test_nested_left_null_basis_has_the_staircase_form():
    rng = np.random.default_rng(2)
    matrix = torch.from_numpy(rng.normal(size=(3, 11, 4)))
    null = nested_left_null_basis(matrix).numpy()
    assert null.shape == (3, 11, 7)
    np.testing.assert_allclose(null.transpose(0, 2, 1) @ null, np.broadcast_to(np.eye(7), (3, 7, 7)), atol=1e-12)
    assert np.abs(null.transpose(0, 2, 1) @ matrix.numpy()).max() <= 1e-12
    for column in range(7):
        assert (null[:, 4 + column + 1 :, column] == 0).all()


def test_project_rows_causal_matches_prefix_projectors():
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(2, 9, 3))
    rows = softmax_rows(rng.normal(size=(2, 9, 9)), causal=True)
    result = project_rows_causal(rows, matrix, hidden_size=3).numpy()
    for index in range(2):
        for query in range(9):
            basis = svd_basis(matrix[index, : query + 1], 3)
            expected = rows[index, query, : query + 1] @ basis @ basis.T
            np.testing.assert_allclose(result[index, query, : query + 1], expected, atol=1e-12)
    full_basis, _ = projections.column_space_basis(matrix, 3)
    assert not np.allclose(result, np.tril(project_rows(rows, full_basis).numpy()))


def test_bases_with_ones_from_one_qr_match_separate_bases():
    """`column_space_bases_with_ones` (one QR of [X | s·1]) gives the ranks and, up to round-off, the bases of
    `column_space_basis` of X and of [X | s·1] computed apart: full rank (certified), rank-deficient X (the SVD
    path for both) and L ≤ c (each its own QR)."""
    rng = np.random.default_rng(5)
    full = rng.normal(size=(2, 9, 4))
    deficient = rng.normal(size=(2, 9, 2)) @ rng.normal(size=(2, 2, 4))  # rank 2 < 4 columns
    short = rng.normal(size=(2, 3, 4))
    for matrix in (full, deficient, short, np.concatenate([full, deficient])):
        matrix = torch.from_numpy(matrix)
        with_ones = projections.with_ones_column(matrix)
        together = projections.column_space_bases_with_ones(matrix, with_ones, 6)
        for ones, space, hidden in ((False, matrix, 6), (True, with_ones, 7)):
            basis, rank = together[ones]
            expected_basis, expected_rank = projections.column_space_basis(space, hidden)
            assert torch.equal(rank, expected_rank)
            torch.testing.assert_close(projector(basis), projector(expected_basis), rtol=0, atol=1e-13)
    inputs = projections.VariantInputs(torch.from_numpy(full @ full.mT), torch.from_numpy(full), 6, False, 1, 1e-10)
    shared = projections.VariantInputs(
        torch.from_numpy(full @ full.mT), torch.from_numpy(full), 6, False, 1, 1e-10, with_both_bases=True
    )
    for ones in (False, True):
        torch.testing.assert_close(
            projector(shared.basis(ones)[0]), projector(inputs.basis(ones)[0]), rtol=0, atol=1e-13
        )
