"""analysis.attention_backend: registration, capture context, and errors that say what to do."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from analysis.attention_backend import (
    ATTENTION_IMPLEMENTATION,
    AttentionRecorder,
    capture_attention,
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
