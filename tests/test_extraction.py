"""analysis.extraction: the captured tensors are the model's own, padding is excluded, and the attention block's
projected output is rebuilt exactly from what is stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.example_identities import identity_digests
from analysis.extraction import (
    capture_examples,
    plan_extraction,
    real_token_mask,
    rows_to_append,
    select_rows,
    usable_max_length,
)
from analysis.models import attention_output_projections, output_projection_slices, wrap_model
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    create_attention_store,
    mark_prepared,
    open_attention_store,
    write_example_metadata,
    write_shard,
)
from tests.conftest import bundled_tokenizer, tiny_bert, tiny_llama

TEXTS = [
    "a quiet triumph of patient acting and careful direction",
    "dull",
    "a dull, overlong mess that wastes every one of its talented performers and then some more",
    "funny and warm",
    "nothing in this plodding sequel justifies its running time",
]


def value_projection(model, causal: bool, layer: int) -> torch.nn.Linear:
    base = model.base_model
    return base.encoder.layer[layer].attention.self.value if not causal else base.layers[layer].self_attn.v_proj


@pytest.fixture(params=["bert", "llama"])
def loaded(request):
    model = tiny_bert() if request.param == "bert" else tiny_llama()
    return wrap_model(model, bundled_tokenizer(), name=f"tiny-{request.param}")


@pytest.fixture()
def plan(loaded):
    return plan_extraction(TEXTS, loaded.tokenizer, max_length=64)


def test_plan_sorts_by_length_and_pads_right(plan, loaded):
    assert list(plan.length) == sorted(plan.length)
    assert sorted(plan.source_index) == list(range(len(TEXTS)))
    for row, source in enumerate(plan.source_index):
        expected = loaded.tokenizer(TEXTS[source])["input_ids"]
        assert list(plan.tokens[row, : plan.length[row]]) == expected
        assert (plan.tokens[row, plan.length[row] :] == plan.pad_id).all()
    assert plan.max_length == plan.length.max()


def test_plan_truncates_and_records_it(loaded):
    plan = plan_extraction(TEXTS, loaded.tokenizer, max_length=6)
    longest = int(np.argmax(plan.untruncated_length))
    assert plan.length.max() == 6 and plan.max_length == 6
    assert plan.untruncated_length[longest] > 6
    # BERT keeps its final [SEP] after truncation
    if not loaded.causal:
        assert plan.tokens[longest, 5] == loaded.tokenizer.sep_token_id


def test_rows_to_append_keeps_earlier_rows_and_skips_stored_and_repeated_ones():
    identities = identity_digests([f"text {i % 9}" for i in range(12)], [None] * 12)  # rows 9, 10, 11 repeat 0, 1, 2
    candidates = np.array([0, 2, 3, 5, 7, 9, 10, 11])  # 10 repeats row 1, which is not a candidate: it is new
    assert rows_to_append(candidates, identities, identities[:0], None).tolist() == [0, 2, 3, 5, 7, 10]
    assert rows_to_append(candidates, identities, identities[:0], 3).tolist() == [0, 2, 3]
    # the store holds rows 0 and 2: the next ones, and with the limit only as many as it still has room for
    stored = identities[[0, 2]]
    assert rows_to_append(candidates, identities, stored, None).tolist() == [3, 5, 7, 10]
    assert rows_to_append(candidates, identities, stored, 3).tolist() == [3]
    assert rows_to_append(candidates, identities, stored, 2).tolist() == []


def test_a_growing_store_is_padded_to_its_fixed_length(loaded):
    plan = plan_extraction(TEXTS, loaded.tokenizer, max_length=64, pad_to=64)
    assert plan.max_length == 64 and plan.tokens.shape[1] == 64 and plan.length.max() < 64
    with pytest.raises(ValueError, match="pad_to=2 is shorter than the longest selected example"):
        plan_extraction(TEXTS, loaded.tokenizer, max_length=64, pad_to=2)


def test_select_rows_is_a_seeded_sample():
    assert list(select_rows(5, None, 0)) == [0, 1, 2, 3, 4]
    sample = select_rows(100, 10, 0)
    assert len(set(sample)) == 10 and list(sample) == sorted(sample)
    assert list(sample) == list(select_rows(100, 10, 0))
    assert list(sample) != list(select_rows(100, 10, 1))
    with pytest.raises(ValueError, match="--limit must be at least 1, got 0"):
        select_rows(100, 0, 0)


def test_captured_attention_equals_eager_output_attentions(loaded, plan):
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=5)
    model = loaded.model
    input_ids = torch.as_tensor(plan.tokens, dtype=torch.long)
    mask = torch.as_tensor(real_token_mask(plan.length, plan.max_length)).long()
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = model(input_ids=input_ids, attention_mask=mask, output_attentions=True)
    finally:
        from analysis.attention_backend import use_capture_backend

        use_capture_backend(model)
    for example, length in enumerate(plan.length):
        for layer in range(loaded.shape.layers):
            expected = reference.attentions[layer][example, :, :length, :length].numpy()
            np.testing.assert_allclose(captured.attention[example, layer, :, :length, :length], expected, atol=1e-6)
    np.testing.assert_allclose(captured.logits, reference.logits.numpy(), atol=1e-5)


def test_padding_is_excluded_everywhere(loaded, plan):
    batched = capture_examples(loaded, plan.tokens, plan.length, batch_size=5)
    for example, length in enumerate(plan.length):
        assert not batched.attention[example, :, :, length:, :].any()
        assert not batched.attention[example, :, :, :, length:].any()
        assert not batched.value[example, :, :, length:, :].any()
        rows = batched.attention[example, :, :, :length, :length].sum(-1)
        np.testing.assert_allclose(rows, 1.0, atol=1e-5)
        # the same example alone (no padding in its batch) gives the same numbers
        alone = capture_examples(loaded, plan.tokens[example : example + 1], plan.length[example : example + 1], 1)
        np.testing.assert_allclose(batched.attention[example], alone.attention[0], atol=1e-5)
        np.testing.assert_allclose(batched.value[example], alone.value[0], atol=1e-5)
        np.testing.assert_allclose(batched.logits[example], alone.logits[0], atol=1e-5)
    if loaded.causal:
        upper = np.triu(np.ones((plan.max_length, plan.max_length), dtype=bool), k=1)
        assert not batched.attention[..., upper].any()


def test_stored_value_is_the_value_projection_with_bias(loaded, plan):
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=2)
    shape = loaded.shape
    with torch.no_grad():
        for layer in range(shape.layers):
            outputs = []
            handle = value_projection(loaded.model, loaded.causal, layer).register_forward_hook(
                lambda module, inputs, output: outputs.append(output)
            )
            try:
                capture_examples(loaded, plan.tokens, plan.length, batch_size=len(plan.length))
            finally:
                handle.remove()
            projected = outputs[0].reshape(len(plan.length), plan.max_length, shape.kv_heads, shape.head_dim)
            for example, length in enumerate(plan.length):
                expected = projected[example, :length].permute(1, 0, 2).numpy()  # [kv_head, position, head_dim]
                np.testing.assert_allclose(captured.value[example, layer, :, :length], expected, atol=1e-6)


def test_output_projection_is_rebuilt_from_stored_arrays(loaded, plan, tmp_path):
    """The decisive check: sum_h A_h V_h W_O^h + b_O from the store equals the model's own projected output."""
    shape = loaded.shape
    layout = AttentionStoreLayout(
        n_examples=len(plan.length),
        max_length=plan.max_length,
        n_classes=2,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden=shape.hidden,
        shard_size=len(plan.length),
        dtype="float32",
    )
    url = str(tmp_path / "store.zarr")
    group = create_attention_store(url, layout, {"model": {"name": loaded.name}})
    write_example_metadata(
        group,
        plan.tokens,
        plan.length,
        plan.untruncated_length,
        plan.source_index,
        np.full(len(plan.length), -1),
        np.array([TEXTS[i] for i in plan.source_index]),
    )
    group["w_out"][:], group["out_bias"][:] = output_projection_slices(loaded.model, loaded.adapter)
    mark_prepared(group)

    projected_outputs = {}
    handles = [
        projection.register_forward_hook(lambda m, i, o, layer=layer: projected_outputs.__setitem__(layer, o))
        for layer, projection in enumerate(attention_output_projections(loaded.model, loaded.adapter))
    ]
    try:
        captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=len(plan.length))
    finally:
        for handle in handles:
            handle.remove()
    write_shard(group, 0, captured.attention, captured.value, captured.logits)

    stored = open_attention_store(url)
    attention, value = stored["attention"][:], stored["value"][:]
    w_out, out_bias, lengths = stored["w_out"][:], stored["out_bias"][:], stored["length"][:]
    group_size = shape.heads // shape.kv_heads
    for example, length in enumerate(lengths):
        for layer in range(shape.layers):
            rebuilt = out_bias[layer].astype(np.float64).copy()
            for head in range(shape.heads):
                A = attention[example, layer, head, :length, :length].astype(np.float64)
                V = value[example, layer, head // group_size, :length].astype(np.float64)
                rebuilt = rebuilt + A @ V @ w_out[layer, head].astype(np.float64)
            expected = projected_outputs[layer][example, :length].numpy()
            np.testing.assert_allclose(rebuilt, expected, atol=1e-5, rtol=1e-4)


def test_capture_rejects_bad_batch_size(loaded, plan):
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        capture_examples(loaded, plan.tokens, plan.length, batch_size=0)


def test_float16_storage(loaded, plan):
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=5, dtype="float16")
    reference = capture_examples(loaded, plan.tokens, plan.length, batch_size=5)
    assert captured.attention.dtype == np.float16 and captured.value.dtype == np.float16
    np.testing.assert_allclose(captured.attention, reference.attention, atol=1e-3)


