"""The efficient-attention variant records (analysis/variants.py), and a variant registered at run time going
through every stage: computed by the efficient stage, checked by `verify`, injected by the causal stage (with its
noise in the null space its record names) and drawn in the report.

The dummy variant is the midpoint between A and its stochastic projection, E = (A + A P_[T|1]) / 2: it keeps A·T
and the row sums like the stochastic variant, but removes only half of the null part, so its null part and its
noise are not zero (an identity variant, E = A, would make every noise intervention vacuous).
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from analysis.efficient_attention import efficient_attention
from analysis.interventions import Intervention, intervention_matrices
from analysis.projections import orthogonal_projection
from analysis.variants import (
    CLOSED_FORM,
    ITERATIVE,
    VARIANTS,
    Variant,
    default_variants,
    left_out_by_default,
    register_variant,
    registered_variant,
    unknown_variants,
    variant_record,
    variant_records,
)

MIDPOINT_COLOUR = "#17becf"
TOLERANCE = 1e-4


def midpoint(inputs, with_ones):
    """(A + A P) / 2, P the projection of the record's space ([T|1] when `with_ones`)."""
    projected, _ = orthogonal_projection(inputs, with_ones)
    return (inputs.attention + projected) / 2, {}


MIDPOINT = Variant(
    name="midpoint",
    compute=midpoint,
    projects_with_ones=True,
    keeps_output=True,
    keeps_row_sums=True,
    non_negative=False,
    cost=CLOSED_FORM,
    description="(A + A P_[T|1]) / 2: half of the stochastic null part removed",
    colour=MIDPOINT_COLOUR,
)


