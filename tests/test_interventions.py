"""analysis.interventions: names, and the matrices each intervention injects (checked against T = V W_O^h)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from analysis.efficient_attention import efficient_attention
from analysis.interventions import (
    KIND_RECORDS,
    Intervention,
    SharedBases,
    default_head_interventions,
    default_interventions,
    default_layer_interventions,
    intervention_matrices,
    parse_interventions,
)
from analysis.variants import variant_record

HEAD_DIM, HIDDEN = 4, 12


def random_inputs(causal: bool, lengths=(11, 7, 3), layers=2, heads=2, kv_heads=1, seed=0):
    """Softmax attention (lower-triangular when causal), values and output projections; L up to 11 > head dim 4."""
    rng = np.random.default_rng(seed)
    size = max(lengths)
    attention = np.zeros((len(lengths), layers, heads, size, size), dtype=np.float32)
    value = np.zeros((len(lengths), layers, kv_heads, size, HEAD_DIM), dtype=np.float32)
    for example, n in enumerate(lengths):
        scores = rng.normal(size=(layers, heads, n, n)) * 2
        if causal:
            scores = np.where(np.tril(np.ones((n, n))) > 0, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        attention[example, :, :, :n, :n] = weights / weights.sum(-1, keepdims=True)
        value[example, :, :, :n] = rng.normal(size=(layers, kv_heads, n, HEAD_DIM))
    w_out = rng.normal(size=(layers, heads, HEAD_DIM, HIDDEN)).astype(np.float32)
    return attention, value, w_out, np.array(lengths)


def blocks(matrices, attention, value, w_out, lengths):
    """Yield (injected, A, T) per (example, layer, head) on the real block, float64."""
    heads = attention.shape[2]
    group = heads // value.shape[2]
    for example, n in enumerate(lengths):
        for layer in range(attention.shape[1]):
            for head in range(heads):
                T = value[example, layer, head // group, :n].astype(np.float64) @ w_out[layer, head]
                yield (
                    matrices[example, layer, head, :n, :n].astype(np.float64),
                    attention[example, layer, head, :n, :n].astype(np.float64),
                    T,
                )


def test_names_round_trip_and_bad_names_say_how_to_write_them():
    for intervention in default_interventions():
        assert Intervention.parse(intervention.name) == intervention
    assert [item.name for item in default_interventions(["stochastic"], (1, 2))] == [
        "replay",
        "efficient:stochastic",
        "null:stochastic",
        "efficient+null-noise:stochastic",
        "colspace-noise:stochastic",
        "uniform",
        "ablate",
    ]  # no minimality without the effective variant
    bad_names = {
        "zero": "unknown intervention kind 'zero': choose from ['replay', 'efficient', 'null', "
        "'efficient+null-noise', 'colspace-noise', 'uniform', 'ablate', 'minimality']",
        "null": "intervention 'null' needs a variant from ['effective', 'stochastic', 'simplex'], e.g. "
        "'null:effective'",
        "null:exact": "intervention 'null' needs a variant from ['effective', 'stochastic', 'simplex'], e.g. "
        "'null:effective'",
        "ablate:effective": "intervention 'ablate' takes no variant, got 'effective'",
        "minimality:effective": "cannot read 'minimality:effective': write the minimality probe as "
        "minimality:effective:k=4",
        "minimality:effective:k=x": "cannot read 'minimality:effective:k=x': write the minimality probe as "
        "minimality:effective:k=4",
        "minimality:stochastic:k=2": "the minimality probe truncates the effective projection: use "
        "minimality:effective:k=K",
        "minimality:effective:k=0": "minimality needs k >= 1 directions removed, got 0",
        "null:effective:extra": "cannot read intervention 'null:effective:extra': write KIND or KIND:VARIANT, e.g. "
        "null:effective",
    }
    for name, message in bad_names.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Intervention.parse(name)
    with pytest.raises(ValueError, match=r"^only minimality removes directions, got k=2 for null$"):
        Intervention("null", "effective", 2)
    with pytest.raises(ValueError, match="^intervention ablate is listed twice$"):
        parse_interventions(["ablate", "uniform", "ablate"])


def test_an_intervention_holds_its_kind_and_variant_records_and_writes_only_names():
    """object -> name -> object keeps the records; the dataset row holds names only."""
    probe = Intervention.parse(" minimality:effective:k=3 ")
    assert probe.kind is KIND_RECORDS["minimality"] and probe.variant is variant_record("effective")
    assert probe.removed_directions == 3 and not probe.needs_efficient
    assert Intervention(KIND_RECORDS["null"], variant_record("simplex")) == Intervention("null", "simplex")
    for intervention in default_interventions(minimality_directions=(1, 4)):
        again = Intervention.parse(intervention.name)
        assert again == intervention and again.name == intervention.name
        assert again.variant is (None if not intervention.kind.takes_variant else variant_record(again.variant_name))
        row = again.results_row()
        assert row == {
            "name": intervention.name,
            "kind": intervention.kind.name,
            "variant": again.variant_name,
            "removed_directions": again.removed_directions,
        }
        assert all(isinstance(value, (str, int)) for value in row.values())
    assert Intervention.parse("ablate").results_row() == {
        "name": "ablate",
        "kind": "ablate",
        "variant": "",
        "removed_directions": 0,
    }
    assert repr(Intervention("null", "stochastic")) == "Intervention.parse('null:stochastic')"
    reads = {item.name for item in default_interventions(["effective"], (1,)) if item.needs_efficient}
    assert reads == {
        "efficient:effective",
        "null:effective",
        "efficient+null-noise:effective",
        "colspace-noise:effective",
    }


def test_a_registered_variant_gets_its_interventions():
    from analysis.variants import Variant, registered_variant

    record = Variant(
        name="halfway",
        compute=lambda inputs, with_ones: None,
        projects_with_ones=True,
        keeps_output=False,
        keeps_row_sums=True,
        non_negative=True,
        cost="closed-form",
        description="test only",
        colour="#000000",
    )
    with registered_variant(record):
        assert Intervention.parse("efficient+null-noise:halfway").variant is record
    with pytest.raises(
        ValueError,
        match=r"^intervention 'null' needs a variant from \['effective', 'stochastic', "
        r"'simplex'\], e\.g\. 'null:effective'$",
    ):
        Intervention.parse("null:halfway")  # unregistered again


def test_default_scopes_of_the_interventions():
    chosen = default_interventions(["effective", "simplex"], (1,))
    assert [item.name for item in default_layer_interventions(chosen)] == [
        "efficient:effective",
        "efficient:simplex",
        "null:effective",
        "null:simplex",
        "uniform",
        "ablate",
    ]
    assert [item.name for item in default_head_interventions(chosen)] == ["ablate"]
    no_ablate = parse_interventions(["efficient:effective", "null:simplex", "null:effective"])
    assert [item.name for item in default_head_interventions(no_ablate)] == ["null:simplex"]
    assert [item.name for item in default_head_interventions(parse_interventions(["uniform", "replay"]))] == ["uniform"]


@pytest.mark.parametrize("causal", [False, True])
def test_every_matrix_is_zero_outside_the_real_block_and_causal_ones_stay_lower_triangular(causal):
    attention, value, w_out, lengths = random_inputs(causal)
    efficient = efficient_attention(attention, value, w_out, lengths, causal=causal)
    for intervention in default_interventions(minimality_directions=(1, 2)):
        matrices = intervention_matrices(
            intervention,
            attention,
            value,
            w_out,
            lengths,
            causal,
            efficient=efficient[intervention.variant_name].efficient if intervention.needs_efficient else None,
        )
        assert matrices.dtype == np.float32 and matrices.shape == attention.shape
        for example, n in enumerate(lengths):
            assert not matrices[example, :, :, n:].any() and not matrices[example, :, :, :, n:].any()
            if causal:
                assert not np.triu(matrices[example, :, :, :n, :n], k=1).any(), intervention.name


@pytest.mark.parametrize("causal", [False, True])
def test_replay_efficient_null_uniform_and_ablate(causal):
    attention, value, w_out, lengths = random_inputs(causal)
    efficient = efficient_attention(attention, value, w_out, lengths, causal=causal)["effective"].efficient

    def build(name):
        return intervention_matrices(
            Intervention.parse(name), attention, value, w_out, lengths, causal, efficient=efficient
        )

    np.testing.assert_array_equal(build("replay"), attention)
    np.testing.assert_allclose(build("efficient:effective"), efficient, atol=1e-7)
    np.testing.assert_allclose(build("null:effective") + build("efficient:effective"), attention, atol=1e-6)
    assert not build("ablate").any()
    uniform = build("uniform")
    for example, n in enumerate(lengths):
        np.testing.assert_allclose(uniform[example, :, :, :n, :n].sum(-1), 1.0, rtol=1e-6)
        visible = np.tril(np.ones((n, n))) if causal else np.ones((n, n))
        assert ((uniform[example, :, :, :n, :n] > 0) == (visible > 0)).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["effective", "stochastic"])
def test_null_noise_keeps_the_output_and_colspace_noise_moves_it_by_the_removed_norm(causal, variant):
    attention, value, w_out, lengths = random_inputs(causal)
    efficient = efficient_attention(attention, value, w_out, lengths, causal=causal)[variant].efficient
    null_noise = intervention_matrices(
        Intervention("efficient+null-noise", variant), attention, value, w_out, lengths, causal, efficient=efficient
    )
    colspace = intervention_matrices(
        Intervention("colspace-noise", variant), attention, value, w_out, lengths, causal, efficient=efficient
    )
    moved = 0
    for (noisy, A, T), (inside, _, _), (E, _, _) in zip(
        blocks(null_noise, attention, value, w_out, lengths),
        blocks(colspace, attention, value, w_out, lengths),
        blocks(efficient, attention, value, w_out, lengths),
    ):
        removed = np.linalg.norm(A - E)
        scale = np.linalg.norm(A @ T)
        np.testing.assert_allclose(np.linalg.norm(noisy - E), removed, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(inside - A), removed, rtol=1e-4, atol=1e-6)
        assert np.linalg.norm((noisy - A) @ T) <= 1e-5 * scale  # the output does not move
        if variant == "stochastic":
            np.testing.assert_allclose(noisy.sum(-1), 1.0, atol=1e-5)  # noise in the null space of [T|1]
        if removed > 1e-3:
            # inside col(T): the output moves by exactly the noise's image, which is not small
            assert np.linalg.norm((inside - A) @ T) >= 1e-3 * scale
            moved += 1
    assert moved > 0  # the inputs do have null parts


def test_noise_is_the_same_for_an_example_whatever_it_is_batched_with():
    attention, value, w_out, lengths = random_inputs(False)
    efficient = efficient_attention(attention, value, w_out, lengths, causal=False)["effective"].efficient
    intervention = Intervention("efficient+null-noise", "effective")
    together = intervention_matrices(
        intervention,
        attention,
        value,
        w_out,
        lengths,
        False,
        efficient=efficient,
        example_indices=np.array([5, 6, 7]),
        seed=3,
    )
    alone = intervention_matrices(
        intervention,
        attention[1:2],
        value[1:2],
        w_out,
        lengths[1:2],
        False,
        efficient=efficient[1:2],
        example_indices=np.array([6]),
        seed=3,
    )
    np.testing.assert_array_equal(together[1:2], alone)
    other_seed = intervention_matrices(
        intervention,
        attention[1:2],
        value[1:2],
        w_out,
        lengths[1:2],
        False,
        efficient=efficient[1:2],
        example_indices=np.array([6]),
        seed=4,
    )
    assert not np.allclose(other_seed, alone)


@pytest.mark.parametrize("causal", [False, True])
def test_minimality_drops_exactly_the_weakest_directions(causal):
    attention, value, w_out, lengths = random_inputs(causal, lengths=(11,))
    efficient = efficient_attention(attention, value, w_out, lengths, causal=causal)["effective"].efficient
    for k in (1, 2):
        truncated = intervention_matrices(
            Intervention("minimality", "effective", k), attention, value, w_out, lengths, causal
        )
        for (B, A, T), (E, _, _) in zip(
            blocks(truncated, attention, value, w_out, lengths), blocks(efficient, attention, value, w_out, lengths)
        ):
            left, singular, _ = np.linalg.svd(T, full_matrices=False)
            rank = int((singular > singular[0] * 1e-10).sum())
            if not causal:
                kept = left[:, : rank - k]
                np.testing.assert_allclose(B, A @ kept @ kept.T, atol=1e-6)
            else:  # the last row sees the whole T: same rule there
                kept = left[:, : rank - k]
                np.testing.assert_allclose(B[-1], A[-1] @ kept @ kept.T, atol=1e-6)
            # what is dropped is a part of the efficient matrix, so the output moves
            assert np.linalg.norm((B - E) @ T) > 1e-6 * np.linalg.norm(A @ T)


def test_interventions_that_need_efficient_attention_say_so():
    attention, value, w_out, lengths = random_inputs(False)
    with pytest.raises(ValueError, match="null:simplex needs the stored efficient attention of variant simplex"):
        intervention_matrices(Intervention("null", "simplex"), attention, value, w_out, lengths, False)


@pytest.mark.parametrize("causal", [False, True])
def test_interventions_sharing_decompositions_in_a_batch_give_the_same_matrices(causal):
    """One SharedBases for every intervention of a batch (the minimality probes share one SVD, the noises one
    basis per space) changes nothing; a SharedBases handed another batch's chunks computes them afresh."""
    inputs = random_inputs(causal)
    results = efficient_attention(*inputs, causal=causal)
    names = [
        "minimality:effective:k=1",
        "minimality:effective:k=2",
        "colspace-noise:effective",
        "efficient+null-noise:effective",
        "efficient+null-noise:stochastic",
        "colspace-noise:stochastic",
    ]
    shared = SharedBases()
    for name in names:
        intervention = Intervention.parse(name)
        efficient = results[intervention.variant_name].efficient
        alone = intervention_matrices(intervention, *inputs, causal, efficient=efficient, seed=5)
        together = intervention_matrices(intervention, *inputs, causal, efficient=efficient, seed=5, shared=shared)
        np.testing.assert_array_equal(together, alone)
    assert shared._kept  # something was shared
    other = random_inputs(causal, seed=1)
    probe = Intervention.parse("minimality:effective:k=3")
    np.testing.assert_array_equal(
        intervention_matrices(probe, *other, causal, shared=shared), intervention_matrices(probe, *other, causal)
    )
    nothing_kept = SharedBases(limit=0)
    intervention_matrices(Intervention.parse("minimality:effective:k=4"), *other, causal, shared=nothing_kept)
    assert not nothing_kept._kept


