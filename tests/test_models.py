"""analysis.models: the registry, families, digests and output-projection slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.models import (
    check_model,
    load_model,
    output_projection_slices,
    weights_digest,
    wrap_model,
)
from tests.conftest import bundled_tokenizer, save_model_folder, tiny_bert, tiny_llama


def test_unknown_model_name_and_non_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'nope': use one of \['minilm', 'smollm2'\] or the path"):
        load_model("nope", num_labels=2)
    with pytest.raises(ValueError, match="is not a Hugging Face model folder \\(it has no config.json\\)"):
        load_model(str(tmp_path), num_labels=2)
    with pytest.raises(ValueError, match="num_labels must be at least 1, got 0"):
        load_model("minilm", num_labels=0)


def test_base_model_folder_gets_a_seeded_head(tmp_path):
    folder = save_model_folder(tiny_bert().bert, tmp_path / "base")  # an encoder without classification head
    first = load_model(str(folder), num_labels=3, seed=1)
    again = load_model(str(folder), num_labels=3, seed=1)
    other_seed = load_model(str(folder), num_labels=3, seed=2)
    assert first.weights_digest == again.weights_digest
    assert first.weights_digest != other_seed.weights_digest  # the 3-class head is new, drawn from the seed
    assert first.model.config.num_labels == 3
    assert first.adapter.name == "bert-encoder" and not first.causal
    assert first.model.config._attn_implementation == "effattn"
    assert first.tokenizer.padding_side == "right"


def test_next_token_needs_a_decoder(tiny_bert_folder, tiny_llama_folder):
    with pytest.raises(
        ValueError, match="next-token prediction needs a decoder \\(causal attention\\), but .* is a bert encoder"
    ):
        load_model(str(tiny_bert_folder), num_labels=2, task="next-token")
    with pytest.raises(ValueError, match="unknown task 'summarise': choose 'classification' or 'next-token'"):
        load_model(str(tiny_bert_folder), num_labels=2, task="summarise")
    language_model = load_model(str(tiny_llama_folder), num_labels=2, task="next-token")
    assert type(language_model.model).__name__ == "LlamaForCausalLM" and language_model.task == "next-token"


def test_check_model_refuses_without_loading_weights(tmp_path, tiny_bert_folder, tiny_llama_folder):
    assert check_model("minilm") == "bert" and check_model("smollm2", "next-token") == "llama"
    assert check_model(str(tiny_bert_folder)) == "bert" and check_model(str(tiny_llama_folder), "next-token") == "llama"
    with pytest.raises(ValueError, match=r"unknown model 'nope': use one of \['minilm', 'smollm2'\]"):
        check_model("nope")
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        check_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"next-token prediction needs a decoder \(causal attention\), but minilm"):
        check_model("minilm", "next-token")
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text('{"model_type": "bloom"}')
    with pytest.raises(
        ValueError,
        match="model type 'bloom' is not supported: its ALiBi attention does not go "
        "through transformers' AttentionInterface",
    ):
        check_model(str(bloom))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    assert check_model(str(gpt2), "next-token") == "gpt2"


def test_trained_head_with_other_class_count_is_refused(tiny_bert_folder):
    trained = load_model(str(tiny_bert_folder), num_labels=2)
    assert trained.model.config.num_labels == 2
    with pytest.raises(ValueError, match="has a classification head with 2 classes, but the corpus has 5"):
        load_model(str(tiny_bert_folder), num_labels=5)


def test_weights_digest_sees_a_single_changed_weight():
    model = tiny_bert()
    before = weights_digest(model)
    with torch.no_grad():
        model.classifier.weight[0, 0] += 1e-3
    assert weights_digest(model) != before


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama])
def test_output_projection_slices_reproduce_the_projection(make_model):
    loaded = wrap_model(make_model(), bundled_tokenizer(), "tiny")
    w_out, out_bias = output_projection_slices(loaded.model, loaded.adapter)
    shape = loaded.shape
    assert w_out.shape == (shape.layers, shape.heads, shape.head_dim, shape.hidden)
    projection = (
        loaded.model.bert.encoder.layer[1].attention.output.dense
        if not loaded.causal
        else loaded.model.model.layers[1].self_attn.o_proj
    )
    per_head = torch.randn(3, shape.heads, shape.head_dim)
    expected = projection(per_head.reshape(3, -1)).detach().numpy()
    rebuilt = np.einsum("nhd,hdk->nk", per_head.numpy(), w_out[1]) + out_bias[1]
    np.testing.assert_allclose(rebuilt, expected, atol=1e-5)


@pytest.mark.integration
def test_bundled_smollm2_is_a_grouped_query_llama():
    from analysis.extraction import capture_examples, plan_extraction

    loaded = load_model("smollm2", num_labels=2)
    assert loaded.adapter.name == "llama-decoder" and loaded.causal
    assert (loaded.shape.layers, loaded.shape.heads, loaded.shape.kv_heads, loaded.shape.head_dim) == (30, 9, 3, 64)
    plan = plan_extraction(["The cat sat on the mat.", "Hello there"], loaded.tokenizer, max_length=32)
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=2)
    assert captured.attention.shape == (2, 30, 9, plan.max_length, plan.max_length)
    assert captured.value.shape == (2, 30, 3, plan.max_length, 64)
    length = plan.length[1]
    np.testing.assert_allclose(captured.attention[1, :, :, :length, :length].sum(-1), 1.0, atol=1e-5)
    assert not np.triu(captured.attention[1, 0, 0], k=1).any()


def test_decoder_classification_refuses_an_example_ending_with_the_pad_id():
    """The head pools the rightmost non-padding token: an example whose last real token is the pad id would be
    pooled at an earlier position, so it is refused; encoders and other examples pass."""
    from analysis.models import check_pooled_positions

    decoder = wrap_model(tiny_llama(), bundled_tokenizer(), "tiny")
    tokens = np.array([[5, 6, 7, 0], [5, 6, 0, 0]])
    check_pooled_positions(decoder, tokens, np.array([3, 2]))
    with pytest.raises(ValueError, match="example 1 ends with token id 0, which is also the padding id"):
        check_pooled_positions(decoder, tokens, np.array([3, 3]))
    encoder = wrap_model(tiny_bert(), bundled_tokenizer(), "tiny")
    check_pooled_positions(encoder, tokens, np.array([3, 3]))  # an encoder pools [CLS]: nothing to check
