"""analysis.causal: batched intervened forward passes, targets, metrics and aggregates (tiny random models)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from analysis.causal import (
    METRICS,
    REFERENCE_LENGTH,
    BatchMetrics,
    CausalBatch,
    CausalPlan,
    Target,
    aggregate_metric_parts,
    aggregate_metrics,
    classification_metrics,
    forward_groups,
    injected_change_ratio,
    intervened_logits,
    keyed_scope_examples,
    measured_examples,
    next_token_metrics,
    plain_logits,
    rows_per_pass,
    scope_share,
    targets_for,
)
from analysis.efficient_attention import efficient_attention
from analysis.extraction import capture_examples
from analysis.interventions import Intervention, intervention_matrices, parse_interventions
from analysis.models import output_projection_slices, wrap_model
from analysis.variants import variant_record
from tests.conftest import bundled_tokenizer, tiny_bert, tiny_llama

LENGTHS = np.array([20, 16, 12, 5])  # longer than the head dim (8): real null spaces


def captured(make_model, task: str = "classification"):
    model = make_model()
    if task == "next-token":
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(make_model().config).eval()
    loaded = wrap_model(model, bundled_tokenizer(), "tiny", task=task)
    rng = np.random.default_rng(0)
    tokens = np.zeros((len(LENGTHS), LENGTHS.max()), dtype=np.int32)
    for row, n in enumerate(LENGTHS):
        tokens[row, :n] = rng.integers(1000, 2000, n)
    shard = capture_examples(loaded, tokens, LENGTHS, batch_size=4, top_k=5)
    w_out, _ = output_projection_slices(loaded.model, loaded.adapter)
    efficient = efficient_attention(shard.attention, shard.value, w_out, LENGTHS, causal=loaded.causal)
    return loaded, tokens, shard, w_out, efficient


ALL_TARGET = Target("all")


def injected(loaded, tokens, shard, w_out, efficient, name, target=ALL_TARGET):
    intervention = Intervention.parse(name)
    matrices = intervention_matrices(
        intervention,
        shard.attention,
        shard.value,
        w_out,
        LENGTHS,
        loaded.causal,
        efficient=efficient[intervention.variant_name].efficient if intervention.needs_efficient else None,
    )
    masks = target.mask(loaded.shape.layers, loaded.shape.heads)[None]
    return intervened_logits(loaded, tokens, LENGTHS, matrices, masks)[0]


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_exact_cases_efficient_keeps_null_equals_ablation_colspace_moves(make_model):
    loaded, tokens, shard, w_out, efficient = captured(make_model)
    original = torch.as_tensor(shard.logits)
    replay = injected(loaded, tokens, shard, w_out, efficient, "replay")
    assert (replay - original).abs().max() <= 1e-5
    ablate = injected(loaded, tokens, shard, w_out, efficient, "ablate")
    assert (ablate - original).abs().max() > 1e-4  # the heads matter, so the checks below can fail
    for variant in ("effective", "stochastic", "simplex"):
        kept = injected(loaded, tokens, shard, w_out, efficient, f"efficient:{variant}")
        assert (kept - original).abs().max() <= 1e-5, variant
        noisy = injected(loaded, tokens, shard, w_out, efficient, f"efficient+null-noise:{variant}")
        assert (noisy - original).abs().max() <= 1e-5, variant
    # null·T = A·T - A_eff·T = 0: the heads of one layer add nothing, exactly like ablating them. (At scope
    # "all" this holds only for the first layer: later layers get other values once an earlier layer changed.)
    for layer in range(loaded.shape.layers):
        null = injected(loaded, tokens, shard, w_out, efficient, "null:effective", Target("layer", layer))
        ablate_layer = injected(loaded, tokens, shard, w_out, efficient, "ablate", Target("layer", layer))
        assert (null - ablate_layer).abs().max() <= 1e-5
    colspace = injected(loaded, tokens, shard, w_out, efficient, "colspace-noise:effective")
    noisy = injected(loaded, tokens, shard, w_out, efficient, "efficient+null-noise:effective")
    assert (colspace - original).abs().max() > 100 * max((noisy - original).abs().max(), 1e-8)


def test_many_targets_in_one_pass_equal_one_pass_per_target():
    loaded, tokens, shard, w_out, efficient = captured(tiny_llama)
    matrices = intervention_matrices(Intervention("uniform"), shard.attention, shard.value, w_out, LENGTHS, True)
    targets = targets_for(["all", "layer", "head"], loaded.shape.layers, loaded.shape.heads)
    masks = np.stack([target.mask(2, 4) for target in targets])
    together = intervened_logits(loaded, tokens, LENGTHS, matrices, masks)
    assert together.shape == (len(targets), len(LENGTHS), 2)
    for index in (0, 1, 5, len(targets) - 1):
        alone = intervened_logits(loaded, tokens, LENGTHS, matrices, masks[index : index + 1])[0]
        torch.testing.assert_close(together[index], alone, atol=1e-5, rtol=0)
    # different targets do give different logits (the copies are not all the same)
    assert (together[1] - together[2]).abs().max() > 1e-5


def test_targets_and_their_masks():
    targets = targets_for(["head", "all"], 2, 3)
    assert [target.name for target in targets][:3] == ["all", "layer 0 head 0", "layer 0 head 1"]
    assert len(targets) == 1 + 6
    assert Target("layer", 1).mask(2, 3).tolist() == [[False] * 3, [True] * 3]
    assert Target("head", 0, 2).mask(2, 3).sum() == 1 and Target("head", 0, 2).mask(2, 3)[0, 2]
    with pytest.raises(ValueError, match=r"unknown scopes \['heads'\]: choose from \['all', 'layer', 'head'\]"):
        targets_for(["heads"], 2, 3)


def test_classification_metrics_by_hand():
    original = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    intervened = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 1.5]]])
    metrics = classification_metrics(original, original, intervened, np.array([0, -1]))
    np.testing.assert_array_equal(metrics["agreement"], [[1, 1], [0, 1]])
    np.testing.assert_array_equal(metrics["flipped"], [[0, 0], [1, 0]])
    np.testing.assert_allclose(metrics["max_abs_logit_change"], [[0, 0], [3, 0.5]])
    assert metrics["correct"][0, 0] == 1 and metrics["correct"][1, 0] == 0 and np.isnan(metrics["correct"][0, 1])
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    q = np.exp([0.0, 3.0]) / np.exp([0.0, 3.0]).sum()
    np.testing.assert_allclose(metrics["kl_divergence"][1, 0], (p * np.log(p / q)).sum(), rtol=1e-5)
    assert metrics["kl_divergence"][0, 0] == 0


def test_next_token_metrics_by_hand():
    # one example of 3 real positions (+1 padding), vocabulary 4; tokens 1, 2, 3
    original = torch.tensor([[[0.0, 0, 5, 0], [0, 0, 0, 5], [5, 0, 0, 0], [0, 0, 0, 0]]])
    intervened = original[None].clone()
    intervened[0, 0, 1] = torch.tensor([0.0, 9, 0, 0])  # position 1 now predicts token 1 (was 3)
    intervened[0, 0, 3] = torch.tensor([0.0, 99, 0, 0])  # padding: ignored
    top = torch.topk(original, 2, dim=-1)
    tokens = np.array([[1, 2, 3, 0]])
    metrics = next_token_metrics(original, top.values.numpy(), top.indices.numpy(), intervened, tokens, np.array([3]))
    np.testing.assert_allclose(metrics["agreement"], [[2 / 3]])
    np.testing.assert_array_equal(metrics["flipped"], [[1]])
    np.testing.assert_allclose(metrics["max_abs_logit_change"], [[9]])  # not 99: padding ignored
    # next tokens: position 0 -> 2 (predicted 2: right), position 1 -> 3 (predicted 1: wrong)
    np.testing.assert_allclose(metrics["correct"], [[0.5]])
    # the stored top-2 of position 1 are tokens 3 (5.0) and one zero logit; intervened: 0 and 9 or 0
    assert metrics["stored_logit_difference"][0, 0] >= 5.0


def test_aggregates_ignore_unmeasured_examples():
    agreement = np.array([[[1.0, 0.0, np.nan], [np.nan, np.nan, np.nan]]])  # 1 intervention, 2 targets, 3 examples
    metrics = {
        name: agreement.copy()
        for name in (
            "agreement",
            "flipped",
            "max_abs_logit_change",
            "kl_divergence",
            "correct",
            "stored_logit_difference",
        )
    }
    metrics["flipped"] = 1 - agreement
    aggregates = aggregate_metrics(metrics)
    assert aggregates["agreement_rate"][0, 0] == 0.5 and aggregates["flip_rate"][0, 0] == 0.5
    assert aggregates["examples_measured"].tolist() == [[2, 0]]
    assert np.isnan(aggregates["agreement_rate"][0, 1])
    assert aggregates["largest_logit_change"][0, 0] == 1.0


def test_measured_examples_spread_over_the_store():
    assert measured_examples(10, None).tolist() == list(range(10))
    assert measured_examples(10, 3).tolist() == [0, 4, 9]
    assert measured_examples(3, 10).tolist() == [0, 1, 2]


def test_a_growing_store_measures_the_scopes_on_a_keyed_share_that_keeps_earlier_choices():
    from analysis.example_identities import identity_digests

    identities = identity_digests([f"review {i}" for i in range(60)], ["good"] * 60)
    share = scope_share(identities[:20], 3, 5)
    chosen = keyed_scope_examples(identities[:20], 3, share)
    assert len(chosen) == 5  # scope_examples of the store when the results are created
    grown = keyed_scope_examples(identities, 3, share)  # later: the same share over the grown store
    assert grown[: len(chosen)].tolist() == chosen.tolist() and (grown[len(chosen) :] >= 20).all()
    assert keyed_scope_examples(identities, 4, share).tolist() != grown.tolist()  # the seed is part of the draw
    assert scope_share(identities, 3, None) == 1.0 and len(keyed_scope_examples(identities, 3, 1.0)) == 60


def test_next_token_intervened_logits_keep_positions_and_efficient_keeps_them():
    loaded, tokens, shard, w_out, efficient = captured(tiny_llama, task="next-token")
    original = plain_logits(loaded, tokens, LENGTHS)
    kept = injected(loaded, tokens, shard, w_out, efficient, "efficient:stochastic")
    real = torch.as_tensor(np.arange(LENGTHS.max())[None, :] < LENGTHS[:, None])
    assert kept.shape == original.shape
    assert ((kept - original).abs().amax(-1) * real).max() <= 1e-5
    metrics = next_token_metrics(original, shard.logits, shard.logit_ids, kept[None], tokens, LENGTHS)
    np.testing.assert_array_equal(metrics["agreement"], 1.0)
    assert metrics["stored_logit_difference"].max() <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# the plan of a run, and the pieces of one shard's work


def small_plan(**changes) -> CausalPlan:
    interventions = tuple(parse_interventions(["replay", "null:effective", "ablate", "minimality:effective:k=2"]))
    fields = dict(
        interventions=interventions,
        scopes=("all", "head"),
        layer_interventions=(),
        head_interventions=(interventions[2],),
        scope_examples=3,
        targets=tuple(targets_for(["all", "head"], 1, 2)),
        seed=4,
        store_identity={"weights_digest": "sha256:ab", "efficient_settings": {"effective": {"k": 1}}},
    )
    return CausalPlan(**{**fields, **changes})


def test_the_plan_is_stored_as_the_settings_results_have_always_had():
    plan = small_plan()
    attribute = plan.as_attribute()
    expected = (
        '{"interventions": ["replay", "null:effective", "ablate", "minimality:effective:k=2"], "scopes": ["all", '
        '"head"], "scope_interventions": {"all": ["replay", "null:effective", "ablate", "minimality:effective:k=2"], '
        '"layer": [], "head": ["ablate"]}, "scope_examples": 3, "targets": [{"name": "all", "scope": "all", "layer": '
        '-1, "head": -1}, {"name": "layer 0 head 0", "scope": "head", "layer": 0, "head": 0}, {"name": "layer 0 head '
        '1", "scope": "head", "layer": 0, "head": 1}], "seed": 4, "store_identity": {"weights_digest": "sha256:ab", '
        '"efficient_settings": {"effective": {"k": 1}}}}'
    )
    assert json.dumps(attribute) == expected  # the same keys in the same order: stored results stay comparable
    again = CausalPlan.from_attribute(json.loads(expected))
    assert again == plan and again.as_attribute() == attribute
    assert again.interventions[3].variant is variant_record("effective")


def test_the_plan_says_what_is_measured_where_and_what_is_read():
    plan = small_plan()
    assert [(item.name, scopes) for item, scopes in plan.scope_plan()] == [
        ("replay", [("all", [0])]),
        ("null:effective", [("all", [0])]),
        ("ablate", [("all", [0]), ("head", [1, 2])]),
        ("minimality:effective:k=2", [("all", [0])]),
    ]
    assert plan.efficient_variants() == ["effective"]  # minimality recomputes its projection
    assert plan.target_masks(1, 2).tolist() == [[[True, True]], [[True, False]], [[False, True]]]
    only_heads = small_plan(scopes=("head",))
    assert [item.name for item, _ in only_heads.scope_plan()] == ["ablate"]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "--head-interventions ['uniform'] are not among the interventions run: ['replay', 'null:effective', "
            "'ablate', 'minimality:effective:k=2']"
        ),
    ):
        small_plan(head_interventions=(Intervention("uniform"),))


def test_forward_groups_cover_every_pair_once_within_the_rows():
    for examples_count, targets_count, rows in [(5, 9, 3), (4, 1, 64), (7, 3, 7), (1, 10, 4), (6, 6, 1), (3, 0, 2)]:
        examples = np.arange(10, 10 + examples_count)
        targets = list(range(100, 100 + targets_count))
        pairs = []
        for chosen, group_targets in forward_groups(examples, targets, rows):
            assert 0 < len(chosen) * len(group_targets) <= rows
            pairs += [(int(e), int(t)) for t in group_targets for e in chosen]
        assert sorted(pairs) == sorted((e, t) for e in examples for t in targets)
    assert [(c.tolist(), t.tolist()) for c, t in forward_groups(np.arange(3), [0, 1, 2, 3], 6)] == [
        ([0, 1, 2], [0, 1]),
        ([0, 1, 2], [2, 3]),
    ]  # as many targets per pass as fit


def test_long_passes_take_fewer_rows_within_the_same_attention_budget():
    assert [rows_per_pass(64, length) for length in (12, 128, 129, 256, 512, 4096)] == [64, 64, 63, 16, 4, 1]
    for length in (200, 300, 512, 1000):  # rows x L² stays within forward_rows x REFERENCE_LENGTH²
        assert rows_per_pass(64, length) * length**2 <= 64 * REFERENCE_LENGTH**2
    length = np.array([30, 40, 512, 500, 128])
    passes = list(forward_groups(np.array([0, 1, 4]), list(range(10)), 64, length))  # short: 3 examples x 10 targets
    assert [(c.tolist(), len(t)) for c, t in passes] == [([0, 1, 4], 10)]
    passes = list(forward_groups(np.array([0, 2, 3]), list(range(10)), 64, length))  # 512 positions: 4 rows a pass
    assert all(len(c) * len(t) <= 4 for c, t in passes)
    assert [(c.tolist(), t.tolist()) for c, t in passes][:2] == [([0, 2, 3], [0]), ([0, 2, 3], [1])]
    assert sorted((int(e), int(t)) for c, ts in passes for t in ts for e in c) == sorted(
        (e, t) for e in (0, 2, 3) for t in range(10)
    )


def hand_batch(**changes) -> CausalBatch:
    fields = dict(
        start=8,
        tokens=np.array([[5, 6, 7, 0], [5, 6, 0, 0], [7, 7, 7, 7]]),
        length=np.array([3, 2, 4]),
        attention=np.zeros((3, 1, 1, 4, 4)),
        value=np.zeros((3, 1, 1, 4, 2)),
        stored_logits=np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]], dtype=np.float32),
        label=np.array([0, 0, -1]),
    )
    return CausalBatch(**{**fields, **changes})


def test_a_batch_knows_its_examples_and_which_are_measured_per_scope():
    batch = hand_batch()
    assert batch.example_indices.tolist() == [8, 9, 10]
    assert batch.examples_at("all", set()).tolist() == [0, 1, 2]
    assert batch.examples_at("layer", {1, 9, 10}).tolist() == [1, 2]
    assert batch.examples_at("head", {0, 4}).tolist() == []


def test_classification_batch_metrics_compare_with_the_stored_logits():
    batch = hand_batch()
    metrics = BatchMetrics(batch, "classification")
    intervened = torch.tensor([[[0.0, 5.0], [4.0, 0.0]]])  # 1 target, examples at positions 0 and 2
    measured = metrics.measure(intervened, np.array([0, 2]))
    expected = classification_metrics(
        batch.stored_logits[[0, 2]], batch.stored_logits[[0, 2]], intervened, batch.label[[0, 2]]
    )
    assert measured.keys() == expected.keys() == set(METRICS)
    for name in METRICS:
        np.testing.assert_array_equal(measured[name], expected[name])
    np.testing.assert_array_equal(measured["agreement"], [[0, 0]])  # argmax 1 vs 0, 0 vs 1
    np.testing.assert_allclose(measured["max_abs_logit_change"], [[5, 3]])
    correct = metrics.original_correct()  # stored argmax 0, 1, 1 against labels 0, 0, unknown
    assert correct[:2].tolist() == [1, 0] and np.isnan(correct[2])


def test_next_token_batch_metrics_compare_with_the_original_model():
    # 2 examples (3 and 2 real tokens), vocabulary 4; the original model predicts the next token, except at
    # position 1 of example 0 (token 0 instead of 3)
    tokens = np.array([[1, 2, 3, 0], [3, 1, 0, 0]])
    original = torch.full((2, 3, 4), -5.0)
    for row, sequence in enumerate(tokens):
        for position in range(3):
            original[row, position, sequence[position + 1]] = 5.0
    original[0, 1] = torch.tensor([5.0, -5, -5, -5])
    top = torch.topk(original, 2, dim=-1)
    batch = hand_batch(
        start=0,
        tokens=tokens,
        length=np.array([3, 2]),
        label=None,
        stored_logits=top.values.numpy(),
        stored_logit_ids=top.indices.numpy(),
    )
    metrics = BatchMetrics(batch, "next-token", original)
    # positions with a next token: 2 of example 0 (tokens 2, 3: one predicted), 1 of example 1 (token 1)
    np.testing.assert_allclose(metrics.original_correct(), [0.5, 1.0])
    intervened = original[[1]][None, :, :2].clone()  # only example 1, trimmed to its 2 tokens
    intervened[0, 0, 0] = torch.tensor([9.0, 0, 0, 0])
    measured = metrics.measure(intervened, np.array([1]))
    expected = next_token_metrics(
        original[[1]], batch.stored_logits[[1]], batch.stored_logit_ids[[1]], intervened, tokens[[1]], np.array([2])
    )
    for name in METRICS:
        np.testing.assert_array_equal(measured[name], expected[name])
    np.testing.assert_allclose(measured["agreement"], [[0.5]])  # position 0 changed, position 1 kept
    np.testing.assert_allclose(measured["correct"], [[0.0]])


def test_targets_of_a_selection_carry_the_models_layer_and_head_numbers():
    targets = targets_for(["all", "layer", "head"], (0, 3), (1, 2))
    assert [target.name for target in targets] == [
        "all",
        "layer 0",
        "layer 3",
        "layer 0 head 1",
        "layer 0 head 2",
        "layer 3 head 1",
        "layer 3 head 2",
    ]
    # masks are over the stored layers and heads: model layer 3 is stored layer 1, model head 2 stored head 1
    assert Target("layer", 3).mask((0, 3), (1, 2)).tolist() == [[False, False], [True, True]]
    assert Target("head", 3, 2).mask((0, 3), (1, 2)).tolist() == [[False, False], [False, True]]
    assert Target("all").mask((0, 3), (1, 2)).all()


def test_injection_into_a_selection_is_the_same_injection_into_the_model():
    """Stored (layer 1; heads 2, 3) of the tiny Llama: injecting there changes the logits exactly as injecting the
    same matrices at those model heads with everything stored; the model's other layer and heads run unchanged."""
    loaded, tokens, shard, w_out, efficient = captured(tiny_llama)
    matrices = intervention_matrices(Intervention("uniform"), shard.attention, shard.value, w_out, LENGTHS, True)
    full_masks = np.zeros((2, 2, 4), dtype=bool)
    full_masks[0, 1, 2:] = True  # both heads of the selection
    full_masks[1, 1, 3] = True  # one of them
    expected = intervened_logits(loaded, tokens, LENGTHS, matrices, full_masks)
    stored = matrices[:, [1]][:, :, [2, 3]]  # what a store of --layers 1 --heads 2,3 holds
    masks = np.stack([Target("layer", 1).mask((1,), (2, 3)), Target("head", 1, 3).mask((1,), (2, 3))])
    chosen = intervened_logits(loaded, tokens, LENGTHS, stored, masks, layers=(1,), heads=(2, 3))
    torch.testing.assert_close(chosen, expected, atol=1e-6, rtol=0)
    assert (chosen - torch.as_tensor(shard.logits)).abs().max() > 1e-4  # the injection does change the logits
    with pytest.raises(
        ValueError, match="target masks for 1 layers x 2 heads, but the selection names 1 layers and 3 heads"
    ):
        intervened_logits(loaded, tokens, LENGTHS, stored, masks, layers=(1,), heads=(1, 2, 3))