def test_next_token_keeps_the_top_logits_at_every_real_position():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        num_key_value_heads=2,
        pad_token_id=0,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    loaded = wrap_model(LlamaForCausalLM(config).eval(), bundled_tokenizer(), "tiny-lm", task="next-token")
    plan = plan_extraction(TEXTS, loaded.tokenizer, max_length=64)
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=5, top_k=4)
    assert captured.logits.shape == captured.logit_ids.shape == (len(TEXTS), plan.max_length, 4)
    assert captured.logsumexp.shape == (len(TEXTS), plan.max_length)
    for example, length in enumerate(plan.length):
        with torch.no_grad():
            full = loaded.model(input_ids=torch.as_tensor(plan.tokens[example : example + 1, :length]).long()).logits[0]
        values, ids = torch.topk(full, k=4, dim=-1)
        np.testing.assert_allclose(captured.logits[example, :length], values.numpy(), atol=1e-4)
        np.testing.assert_array_equal(captured.logit_ids[example, :length], ids.numpy())
        np.testing.assert_allclose(captured.logsumexp[example, :length], torch.logsumexp(full, -1).numpy(), atol=1e-4)
        assert not captured.logits[example, length:].any() and not captured.logit_ids[example, length:].any()
        assert not captured.logsumexp[example, length:].any()


