"""analysis.causal: batched intervened forward passes, targets, metrics and aggregates (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.causal import (
    Target,
    aggregate_metrics,
    classification_metrics,
    intervened_logits,
    measured_examples,
    next_token_metrics,
    plain_logits,
    targets_for,
)
from analysis.efficient_attention import efficient_attention
from analysis.extraction import capture_examples
from analysis.interventions import Intervention, intervention_matrices
from analysis.models import output_projection_slices, wrap_model
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


def injected(loaded, tokens, shard, w_out, efficient, name, target=Target("all")):
    intervention = Intervention.parse(name)
    matrices = intervention_matrices(
        intervention, shard.attention, shard.value, w_out, LENGTHS, loaded.causal,
        efficient=efficient[intervention.variant].efficient if intervention.needs_efficient else None,
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
    metrics = next_token_metrics(original, top.values.numpy(), top.indices.numpy(), intervened, tokens,
                                 np.array([3]))
    np.testing.assert_allclose(metrics["agreement"], [[2 / 3]])
    np.testing.assert_array_equal(metrics["flipped"], [[1]])
    np.testing.assert_allclose(metrics["max_abs_logit_change"], [[9]])  # not 99: padding ignored
    # next tokens: position 0 -> 2 (predicted 2: right), position 1 -> 3 (predicted 1: wrong)
    np.testing.assert_allclose(metrics["correct"], [[0.5]])
    # the stored top-2 of position 1 are tokens 3 (5.0) and one zero logit; intervened: 0 and 9 or 0
    assert metrics["stored_logit_difference"][0, 0] >= 5.0


def test_aggregates_ignore_unmeasured_examples():
    agreement = np.array([[[1.0, 0.0, np.nan], [np.nan, np.nan, np.nan]]])  # 1 intervention, 2 targets, 3 examples
    metrics = {name: agreement.copy() for name in
               ("agreement", "flipped", "max_abs_logit_change", "kl_divergence", "correct", "stored_logit_difference")}
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