def test_the_injected_change_ratio_is_the_frobenius_distance_over_every_layer_and_head_relative_to_attention():
    generator = np.random.default_rng(3)
    attention = generator.random((3, 2, 4, 7, 7)).astype(np.float16)  # as a float16 store holds it
    attention[2] = 0  # no attention at all: the ratio is the distance itself
    injected = (attention + generator.normal(scale=0.1, size=attention.shape)).astype(np.float32)
    injected[0] = attention[0]  # replay
    expected = [
        np.linalg.norm((injected[e].astype(np.float64) - attention[e]).ravel())
        / (np.linalg.norm(attention[e].astype(np.float64).ravel()) or 1.0)
        for e in range(3)
    ]
    ratio = injected_change_ratio(injected, attention)
    assert ratio.dtype == np.float32 and ratio[0] == 0
    np.testing.assert_allclose(ratio, expected, rtol=1e-6)


def test_aggregates_of_parts_along_the_examples_equal_those_of_the_whole():
    generator = np.random.default_rng(5)
    names = ("agreement", "flipped", "max_abs_logit_change", "kl_divergence", "correct", "stored_logit_difference")
    metrics = {name: generator.random((3, 4, 10)).astype(np.float32) for name in names}
    for values in metrics.values():
        values[generator.random(values.shape) < 0.4] = np.nan  # unmeasured examples
        values[1, 2] = np.nan  # a target never measured
    metrics["correct"][0, 0, :5] = np.nan  # a metric with fewer examples than agreement
    parts = [
        {name: values[:, :, part] for name, values in metrics.items()}
        for part in (slice(0, 3), slice(3, 4), slice(4, 10))
    ]
    aggregates = aggregate_metric_parts(parts)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        expected = {
            "agreement_rate": np.nanmean(metrics["agreement"].astype(np.float64), -1),
            "accuracy": np.nanmean(metrics["correct"].astype(np.float64), -1),
            "largest_logit_change": np.nanmax(metrics["max_abs_logit_change"], -1),
            "examples_measured": (~np.isnan(metrics["agreement"])).sum(-1),
        }
    for name, values in expected.items():
        np.testing.assert_allclose(aggregates[name], values, rtol=1e-12, equal_nan=True)
    assert np.isnan(aggregates["agreement_rate"][1, 2]) and np.isnan(aggregates["largest_logit_change"][1, 2])
    whole = aggregate_metrics(metrics)
    for name in whole:
        np.testing.assert_allclose(aggregates[name], whole[name], rtol=1e-12, equal_nan=True)
