"""analysis/explanations.py: attributions, ERASER faithfulness and rank agreement, on a model whose answer is known
by construction and on the tiny random BERT."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.aggregations import aggregation_layers, attention_rollout, matrix_attributions
from analysis.architectures import adapter_for
from analysis.example_explanation import explain_example
from analysis.explainers import ExplanationSettings
from analysis.explanations import (
    draw_examples,
    efficient_differences,
    faithfulness,
    gradient_attributions,
    kendall_tau,
    kept_token_probabilities,
    norm_attributions,
    norm_matrix,
    predicted_target,
    random_attributions,
    ranked_removable,
    removable_tokens,
    removal_count,
    removal_token_id,
)
from analysis.models import LoadedModel, ModelShape, wrap_model
from tests.conftest import bundled_tokenizer, tiny_bert

DECISIVE = 4569  # the one token the known-by-construction model reads ("fun" in the MiniLM vocabulary)


class OneTokenModel(torch.nn.Module):
    """Class 1's logit is 4 x (occurrences of DECISIVE that the attention mask lets in); class 0's is 0. Its only
    non-zero embedding is DECISIVE's, so every other token is irrelevant by construction."""

    def __init__(self, vocabulary: int = 30522):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary, 2)
        with torch.no_grad():
            self.embedding.weight.zero_()
            self.embedding.weight[DECISIVE] = torch.tensor([0.0, 4.0])
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0]))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embedding

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        embedded = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(embedded.shape[:2])
        return SimpleNamespace(logits=(embedded * attention_mask[..., None].to(embedded.dtype)).sum(1) + self.bias)


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def one_token_model(tokenizer) -> LoadedModel:
    return LoadedModel(
        name="one-token",
        source="test",
        adapter=adapter_for("bert"),
        causal=False,
        sliding_windows=(None,),
        model=OneTokenModel().eval(),
        tokenizer=tokenizer,
        shape=ModelShape(1, 1, 1, 1, 2),
        weights_digest="sha256:0",
        device="cpu",
    )


@pytest.fixture(scope="module")
def bert(tokenizer) -> LoadedModel:
    return wrap_model(tiny_bert(), tokenizer, "tiny-bert")


def encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text)["input_ids"])