def test_max_length_is_capped_at_the_models_positions(loaded):
    assert loaded.model.config.max_position_embeddings == 512
    assert usable_max_length(loaded.model, 600) == 512
    assert usable_max_length(loaded.model, 64) == 64


def test_a_text_longer_than_the_model_is_truncated_to_it_and_recorded(tmp_path, tiny_bert_folder):
    """--max-length above the model's 512 positions: the long text is cut at 512 (it would not run longer) and its
    untruncated length is stored."""
    import csv

    from tests.store_builders import build_real_store

    corpus = tmp_path / "long.csv"
    with corpus.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text", "label"], ["word " * 700, "a"], ["a short text", "b"]])
    url = build_real_store(str(tmp_path / "store.zarr"), tiny_bert_folder, corpus, max_length=600, variants=())
    group = open_attention_store(url)
    assert group.attrs["max_length"] == 512 and group.attrs["extraction"]["requested_max_length"] == 600
    assert group.attrs["extraction"]["truncated_examples"] == 1
    assert group["length"][:].tolist() == [5, 512] and group["untruncated_length"][:].tolist() == [5, 702]
    attention = group["attention"][1].astype(np.float64)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-4)


def test_a_store_of_the_same_weights_with_another_tokenizer_is_refused(tmp_path, tiny_bert_folder):
    """Resuming must not pair the stored tokens with another vocabulary: the tokenizer is part of the run."""
    import re
    import shutil

    from transformers import BertTokenizerFast

    from storage_schemas.attention_store import AttentionStoreError
    from tasks.extraction import prepare_store
    from tests.store_builders import build_real_store, write_corpus

    other = tmp_path / "same-weights-other-tokenizer"
    shutil.copytree(tiny_bert_folder, other)
    vocabulary = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for row in TEXTS for w in row.split()})]
    vocabulary.write_text("\n".join(words) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink(missing_ok=True)
    BertTokenizerFast(vocab_file=str(vocabulary)).save_pretrained(other)

    corpus = write_corpus(tmp_path / "reviews.csv")
    url = build_real_store(str(tmp_path / "store.zarr"), tiny_bert_folder, corpus, variants=())
    from transformers import AutoTokenizer

    stored = open_attention_store(url).attrs["tokenizer"]["vocab_size"]
    replacement = len(AutoTokenizer.from_pretrained(other))
    assert stored == 30522 and replacement < stored
    message = (
        f"{url} was written by a different run (tokenizer.vocab_size: store has {stored}, this run has "
        f"{replacement}): use another --store, or delete {url} to start over"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        prepare_store.fn(url, str(corpus), str(other), 24, None, "float32", "cpu", None, None, 4, 0)


def test_extraction_resuming_into_a_v1_store_keeps_its_v1_layout(tmp_path, tiny_bert_folder):
    """A store written by schema v1, its last shards unfinished: the same extract command finishes them in the v1
    layout (chunks of one example x one layer, texts in `text`), with the data a v2 store of the same run holds."""
    import json
    from pathlib import Path

    from storage_schemas.attention_store import (
        completed_shards,
        read_texts,
        unmark_shards,
    )
    from tasks.extraction import prepare_store
    from tests.store_builders import build_real_store, build_v1_store, extract_shards, write_corpus

    corpus = write_corpus(tmp_path / "reviews.csv")
    v1 = build_v1_store(str(tmp_path / "v1.zarr"), tiny_bert_folder, corpus, variants=())
    v2 = build_real_store(str(tmp_path / "v2.zarr"), tiny_bert_folder, corpus, variants=())
    group = open_attention_store(v1, mode="r+")
    unmark_shards(group, [1, 2])
    group["attention"][4:] = 0  # what an unfinished extraction leaves: nothing of those shards
    todo, num_labels = prepare_store.fn(
        v1, str(corpus), str(tiny_bert_folder), 24, None, "float32", "cpu", None, None, 4, 0
    )
    assert todo == [1, 2]
    extract_shards(v1, todo, tiny_bert_folder, num_labels)
    resumed, fresh = open_attention_store(v1), open_attention_store(v2)
    assert resumed.attrs["schema_version"] == 1 and completed_shards(resumed) == [0, 1, 2]
    assert resumed["attention"].chunks[1] == 1 and fresh["attention"].chunks[1] == fresh["attention"].shape[1]
    assert json.loads((Path(v1) / "text" / "zarr.json").read_text())["data_type"] == "string"
    assert "text_bytes" not in resumed.array_keys()
    assert read_texts(resumed) == read_texts(fresh)
    for name in ("attention", "value", "logits", "tokens"):
        np.testing.assert_allclose(resumed[name][:], fresh[name][:], rtol=0, atol=1e-6, err_msg=name)
    assert resumed["attention"][4:].any()


def test_capture_keeps_only_the_selected_layers_heads_and_kv_heads(plan):
    """The tiny Llama has 3 layers here and 4 query heads over 2 kv heads: heads 2, 3 read kv head 1 only."""
    loaded = wrap_model(tiny_llama(layers=3), bundled_tokenizer(), name="tiny-llama-3")
    everything = capture_examples(loaded, plan.tokens, plan.length, batch_size=2)
    chosen = capture_examples(
        loaded, plan.tokens, plan.length, batch_size=2, layers=(0, 2), heads=(2, 3), kv_heads=(1,)
    )
    assert chosen.attention.shape == (len(TEXTS), 2, 2, plan.max_length, plan.max_length)
    assert chosen.value.shape == (len(TEXTS), 2, 1, plan.max_length, 8)
    np.testing.assert_array_equal(chosen.attention, everything.attention[:, [0, 2]][:, :, [2, 3]])
    np.testing.assert_array_equal(chosen.value, everything.value[:, [0, 2]][:, :, [1]])
    np.testing.assert_array_equal(chosen.logits, everything.logits)  # the model ran whole
