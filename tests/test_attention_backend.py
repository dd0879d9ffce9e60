"""analysis.attention_backend: registration, capture context, and errors that say what to do."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from analysis.attention_backend import (
    ATTENTION_IMPLEMENTATION,
    AttentionInjection,
    AttentionRecorder,
    LayerInjection,
    capture_attention,
    inject_attention,
    use_capture_backend,
)
from tests.conftest import tiny_bert, tiny_llama


def test_backend_registers_attention_and_mask_functions():
    assert ATTENTION_IMPLEMENTATION in AttentionInterface._global_mapping
    # without the mask registration the model would silently attend to padding
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_IMPLEMENTATION] is eager_mask


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_capture_records_every_layer_once_and_only_inside_the_context(make_model):
    model = make_model()
    use_capture_backend(model)
    input_ids = torch.randint(1, 1000, (2, 12))
    with torch.no_grad(), capture_attention() as recorder:
        model(input_ids=input_ids)
    assert sorted(recorder.layers) == [0, 1]
    captured = recorder.ordered(2)[0]
    assert captured.attention.shape == (2, 4, 12, 12)
    kv_heads = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else 4
    assert captured.value.shape == (2, kv_heads, 12, 8)
    with torch.no_grad():
        model(input_ids=input_ids)  # outside the context: nothing recorded, no error
    assert sorted(recorder.layers) == [0, 1]


def test_padding_mask_reaches_the_attention_function():
    model = tiny_bert()
    use_capture_backend(model)
    input_ids = torch.randint(1, 1000, (1, 10))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    with torch.no_grad(), capture_attention() as recorder:
        model(input_ids=input_ids, attention_mask=mask)
    assert recorder.layers[0].attention[0, :, :, 6:].abs().max() == 0


def test_recorder_errors_name_the_problem():
    recorder = AttentionRecorder()
    recorder.record(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 1))
    with pytest.raises(RuntimeError, match="layer 0 was captured twice in one forward pass"):
        recorder.record(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 1))
    with pytest.raises(RuntimeError, match=r"no attention was captured for layers \[1, 2\]: is the model using"):
        recorder.ordered(3)


def test_model_without_backend_records_nothing():
    model = tiny_bert()
    model.set_attn_implementation("eager")
    with torch.no_grad(), capture_attention() as recorder:
        model(input_ids=torch.randint(1, 1000, (1, 5)))
    assert recorder.layers == {}


def _injection_for(layer: int, replacement, replace, length: list[int], size: int) -> AttentionInjection:
    real = torch.arange(size)[None, :] < torch.tensor(length)[:, None]
    return AttentionInjection(
        {layer: LayerInjection(replacement, replace, (real[:, :, None] & real[:, None, :])[:, None])}
    )


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_injection_replaces_only_the_chosen_heads_on_the_real_block(make_model):
    model = make_model()
    use_capture_backend(model)
    input_ids = torch.randint(1, 1000, (2, 10))
    mask = torch.ones_like(input_ids)
    mask[1, 7:] = 0
    with torch.no_grad(), capture_attention() as original:
        model(input_ids=input_ids, attention_mask=mask)
    replacement = torch.full((2, 4, 10, 10), 0.5)
    replace = torch.tensor([[[False, True, False, False], [False, True, False, False]]])  # 1 copy, head 1
    injection = _injection_for(0, replacement, replace, [10, 7], 10)
    with torch.no_grad(), inject_attention(injection), capture_attention() as injected:
        model(input_ids=input_ids, attention_mask=mask)
    before, after = original.layers[0].attention, injected.layers[0].attention
    assert torch.equal(after[:, [0, 2, 3]], before[:, [0, 2, 3]])  # other heads untouched
    assert (after[0, 1] == 0.5).all()
    assert (after[1, 1, :7, :7] == 0.5).all()
    assert torch.equal(after[1, 1, 7:], before[1, 1, 7:])  # padding rows untouched
    assert torch.equal(after[1, 1, :, 7:], before[1, 1, :, 7:])  # padding keys untouched (zero)
    with torch.no_grad(), capture_attention() as later:
        model(input_ids=input_ids, attention_mask=mask)  # outside the context: the model is itself again
    assert torch.equal(later.layers[0].attention, before)


def test_injection_copies_each_replace_their_own_heads():
    model = tiny_bert()
    use_capture_backend(model)
    input_ids = torch.randint(1, 1000, (1, 9)).repeat(2, 1)  # copy 0 and copy 1 of a batch of one
    replacement = torch.zeros((1, 4, 9, 9))
    replace = torch.tensor([[[True, False, False, False]], [[False, False, False, True]]])
    with (
        torch.no_grad(),
        inject_attention(_injection_for(1, replacement, replace, [9], 9)),
        capture_attention() as recorder,
    ):
        model(input_ids=input_ids)
    weights = recorder.layers[1].attention
    assert (weights[0, 0] == 0).all() and (weights[0, 3] != 0).any()
    assert (weights[1, 3] == 0).all() and (weights[1, 0] != 0).any()


def test_injection_of_the_wrong_batch_says_how_to_repeat_inputs():
    model = tiny_bert()
    use_capture_backend(model)
    injection = _injection_for(0, torch.zeros((2, 4, 6, 6)), torch.ones((1, 2, 4), dtype=torch.bool), [6, 6], 6)
    with (
        torch.no_grad(),
        inject_attention(injection),
        pytest.raises(RuntimeError, match="repeat the inputs copy-major"),
    ):
        model(input_ids=torch.randint(1, 1000, (3, 6)))


def test_unimplemented_argument_is_refused_by_name():
    from analysis.attention_backend import UnsupportedAttentionError, effattn_attention

    module = torch.nn.Module()
    module.layer_idx = 0
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(
        UnsupportedAttentionError,
        match=re.escape("model type 'Module' passes 's_aux' to its attention function (attention sinks"),
    ):
        effattn_attention(module, query, query, query, None, s_aux=torch.zeros(2))
    with pytest.raises(
        UnsupportedAttentionError,
        match="passes 'rope_scale_hint' to its attention function \\(an argument the effattn backend does not know\\)",
    ):
        effattn_attention(module, query, query, query, None, rope_scale_hint=2.0)
    with pytest.raises(
        UnsupportedAttentionError, match="asks for a sliding window of 2 keys but its attention got no mask for 3 keys"
    ):
        effattn_attention(module, query, query, query, None, sliding_window=2)
    with pytest.raises(
        UnsupportedAttentionError,
        match=r"asks for causal attention \(is_causal\) but its "
        "attention got no mask",
    ):
        effattn_attention(module, query, query, query, None, is_causal=True)
    output, _ = effattn_attention(module, query, query, query, None, s_aux=None, position_ids=torch.arange(3))
    assert output.shape == (1, 3, 2, 4)  # None means the feature is off; position bookkeeping is inert


def test_softcap_caps_the_scores_before_the_mask():
    """tanh(scores / cap) * cap, then the mask, then softmax: Gemma 2's eager attention, computed by hand."""
    from analysis.attention_backend import effattn_attention

    module = torch.nn.Module()
    module.layer_idx = 0
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 4) * 3 for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., 4] = torch.finfo(torch.float32).min
    _, weights = effattn_attention(module, query, key, value, mask, scaling=0.5, softcap=2.0)
    scores = torch.tanh(query @ key.transpose(2, 3) * 0.5 / 2.0) * 2.0 + mask
    torch.testing.assert_close(weights, torch.softmax(scores, dim=-1), atol=1e-6, rtol=0)
    _, uncapped = effattn_attention(module, query, key, value, mask, scaling=0.5)
    assert (uncapped - weights).abs().max() > 1e-2  # the cap matters here, so the check above can fail


def test_visible_keys_read_every_mask_form():
    """The keys a mask lets through: additive (lowest value blocks), boolean, key-only (broadcast over the queries,
    as BERT-era models pass padding), none."""
    from analysis.attention_backend import visible_keys

    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    additive = torch.zeros(1, 1, 4, 6).masked_fill(
        ~torch.nn.functional.pad(causal, (0, 2))[None, None], torch.finfo(torch.float32).min
    )
    assert torch.equal(visible_keys(additive, 4, 4), causal)  # sliced to the keys
    assert torch.equal(visible_keys(causal[None, None], 4, 4), causal)
    key_only = torch.tensor([0.0, 0.0, -float("inf")])[None, None, None]
    assert torch.equal(visible_keys(key_only, 2, 3), torch.tensor([[True, True, False]] * 2))
    assert visible_keys(None, 3, 5).all() and visible_keys(None, 3, 5).shape == (3, 5)