def _direct_norm_matrix(weights, value, w_out):
    """N[i, j] = ||sum_h weights[h, i, j] v^{kv(h)}_j W_O^h||, one head and one pair of tokens at a time."""
    heads, length, _ = weights.shape
    groups = heads // value.shape[0]
    result = np.zeros((length, length))
    for i in range(length):
        for j in range(length):
            total = np.zeros(w_out.shape[-1])
            for head in range(heads):
                total += weights[head, i, j] * (value[head // groups, j] @ w_out[head])
            result[i, j] = np.linalg.norm(total)
    return result


def test_norm_based_attention_equals_a_direct_loop_and_chunks_change_nothing():
    rng = np.random.default_rng(4)
    layers, heads, kv_heads, length, head_dim, hidden = 2, 4, 2, 9, 3, 5
    scores = rng.normal(size=(layers, heads, length, length))
    weights = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    weights[..., 0, 1] -= 0.3  # E can be negative: the norm does not care
    value = rng.normal(size=(layers, kv_heads, length, head_dim))
    w_out = rng.normal(size=(layers, heads, head_dim, hidden))
    direct = np.stack([_direct_norm_matrix(weights[layer], value[layer], w_out[layer]) for layer in range(layers)])
    for chunk_rows in (1, 4, 64):
        chunked = norm_matrix(weights[1], value[1], w_out[1], chunk_rows=chunk_rows)
        np.testing.assert_allclose(chunked, direct[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        norm_matrix(weights[0], value[0], w_out[0], rows=np.array([3])), direct[0][[3]], rtol=1e-10
    )
    np.testing.assert_allclose(norm_attributions(weights, value, w_out, 2, "last-layer"), direct[1][2], rtol=1e-10)
    np.testing.assert_allclose(
        norm_attributions(weights, value, w_out, 2, "all-layers"), direct[:, 2].mean(0), rtol=1e-10
    )
    normalised = direct / direct.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        norm_attributions(weights, value, w_out, 2, "rollout"), attention_rollout(normalised)[2], rtol=1e-10
    )


def test_efficient_differences_count_only_heads_with_a_null_space():
    attention = np.full((2, 2, 3, 3), 1 / 3)
    efficient = attention.copy()
    efficient[0, 1, 0, 0] += 0.2  # layer 0, head 1 differs
    efficient[1, 0, 2, 2] += 0.5  # layer 1, head 0 differs but has no null space: storage noise by definition
    null_dim = np.array([[0, 1], [0, 3]])
    np.testing.assert_allclose(efficient_differences(attention, efficient, null_dim), [0.2, 0.0])
    assert aggregation_layers("last-layer", 3) == [2] and aggregation_layers("rollout", 3) == [0, 1, 2]


def test_the_draw_is_seeded_reproducible_and_takes_only_candidates():
    candidates = np.zeros(100, dtype=bool)
    candidates[::3] = True
    drawn = draw_examples(candidates, 10, seed=7)
    assert len(drawn) == 10 and candidates[drawn].all() and (np.diff(drawn) > 0).all()
    assert draw_examples(candidates, 10, seed=7).tolist() == drawn.tolist()
    assert draw_examples(candidates, 10, seed=8).tolist() != drawn.tolist()
    assert draw_examples(candidates, 500, seed=7).tolist() == np.flatnonzero(candidates).tolist()
    assert draw_examples(candidates, None, seed=7).tolist() == np.flatnonzero(candidates).tolist()


def test_special_tokens_and_the_pooled_position_are_never_removable(tokenizer):
    tokens = encode(tokenizer, "a fun film")  # [CLS] a fun film [SEP]
    removable = removable_tokens(tokens, tokenizer.all_special_ids, pooled=0)
    assert removable.tolist() == [False, True, True, True, False]
    decoder = removable_tokens(np.array([5, 6, 7]), [], pooled=2)
    assert decoder.tolist() == [True, True, False]
    assert removal_token_id(tokenizer) == tokenizer.mask_token_id


def test_removal_counts_and_ranking():
    assert [removal_count(k, 10) for k in (1, 5, 10, 20, 50, 100)] == [1, 1, 1, 2, 5, 10]
    assert removal_count(50, 0) == 0
    order = ranked_removable(np.array([9.0, 0.1, np.nan, 0.5, 0.5]), np.array([False, True, True, True, True]))
    assert order.tolist() == [3, 4, 1, 2]  # the non-removable 9.0 is skipped; ties by position; NaN last


def test_rollout_of_identity_attention_is_the_identity_and_multiplies_layers_in_order():
    identity = np.broadcast_to(np.eye(5), (3, 5, 5))
    np.testing.assert_array_equal(attention_rollout(identity), np.eye(5))
    rng = np.random.default_rng(0)
    layers = rng.random((2, 4, 4))
    layers /= layers.sum(-1, keepdims=True)
    first, second = (0.5 * layers[i] + 0.5 * np.eye(4) for i in range(2))
    np.testing.assert_allclose(attention_rollout(layers), second @ first)
    assert not np.allclose(second @ first, first @ second)  # the order matters, so the check above can fail
    np.testing.assert_allclose(attention_rollout(layers).sum(-1), 1.0)


def test_matrix_attributions_read_the_pooled_row():
    rng = np.random.default_rng(1)
    matrices = rng.random((2, 3, 4, 4))  # [layer, head, L, L]
    np.testing.assert_allclose(matrix_attributions(matrices, 2, "last-layer"), matrices[1, :, 2].mean(0))
    np.testing.assert_allclose(matrix_attributions(matrices, 0, "all-layers"), matrices[:, :, 0].mean((0, 1)))
    np.testing.assert_allclose(matrix_attributions(matrices, 1, "rollout"), attention_rollout(matrices.mean(1))[1])


def test_kendall_tau_agrees_reverses_and_is_undefined_on_constants():
    removable = np.array([False, True, True, True, True])
    scores = np.array([7.0, 1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(scores, scores * 3, removable) == pytest.approx(1.0)
    assert kendall_tau(scores, -scores, removable) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau(scores, np.ones(5), removable))
    assert np.isnan(kendall_tau(scores, np.full(5, np.nan), removable))


def test_leave_one_out_and_comprehensiveness_find_the_decisive_token_and_random_does_not(one_token_model, tokenizer):
    tokens = encode(tokenizer, "the acting is good and the story is fun to watch today")
    position = int(np.flatnonzero(tokens == DECISIVE)[0])
    settings = ExplanationSettings(methods=("leave-one-out", "random"), examples=(0,))
    found = explain_example(one_token_model, tokens, {}, settings, example_index=0, causal=False)
    loo, random = found.attributions
    assert found.target == 1
    assert np.nanargmax(loo) == position
    assert np.nanmax(np.delete(loo, position)) == pytest.approx(0.0, abs=1e-12)  # no other token matters
    drop = found.full_probability - 1 / (1 + np.exp(1.0))  # without the token: logits (1, 0)
    comprehensiveness = found.faithfulness["comprehensiveness"]  # [method, k]; k = 1 % removes one token
    assert comprehensiveness[0, 0] == pytest.approx(drop)
    assert drop > 0.5
    # random rankings over many seeds put the decisive token first about 1 / removable of the time
    firsts = []
    for seed in range(40):
        scores = random_attributions(len(tokens), seed, 0)
        firsts.append(ranked_removable(scores, found.removable)[0] == position)
    assert 0 < np.mean(firsts) < 0.3
    seed = firsts.index(False)
    other = explain_example(
        one_token_model, tokens, {}, ExplanationSettings(("random",), (0,), seed=seed), example_index=0, causal=False
    )
    assert other.faithfulness["comprehensiveness"][0, 0] == pytest.approx(0.0, abs=1e-12)


def test_comprehensiveness_at_100_percent_is_the_drop_to_the_empty_input_and_sufficiency_is_zero(bert, tokenizer):
    tokens = encode(tokenizer, "a dull, overlong mess that wastes every one of its talented performers")
    removable = removable_tokens(tokens, tokenizer.all_special_ids, 0)
    target = predicted_target(bert, tokens, 0)
    replacement = removal_token_id(tokenizer)

    def score(keep):
        return kept_token_probabilities(bert, tokens, keep, 0, target, replacement)

    rng = np.random.default_rng(0)
    attributions = {"first": rng.random(len(tokens)), "second": rng.random(len(tokens))}
    measured = faithfulness(score, attributions, removable, (10, 100))
    # the empty input, built by hand: removable ids -> [MASK] with attention 0 there
    ids = torch.as_tensor(np.where(removable, tokenizer.mask_token_id, tokens))[None]
    with torch.inference_mode():
        full = torch.softmax(bert.model(input_ids=torch.as_tensor(tokens)[None]).logits.double(), -1)[0, target]
        empty = torch.softmax(
            bert.model(input_ids=ids, attention_mask=torch.as_tensor(~removable).long()[None]).logits.double(), -1
        )[0, target]
        masked_but_attended = torch.softmax(bert.model(input_ids=ids).logits.double(), -1)[0, target]
    assert abs(float(empty - masked_but_attended)) > 1e-6  # attention kept off the removed tokens matters
    np.testing.assert_allclose(measured["comprehensiveness"][:, 1], float(full - empty), atol=1e-6)
    np.testing.assert_array_equal(measured["sufficiency"][:, 1], 0.0)
    assert measured["empty"] == pytest.approx(float(empty), abs=1e-6)
    assert not np.allclose(measured["comprehensiveness"][:, 0], measured["comprehensiveness"][:, 1])


def test_integrated_gradients_are_complete_within_the_recorded_delta(bert, tokenizer):
    tokens = encode(tokenizer, "funny, warm and surprisingly moving from the first scene")
    removable = removable_tokens(tokens, tokenizer.all_special_ids, 0)
    target = predicted_target(bert, tokens, 0)
    replacement = removal_token_id(tokenizer)
    found = gradient_attributions(bert, tokens, removable, 0, target, replacement, steps=32)
    # f(x) and f(baseline) computed here, independently of the function under test
    embedding = bert.model.get_input_embeddings()
    ids = torch.as_tensor(tokens)[None]
    with torch.no_grad():
        baseline = torch.where(
            torch.as_tensor(removable)[None, :, None], embedding(torch.full_like(ids, replacement)), embedding(ids)
        )
        f_input = torch.softmax(bert.model(input_ids=ids).logits.double(), -1)[0, target].item()
        f_baseline = torch.softmax(bert.model(inputs_embeds=baseline).logits.double(), -1)[0, target].item()
    assert found.f_input == pytest.approx(f_input, abs=1e-6)
    assert found.f_baseline == pytest.approx(f_baseline, abs=1e-6)
    total = found.integrated_gradients.sum()
    assert abs(total - (f_input - f_baseline)) <= abs(found.delta) + 1e-6
    assert abs(found.delta) <= 0.05 * abs(f_input - f_baseline) + 1e-6  # 32 Gauss-Legendre steps converge here
    np.testing.assert_allclose(found.integrated_gradients[~removable], 0.0, atol=1e-9)  # baseline = input there
    assert np.abs(found.input_x_gradient).max() > 0


def test_a_method_without_scores_gets_no_faithfulness_and_settings_are_checked():
    removable = np.array([False, True, True, True])
    calls = []

    def score(keep):
        calls.append(len(keep))
        return keep.sum(-1) / 4.0  # the probability grows with the tokens kept

    measured = faithfulness(
        score, {"capped": np.full(4, np.nan), "ranked": np.array([0, 3.0, 2.0, 1.0])}, removable, (1, 100)
    )
    assert np.isnan(measured["comprehensiveness"][0]).all() and np.isnan(measured["sufficiency"][0]).all()
    np.testing.assert_allclose(measured["comprehensiveness"][1], [0.25, 0.75])
    # one call over the distinct masks: full, empty, and "ranked" at 1 % (at 100 % its masks are the empty and the
    # full input again)
    assert calls == [4]


def test_a_language_model_scores_only_the_pooled_last_position_with_the_same_logits(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from analysis.explanations import pooled_logits
    from tests.conftest import TINY_SIZES

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30522, num_key_value_heads=2, pad_token_id=0, **TINY_SIZES))
    loaded = wrap_model(model, tokenizer, "tiny-lm", task="next-token")
    ids = torch.as_tensor(encode(tokenizer, "a quiet triumph of patient acting"))[None]
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0]
        last = pooled_logits(loaded, ids.shape[1] - 1, input_ids=ids)
        inner = pooled_logits(loaded, 2, input_ids=ids)
    assert last.shape == (1, 30522)
    torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inner[0], full[2])