def random_batch(seed: int, examples=2, heads=2, positions=12, head_dim=4, hidden=16):
    """attention [e, 1, h, L, L] softmax rows, value [e, 1, h, L, d], w_out [1, h, d, D], length [e] (all L)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(examples, 1, heads, positions, positions))
    attention = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    value = rng.normal(size=(examples, 1, heads, positions, head_dim))
    w_out = rng.normal(size=(1, heads, head_dim, hidden))
    return attention, value, w_out, np.full(examples, positions)


# ------------------------------------------------------------------------------------------------ the records


def test_the_built_in_records_say_what_each_variant_guarantees():
    assert tuple(VARIANTS) == ("effective", "stochastic", "simplex") == tuple(r.name for r in variant_records())
    effective, stochastic, simplex = variant_records()
    assert (effective.projects_with_ones, stochastic.projects_with_ones, simplex.projects_with_ones) == (
        False,
        True,
        True,
    )
    assert all(record.keeps_output for record in variant_records())
    assert (effective.keeps_row_sums, stochastic.keeps_row_sums, simplex.keeps_row_sums) == (False, True, True)
    assert (effective.non_negative, stochastic.non_negative, simplex.non_negative) == (False, False, True)
    assert (effective.cost, stochastic.cost, simplex.cost) == (CLOSED_FORM, CLOSED_FORM, ITERATIVE)
    assert simplex.extra_temporaries(32, True) == 34 and simplex.extra_temporaries(32, False) == 0
    assert effective.extra_temporaries(32, True) == 0
    assert len({record.colour for record in variant_records()}) == 3


def test_the_guarantees_hold_on_random_attention():
    """What a record claims is what its computation delivers (the claims drive verify and the noise space)."""
    attention, value, w_out, length = random_batch(0)
    results = efficient_attention(attention, value, w_out, length, causal=False)
    t = np.einsum("elhpd,lhdD->elhpD", value, w_out)
    for name, result in results.items():
        record = variant_record(name)
        assert record.keeps_output
        np.testing.assert_allclose(result.efficient @ t, attention @ t, atol=1e-8)
        row_sums_kept = np.abs(result.efficient.sum(-1) - 1).max() < 1e-8
        assert row_sums_kept == record.keeps_row_sums, name
        assert (result.efficient.min() >= 0) == record.non_negative, name


def test_registration_is_live_everywhere_and_undone_after_the_block():
    assert "midpoint" not in VARIANTS
    with registered_variant(MIDPOINT):
        assert list(VARIANTS) == ["effective", "stochastic", "simplex", "midpoint"]
        assert "midpoint" in VARIANTS and variant_record("midpoint") is MIDPOINT
        assert unknown_variants(["midpoint", "nope"]) == ["nope"]
        with pytest.raises(ValueError, match="registered already"):
            register_variant(MIDPOINT)
        attention, value, w_out, length = random_batch(1)
        assert list(efficient_attention(attention, value, w_out, length, causal=False)) == list(VARIANTS)
    assert "midpoint" not in VARIANTS and len(VARIANTS) == 3
    with pytest.raises(KeyError, match="unknown efficient-attention variant 'midpoint'.*register_variant"):
        variant_record("midpoint")
    with pytest.raises(ValueError, match="unknown variants"):
        efficient_attention(attention, value, w_out, length, causal=False, variants=["midpoint"])


def test_records_with_bad_fields_are_refused():
    with pytest.raises(ValueError, match="without ':'"):
        dataclasses.replace(MIDPOINT, name="null:x")
    with pytest.raises(ValueError, match="cost 'slow' must be one of"):
        dataclasses.replace(MIDPOINT, cost="slow")


def test_the_default_variants_leave_out_those_too_slow_at_the_stores_length():
    assert variant_record("simplex").default_max_length == 256
    assert variant_record("effective").default_max_length is None is variant_record("stochastic").default_max_length
    assert default_variants(256) == ["effective", "stochastic", "simplex"] and left_out_by_default(256) is None
    assert default_variants(257) == default_variants(512) == ["effective", "stochastic"]
    reason = left_out_by_default(512)
    assert "512 positions" in reason and "simplex (up to 256)" in reason and "--variants" in reason
    with registered_variant(dataclasses.replace(MIDPOINT, default_max_length=8)):
        assert default_variants(8) == ["effective", "stochastic", "simplex", "midpoint"]
        assert default_variants(9) == ["effective", "stochastic", "simplex"]
        assert "midpoint (up to 8)" in left_out_by_default(300) and "simplex (up to 256)" in left_out_by_default(300)
    with pytest.raises(ValueError, match="default_max_length must be a positive number of positions"):
        dataclasses.replace(MIDPOINT, default_max_length=0)


def test_a_registered_variant_is_computed_with_its_null_space_diagnostics():
    attention, value, w_out, length = random_batch(2)
    with registered_variant(MIDPOINT):
        results = efficient_attention(
            attention, value, w_out, length, causal=False, variants=["stochastic", "midpoint"]
        )
    stochastic, half = results["stochastic"], results["midpoint"]
    np.testing.assert_allclose(half.efficient, (attention + stochastic.efficient) / 2, atol=1e-12)
    np.testing.assert_array_equal(half.diagnostics["null_dim"], stochastic.diagnostics["null_dim"])  # [T|1]
    np.testing.assert_allclose(half.diagnostics["null_norm_ratio"], stochastic.diagnostics["null_norm_ratio"] / 2)
    assert (half.diagnostics["null_dim"] > 0).all()


def test_the_noise_of_a_registered_variant_lies_in_the_null_space_its_record_names():
    """efficient+null-noise:<v> adds N with rows in the left null space of [T|1] when the record projects against
    it (rows keep their sums) and of T otherwise (they do not): the space comes from the record alone."""
    attention, value, w_out, length = random_batch(3)
    t = np.einsum("elhpd,lhdD->elhpD", value, w_out)
    for projects_with_ones in (True, False):
        record = dataclasses.replace(MIDPOINT, projects_with_ones=projects_with_ones)
        with registered_variant(record):
            efficient = efficient_attention(attention, value, w_out, length, causal=False, variants=["midpoint"])[
                "midpoint"
            ].efficient
            noisy = intervention_matrices(
                Intervention("efficient+null-noise", "midpoint"),
                attention,
                value,
                w_out,
                length,
                causal=False,
                efficient=efficient,
            ).astype(np.float64)
        noise = noisy - efficient
        np.testing.assert_allclose(
            np.linalg.norm(noise, axis=(-2, -1)), np.linalg.norm(attention - efficient, axis=(-2, -1)), rtol=1e-5
        )
        np.testing.assert_allclose(noise @ t, 0, atol=1e-5)  # the output is kept either way
        row_sums_moved = np.abs(noise.sum(-1)).max()
        assert (row_sums_moved < 1e-5) == projects_with_ones, row_sums_moved


# ------------------------------------------------------------------------------------------------ every stage


@pytest.mark.end_to_end
def test_a_registered_variant_goes_through_every_stage(tmp_path, tiny_llama_folder):
    """Extract a tiny Llama; with the midpoint registered: the efficient stage (Dask, workers in this process so
    that they see the registration) computes it, verify checks its guarantees (and catches a broken row), the
    causal stage injects it by default, the report shows it in its colour."""
    import torch
    from distributed import LocalCluster

    from flows.causal import causal
    from flows.efficient import efficient
    from flows.extract import extract
    from flows.report import report
    from flows.settings import CausalSettings, EfficientSettings, ExtractSettings, ReportSettings
    from storage_schemas.attention_store import open_attention_store
    from storage_schemas.verification import verify_store
    from tests.conftest import write_reviews_csv

    store, results = str(tmp_path / "store.zarr"), str(tmp_path / "results.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(tmp_path / "reviews.csv")),
            model=str(tiny_llama_folder),
            store=store,
            shard_size=4,
            batch_size=4,
            train=False,
        )
    )
    threads = torch.get_num_threads()
    with registered_variant(MIDPOINT):
        try:
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
                efficient(
                    EfficientSettings(
                        store=store, variants=["stochastic", "midpoint"], dask_address=cluster.scheduler_address
                    )
                )
        finally:
            torch.set_num_threads(threads)  # the in-process worker set it to 1
        group = open_attention_store(store)
        attention = group["attention"][:]
        half = group["efficient/midpoint"]
        assert half.attrs["description"] == MIDPOINT.description
        assert half.attrs["completed_shards"] == [0, 1, 2]
        np.testing.assert_allclose(half[:], (attention + group["efficient/stochastic"][:]) / 2, atol=1e-6)
        assert group["diagnostics/midpoint/null_dim"][:].max() > 0

        verified = verify_store(store)
        assert verified.ok, verified.text()
        assert "efficient/midpoint" in verified.arrays_checked
        writable = open_attention_store(store, mode="r+")["efficient/midpoint"]
        row = half[0, 0, 0, 0]  # example 0's first row: made to sum to 1.05, which also moves the output
        row[0] += 0.05
        writable[0, 0, 0, 0] = row
        damaged = verify_store(store)
        assert {(problem.array, problem.shard, problem.kind) for problem in damaged.problems} == {
            ("efficient/midpoint", 0, "invariant")
        }
        assert "row sum" in damaged.text() and "||(A_eff - A) T||" in damaged.text()
        row[0] -= 0.05
        writable[0, 0, 0, 0] = row
        assert verify_store(store).ok

        causal(CausalSettings(store=store, results=results, scope_examples=4, minimality_directions=()))
        dataset = xr.open_zarr(results, consolidated=False).load()
        interventions = dataset["intervention"].values.tolist()
        for kind in ("efficient", "null", "efficient+null-noise", "colspace-noise"):
            assert f"{kind}:midpoint" in interventions
        everything = dict(target="all")
        for kept in ("efficient:midpoint", "efficient+null-noise:midpoint"):  # the output is kept
            assert float(dataset["max_abs_logit_change"].sel(intervention=kept, **everything).max()) <= TOLERANCE
            assert float(dataset["agreement_rate"].sel(intervention=kept, **everything)) == 1
        moved = float(dataset["max_abs_logit_change"].sel(intervention="null:midpoint", **everything).max())
        assert moved > 10 * TOLERANCE

        out = tmp_path / "report"
        page = Path(report(ReportSettings(results=results, out=str(out)))).read_text(encoding="utf-8")
        assert html.escape("midpoint rows sum to 1 but can be negative") in page
        assert "<td>midpoint</td>" in page  # the per-variant diagnostics table
        with Image.open(out / "null-norm-ratio.png") as image:
            pixels = np.asarray(image.convert("RGB"), dtype=int)
        colour = np.array([int(MIDPOINT_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - colour).sum(-1) < 30).sum() > 50  # the midpoint's curve, in its colour
    assert "midpoint" not in VARIANTS


def test_unknown_variant_names_are_refused_naming_the_flag():
    from analysis.variants import require_known_variants

    require_known_variants(["effective", "simplex"])
    with pytest.raises(ValueError) as refused:
        require_known_variants(["effective", "nosuch"])
    assert str(refused.value) == (
        "--variants effective,nosuch: unknown efficient-attention variants ['nosuch']: "
        "choose from effective,stochastic,simplex (comma-separated)"
    )
    with pytest.raises(ValueError, match=r"^--next-token-variants : unknown efficient-attention variants \[\]"):
        require_known_variants([], "--next-token-variants")