@pytest.mark.parametrize("band,causal", [((3, 0), True), ((2, 2), False)], ids=["causal-window", "local-window"])
@pytest.mark.parametrize("variant", ["effective", "stochastic"])
def test_noise_stays_inside_each_layers_key_band(band, causal, variant):
    """With a window shorter than the sequence (and wider than the head's rank: head dim 2), the null-space noise
    keeps A·T, the colspace noise moves it, and neither puts weight on a key the query does not see; a full layer
    beside it gets noise on every visible key."""
    from analysis.key_bands import KeyBand, default_band

    band = KeyBand(*band)
    attention, value, w_out, lengths = random_inputs(causal)
    value[..., 2:] = 0.0  # rank 2 < window: the band's null space is not empty
    size = attention.shape[-1]
    for example, n in enumerate(lengths):  # layer 0 sees only its band
        block = attention[example, 0, :, :n, :n] * band.visible(n)
        attention[example, 0, :, :n, :n] = block / block.sum(-1, keepdims=True)
    bands = (band, default_band(causal))
    efficient = efficient_attention(attention, value, w_out, lengths, causal, variants=(variant,), key_bands=bands)[
        variant
    ].efficient
    visible = band.visible(size)
    for kind in ("efficient+null-noise", "colspace-noise"):
        matrices = intervention_matrices(
            Intervention(kind, variant),
            attention,
            value,
            w_out,
            lengths,
            causal,
            efficient=efficient,
            seed=3,
            key_bands=bands,
        )
        assert np.abs(matrices[:, 0][..., ~visible]).max() == 0.0, kind
        assert (
            np.abs(
                matrices[:, 1] - efficient[:, 1] if kind != "colspace-noise" else matrices[:, 1] - attention[:, 1]
            ).max()
            > 1e-3
        )  # the full layer gets noise too
        moved_blocks = 0
        for (injected, a, t), (e, _, _) in zip(
            blocks(matrices, attention, value, w_out, lengths), blocks(efficient, attention, value, w_out, lengths)
        ):
            moved = np.linalg.norm((injected - a) @ t) / np.linalg.norm(a @ t)
            if kind == "efficient+null-noise":
                assert moved < 1e-5
            elif np.linalg.norm(a - e) > 1e-3:  # colspace noise has the removed part's norm
                assert moved > 1e-3
                moved_blocks += 1
            if causal:
                assert (np.triu(injected, 1) == 0).all()
        assert kind == "efficient+null-noise" or moved_blocks > 0
