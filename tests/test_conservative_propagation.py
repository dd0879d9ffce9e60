"""analysis/conservative_propagation.py: with biases and position embeddings zero, the relevances of conservative
propagation add up to the explained logit (a tiny random BERT and Llama); letting gradients through the softmax
breaks that."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from analysis import conservative_propagation
from analysis.conservative_propagation import conservative_relevance, conservative_rules
from analysis.models import wrap_model
from tests.conftest import bundled_tokenizer, tiny_bert, tiny_llama

CONSERVATION_TOLERANCE = 1e-4  # |sum of relevances - logit| / |logit|, float32 forward and backward


def _without_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every bias and the additive position / token-type embeddings: then nothing but the input embeddings
    reaches the logit, and the relevances must add up to it. Queries and keys are scaled up (random init gives
    nearly uniform attention, whose softmax barely bends the gradient), and the classifier too (a logit of order 1)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                parameter.zero_()
            elif any(part in name for part in ("query.weight", "key.weight", "q_proj.weight", "k_proj.weight")):
                parameter.mul_(8.0)
            elif any(part in name for part in ("classifier.weight", "score.weight")):
                parameter.mul_(50.0)
    return model


@pytest.fixture(scope="module", params=["bert", "llama"])
def loaded(request):
    tokenizer = bundled_tokenizer()
    model = tiny_bert(seed=3) if request.param == "bert" else tiny_llama(seed=3)
    return wrap_model(_without_biases(model), tokenizer, f"tiny-{request.param}")


def _relevance(loaded, tokens: np.ndarray):
    ids = torch.as_tensor(tokens)[None]
    pooled = len(tokens) - 1 if loaded.causal else 0
    embeddings = loaded.model.get_input_embeddings()(ids)

    def logit(inputs_embeds):
        logits = loaded.model(inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(ids)).logits
        return (logits[0, pooled] if logits.ndim == 3 else logits[0])[1]

    return conservative_relevance(loaded.model, logit, embeddings)


TOKENS = np.array([101, 2023, 3185, 2001, 2200, 4569, 1998, 2200, 2146, 2000, 3422, 1012, 102])


def test_relevances_add_up_to_the_logit(loaded):
    relevances, logit = _relevance(loaded, TOKENS)
    assert relevances.shape == (len(TOKENS),)
    assert abs(logit) > 0.1
    assert abs(relevances.sum() - logit) <= CONSERVATION_TOLERANCE * abs(logit)
    assert np.ptp(relevances) > 0  # not a constant spread of the logit


def test_letting_gradients_through_the_softmax_breaks_conservation(loaded, monkeypatch):
    monkeypatch.setattr(conservative_propagation, "attention_held_constant", contextlib.nullcontext)
    relevances, logit = _relevance(loaded, TOKENS)
    assert abs(relevances.sum() - logit) > 100 * CONSERVATION_TOLERANCE * abs(logit)


def test_the_rules_keep_the_forward_values_and_reach_every_norm_and_activation(loaded):
    ids = torch.as_tensor(TOKENS)[None]
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
    with torch.no_grad(), conservative_rules(loaded.model) as ruled:
        held = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(held, plain, rtol=1e-5, atol=1e-6)
    norms = sum(
        isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for module in loaded.model.modules()
    )
    assert ruled >= norms + loaded.model.config.num_hidden_layers  # every norm and each layer's activation


def test_the_rules_reach_only_the_thread_that_asked_for_them(loaded):
    """A model shared by a Dask worker's threads: while one thread is inside the rules, another thread's
    backward pass keeps the plain gradients."""
    import threading

    ids = torch.as_tensor(TOKENS)[None]

    def plain_gradient():
        embeddings = loaded.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = loaded.model(inputs_embeds=embeddings).logits
        (logits[0, -1, 1] if logits.ndim == 3 else logits[0, 1]).backward()
        return embeddings.grad.clone()

    expected = plain_gradient()
    found = {}
    inside = threading.Event()
    leave = threading.Event()

    def hold_the_rules():
        with conservative_rules(loaded.model):
            inside.set()
            leave.wait(timeout=30)

    holder = threading.Thread(target=hold_the_rules)
    holder.start()
    inside.wait(timeout=30)
    try:
        found["gradient"] = plain_gradient()
    finally:
        leave.set()
        holder.join()
    torch.testing.assert_close(found["gradient"], expected)
