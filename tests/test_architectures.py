"""analysis.architectures: every accepted architecture is captured exactly, every refused one is refused by name.

Tiny random models of each type (tests/tiny_architectures.py) run one padded batch of two lengths through eager and
through the effattn backend: identical logits and attention, the attention block's output rebuilt from what the store
keeps, no weight above the diagonal or outside a sliding window, the classification head pooling the last real token,
and the causal stage's replay / efficient:effective keeping the logits.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging

from analysis.architectures import (
    ADAPTERS,
    REFUSED_ARCHITECTURES,
    ArchitectureAdapter,
    ArchitectureError,
    adapter_for,
    attention_layers,
    discover_adapter,
    key_bands_of,
    observe_layout,
    prepare_architecture,
    projection_weight,
    supported_model_types,
)
from analysis.attention_backend import capture_attention
from analysis.key_bands import FULL_BAND, KeyBand, outside_band_magnitude, store_key_bands
from analysis.models import attention_output_projections, output_projection_slices, wrap_model
from tests.conftest import bundled_tokenizer
from tests.tiny_architectures import (
    ACCEPTED_CONFIGS,
    ENCODER_TYPES,
    NEXT_TOKEN_ONLY,
    REFUSED_CONFIGS,
    WINDOW,
    classification_types,
    decoder_types,
    tiny_model,
)

ISSUE_TYPES = (
    "bert roberta xlm-roberta electra camembert distilbert modernbert gpt2 gpt_neox gptj opt phi phi3 llama "
    "mistral mixtral qwen2 qwen3 gemma gemma2 gemma3_text olmo2 smollm3 granite starcoder2"
).split()
LENGTHS = [14, 9]  # a padded batch of two lengths, both longer than the window (4)
CASES = [(name, "classification") for name in classification_types()] + [
    (name, "next-token") for name in decoder_types()
]


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


def batch(model, lengths=LENGTHS, seed=0):
    """Right-padded random ids (never a special id) and the attention mask, [batch, max(lengths)]."""
    generator = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return torch.where(mask, ids, torch.full_like(ids, pad)), mask.long()


def layer_windows(model) -> list[int | None]:
    """The window each layer's attention should have by the config (None: full), for the mask checks below."""
    config = model.config
    if config.model_type == "modernbert":
        return [
            None if index % config.global_attn_every_n_layers == 0 else config.local_attention // 2
            for index in range(config.num_hidden_layers)
        ]
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def test_every_type_of_the_issue_has_a_record_and_a_tiny_config():
    assert set(ISSUE_TYPES) <= set(supported_model_types())
    assert set(ISSUE_TYPES) <= set(ACCEPTED_CONFIGS)
    names = [adapter.name for adapter in ADAPTERS]
    assert len(names) == len(set(names))
    declared = [model_type for adapter in ADAPTERS for model_type in adapter.model_types]
    assert len(declared) == len(set(declared)), "a model type is in two records"
    assert not set(declared) & set(REFUSED_ARCHITECTURES)
    assert adapter_for("gpt2").weight_layout == "conv1d" and adapter_for("distilbert").layer_index == "assigned"
    assert adapter_for("gpt2").causal and not adapter_for("modernbert").causal
    assert adapter_for("unknown-type") is None


def run_exactness(model, tokenizer, model_type, task, lengths=LENGTHS) -> tuple[list[str], tuple]:
    """What differs between eager and the effattn capture on one padded batch (empty: exact), and (loaded model,
    input ids, effattn logits). `model` must be on eager; it is wrapped (switched to effattn) after the eager pass.

    Checks: logits (real positions) <= 1e-6; each layer's captured attention equals eager's <= 1e-6 on the real
    block; sum_h A_h V_h W_O^h + b_O from the stored arrays equals the output projection's output (forward hook)
    <= 1e-5; causal models have no weight above the diagonal; a layer whose attention gets a sliding_window w has
    no weight on keys with |query - key| >= w (transformers' mask semantics, causal and bidirectional alike) and
    some on every visible key.
    """
    input_ids, mask = batch(model, lengths)
    with torch.no_grad():
        eager = model(input_ids=input_ids, attention_mask=mask, output_attentions=True)
    loaded = wrap_model(model, tokenizer, model_type, task=task)
    projected = {}
    handles = [
        projection.register_forward_hook(lambda m, i, o, layer=layer: projected.__setitem__(layer, o))
        for layer, projection in enumerate(attention_output_projections(model, loaded.adapter))
    ]
    try:
        with torch.no_grad(), capture_attention() as recorder:
            logits = model(input_ids=input_ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()
    problems = []

    def differs(name, actual, expected, tolerance):
        gap = float((actual.float() - expected.float()).abs().max())
        if not gap <= tolerance:
            problems.append(f"{name} differs by {gap:.3g} (> {tolerance})")

    real = mask.bool()
    if task == "next-token":
        differs("logits", logits[real], eager.logits[real], 1e-6)
    else:
        differs("logits", logits, eager.logits, 1e-6)
    layers = recorder.ordered(loaded.shape.layers)
    w_out, out_bias = output_projection_slices(model, loaded.adapter)
    shape = loaded.shape
    groups = shape.heads // shape.kv_heads
    eager_attentions = eager.attentions if getattr(eager, "attentions", None) else None
    for index, layer in enumerate(layers):
        attention, value = layer.attention, layer.value
        for example, n in enumerate(lengths):
            block = attention[example, :, :n, :n]
            if eager_attentions is not None and eager_attentions[index] is not None:
                differs(f"layer {index} attention", block, eager_attentions[index][example, :, :n, :n], 1e-6)
            per_head = torch.einsum("hqk,hkd->hqd", block, value[example].repeat_interleave(groups, 0)[:, :n])
            rebuilt = torch.as_tensor(np.einsum("hqd,hdo->qo", per_head.numpy(), w_out[index]) + out_bias[index])
            differs(f"layer {index} rebuilt block output", rebuilt, projected[index][example, :n], 1e-5)
            query, key = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            if loaded.causal and block[:, key > query].any():
                problems.append(f"layer {index} has weight above the diagonal")
            window = loaded.sliding_windows[index]
            outside = (query - key).abs() >= (window if window is not None else n + 1)
            if block[:, outside].any():
                problems.append(f"layer {index} has weight outside its window of {window}")
            if not (block[:, ~outside & ((key <= query) if loaded.causal else True)] > 0).all():
                problems.append(f"layer {index} has no weight on some visible key")
    return problems, (loaded, input_ids, logits)


@pytest.mark.parametrize("model_type,task", CASES, ids=[f"{name}-{task}" for name, task in CASES])
def test_capture_is_exact(model_type, task, tokenizer):
    model = tiny_model(model_type, task)
    windows = layer_windows(model)
    problems, (loaded, input_ids, logits) = run_exactness(model, tokenizer, model_type, task)
    assert problems == []
    assert loaded.causal == (model_type not in ENCODER_TYPES)
    # the windows the attention got are the config's (modernbert passes half its local window + 1): they bite
    expected = [None if window is None else window + (model_type == "modernbert") for window in windows]
    assert list(loaded.sliding_windows) == expected
    if task == "classification":
        # the head pools each example's last real token: alone (no padding) it gives the same logits
        for example, n in enumerate(LENGTHS):
            with torch.no_grad():
                alone = model(input_ids=input_ids[example : example + 1, :n]).logits
            torch.testing.assert_close(alone[0], logits[example], atol=1e-5, rtol=0)


def test_every_window_and_softcap_case_is_exercised():
    """The exactness test above must meet a sliding window in a causal and a bidirectional model, and gemma2's
    small softcap (2.0), or it could pass without honouring them."""
    assert any(window for window in layer_windows(tiny_model("mistral"))) and layer_windows(tiny_model("mistral"))[0]
    assert layer_windows(tiny_model("modernbert")) == [None, WINDOW // 2]
    assert layer_windows(tiny_model("gemma3_text")) == [WINDOW, None]
    assert tiny_model("gemma2").config.attn_logit_softcapping == 2.0


def test_gemma2_softcap_is_honoured_and_matters(tokenizer):
    model = tiny_model("gemma2")
    input_ids, mask = batch(model)
    with torch.no_grad():
        eager = model(input_ids=input_ids, attention_mask=mask, output_attentions=True).attentions
    wrap_model(model, tokenizer, "gemma2")
    with torch.no_grad(), capture_attention() as recorder:
        model(input_ids=input_ids, attention_mask=mask)
    torch.testing.assert_close(recorder.layers[1].attention, eager[1], atol=1e-6, rtol=0)
    model.config.attn_logit_softcapping = None
    for layer in attention_layers(model, adapter_for("gemma2")):
        layer.attention.attn_logit_softcapping = None
    with torch.no_grad(), capture_attention() as uncapped:
        model(input_ids=input_ids, attention_mask=mask)
    n = LENGTHS[0]
    change = (uncapped.layers[0].attention[0, :, :n, :n] - eager[0][0, :, :n, :n]).abs().max()
    assert change > 1e-2, "the softcap of 2.0 must change attention, or this test could not fail"


@pytest.mark.parametrize("model_type", sorted(REFUSED_CONFIGS))
def test_refused_types_are_refused_by_name_with_the_reason(model_type, tokenizer):
    model = tiny_model(model_type)
    reason = REFUSED_ARCHITECTURES[model_type]
    with pytest.raises(
        ArchitectureError,
        match=re.escape(
            f"model type '{model_type}' is not supported: {reason}. supported model types: bert, camembert, distilbert"
        ),
    ):
        wrap_model(model, tokenizer, model_type)


@pytest.mark.parametrize(
    "model_type,expected",
    [
        ("albert", "a forward pass made 2 attention calls by 1 modules for 2 layers"),
        ("gpt_oss", "model type 'gpt_oss' passes 's_aux' to its attention function (attention sinks"),
        ("t5", "model type 't5' passes 'position_bias' to its attention function (a relative position bias"),
        ("falcon", "its attention does not go through transformers' AttentionInterface"),
        ("bloom", "its attention does not go through transformers' AttentionInterface"),
        ("deberta-v2", "its attention does not go through transformers' AttentionInterface"),
    ],
)
def test_refusals_do_not_depend_on_the_list(model_type, expected, monkeypatch):
    """Without its entry in REFUSED_ARCHITECTURES a refused type is still refused, by the probe: the list only
    words the reason up front."""
    monkeypatch.delitem(REFUSED_ARCHITECTURES, model_type)
    with pytest.raises(ArchitectureError, match=re.escape(expected)):
        prepare_architecture(tiny_model(model_type))


def test_albert_record_with_shared_module_is_refused(monkeypatch):
    """Even with a record that finds its layers, ALBERT's one attention module for every layer is refused."""
    model = tiny_model("albert")
    base = model.base_model
    base.shared_layers = torch.nn.ModuleList(
        [base.encoder.albert_layer_groups[0].albert_layers[0]] * model.config.num_hidden_layers
    )
    record = ArchitectureAdapter(
        "albert-shared",
        ("albert",),
        layers="shared_layers",
        attention="attention",
        output_projection="attention.dense",
        causal=False,
        layer_index="assigned",
    )
    with pytest.raises(ArchitectureError, match="one attention module is shared by several layers"):
        attention_layers(model, record)


def test_distilbert_layers_get_their_index():
    model = tiny_model("distilbert")
    modules = [layer.attention for layer in model.distilbert.transformer.layer]
    assert not any(hasattr(module, "layer_idx") for module in modules)  # transformers keeps none
    adapter, _ = prepare_architecture(model)
    assert [module.layer_idx for module in modules] == [0, 1]
    assert adapter.layer_index == "assigned"


def test_conv1d_orientation_on_a_non_square_projection():
    """GPT-2's Conv1D keeps [in, out]; a projection from 3 heads x 8 = 24 features to hidden 40 shows a wrong
    transpose (a square one could hide it)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    projection = Conv1D(nf=40, nx=24)
    as_linear = torch.nn.Linear(24, 40)
    with torch.no_grad():
        as_linear.weight.copy_(projection.weight.T)
    per_head = torch.randn(5, 3, 8)
    for module, layout in ((projection, "conv1d"), (as_linear, "linear")):
        adapter = ArchitectureAdapter("probe", ("x",), "h", "attn", "attn.c_proj", True, weight_layout=layout)
        weight = projection_weight(module, adapter)
        assert weight.shape == (24, 40)
        rebuilt = torch.einsum("nhd,hdo->no", per_head, weight.reshape(3, 8, 40)) + module.bias.detach()
        torch.testing.assert_close(rebuilt, module(per_head.reshape(5, 24)).detach(), atol=1e-5, rtol=0)
    # a real non-square projection (gemma: 4 heads x 16 = 64 -> hidden 48) read with the wrong layout is refused
    wrong = dataclasses.replace(adapter_for("gemma"), weight_layout="conv1d")
    with pytest.raises(
        ValueError,
        match=r"layer 0's output projection maps 48 -> 64 features, but the model has 4 "
        r"heads x 16 -> hidden 48: the adapter record 'llama-decoder' has the wrong",
    ):
        output_projection_slices(tiny_model("gemma"), wrong)


@pytest.mark.parametrize("model_type", sorted(ACCEPTED_CONFIGS))
def test_discovery_agrees_with_the_record(model_type):
    model = tiny_model(model_type, "next-token" if model_type in NEXT_TOKEN_ONLY else "classification")
    record, observed = prepare_architecture(model)
    discovered = discover_adapter(model, observed)
    assert discovered.discovered and discovered.name == f"discovered:{model_type}"
    for field in ("layers", "attention", "output_projection", "causal", "weight_layout"):
        assert getattr(discovered, field) == getattr(record, field), field


def test_a_record_that_names_the_wrong_projection_is_refused():
    model = tiny_model("llama")
    wrong = ArchitectureAdapter(
        "wrong", ("llama",), layers="layers", attention="self_attn", output_projection="self_attn.v_proj", causal=True
    )
    attention_layers(model, wrong)
    with pytest.raises(
        ArchitectureError,
        match=r"does not match the adapter record 'wrong': layer 0's attention "
        r"output was consumed unchanged by Linear, not by the record's",
    ):
        from analysis.architectures import check_observed_layout

        check_observed_layout(model, wrong, observe_layout(model))
    not_causal = ArchitectureAdapter(
        "bidirectional",
        ("llama",),
        layers="layers",
        attention="self_attn",
        output_projection="self_attn.o_proj",
        causal=False,
    )
    with pytest.raises(ArchitectureError, match="layer 0's attention is causal, the record says otherwise"):
        from analysis.architectures import check_observed_layout

        check_observed_layout(model, not_causal, observe_layout(model))


def test_a_surprising_layout_without_a_record_is_refused(monkeypatch):
    """A type without a record whose attention output is changed before its projection (a gate) is refused."""
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "gated-llama")
    for layer in model.model.layers:
        projection = layer.self_attn.o_proj
        layer.self_attn.o_proj = torch.nn.Sequential(torch.nn.Tanh(), projection)
    with pytest.raises(
        ArchitectureError,
        match="model type 'gated-llama' has no adapter record and its layout is "
        "not the usual one: no Linear or Conv1D consumes layer 0's",
    ):
        prepare_architecture(model)
    plain = tiny_model("llama")
    monkeypatch.setattr(plain.config, "model_type", "renamed-llama")
    adapter, _ = prepare_architecture(plain)  # the usual layout works without a record
    assert adapter.name == "discovered:renamed-llama" and adapter.output_projection == "self_attn.o_proj"


CAUSAL_LENGTHS = np.array([20, 17, 14, 9])  # 4 examples, longer than every head dim (<= 16): real null spaces
CAUSAL_CASES = [(name, "classification") for name in classification_types()] + [
    (name, "next-token") for name in ("gpt2", "granite", "gemma2")
]


@pytest.mark.parametrize("model_type,task", CAUSAL_CASES, ids=[f"{name}-{task}" for name, task in CAUSAL_CASES])
def test_replay_and_effective_attention_keep_the_logits(model_type, task, tokenizer):
    """The causal stage on 4 captured examples: replaying the stored attention reproduces the stored logits, and
    injecting effective attention (A with its null-space part removed) keeps them."""
    from analysis.causal import intervened_logits, plain_logits
    from analysis.efficient_attention import efficient_attention
    from analysis.extraction import capture_examples
    from analysis.interventions import Intervention, intervention_matrices

    loaded = wrap_model(tiny_model(model_type, task), tokenizer, model_type, task=task)
    input_ids, _ = batch(loaded.model, lengths=list(CAUSAL_LENGTHS), seed=1)
    tokens = input_ids.numpy().astype(np.int32)
    shard = capture_examples(loaded, tokens, CAUSAL_LENGTHS, batch_size=4, top_k=5)
    original = plain_logits(loaded, tokens, CAUSAL_LENGTHS)
    if task == "classification":
        np.testing.assert_allclose(shard.logits, original.numpy(), atol=1e-6, rtol=0)
    w_out, _ = output_projection_slices(loaded.model, loaded.adapter)
    efficient = efficient_attention(
        shard.attention, shard.value, w_out, CAUSAL_LENGTHS, causal=loaded.causal, variants=("effective",)
    )
    masks = np.ones((1, loaded.shape.layers, loaded.shape.heads), dtype=bool)
    real = torch.as_tensor(np.arange(CAUSAL_LENGTHS.max())[None] < CAUSAL_LENGTHS[:, None])
    changes = {}
    for name in ("replay", "efficient:effective", "ablate"):
        intervention = Intervention.parse(name)
        matrices = intervention_matrices(
            intervention,
            shard.attention,
            shard.value,
            w_out,
            CAUSAL_LENGTHS,
            loaded.causal,
            efficient=efficient["effective"].efficient if intervention.needs_efficient else None,
        )
        logits = intervened_logits(loaded, tokens, CAUSAL_LENGTHS, matrices, masks)[0]
        changes[name] = float(((logits - original)[real] if task == "next-token" else logits - original).abs().max())
    assert changes["replay"] <= 1e-5 and changes["efficient:effective"] <= 1e-4, changes
    assert changes["ablate"] > 100 * max(changes["efficient:effective"], 1e-7), changes  # the check can fail


SWEEP_SIZES = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=256,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# the second try: grouped-query attention and few experts, for configs whose defaults do not fit the sizes above
SWEEP_EXTRA_SIZES = dict(
    num_key_value_heads=2,
    head_dim=12,
    num_local_experts=2,
    num_experts=2,
    n_routed_experts=2,
    num_experts_per_tok=1,
    moe_intermediate_size=32,
)
SWEEP_MAX_PARAMETERS = 8_000_000


def sweep_one(model_type: str, task: str, tokenizer) -> tuple[str, str]:
    """("exact" | "refused" | "skipped" | "wrong", detail) for one model type built tiny from generic sizes."""
    from transformers.models.auto import modeling_auto

    auto = (
        modeling_auto.AutoModelForSequenceClassification
        if task == "classification"
        else modeling_auto.AutoModelForCausalLM
    )
    model, why = None, ""
    known = {**ACCEPTED_CONFIGS, **REFUSED_CONFIGS}.get(model_type)  # the hand-made tiny config first, if any
    attempts = ([{**SWEEP_SIZES, **known}] if known is not None else []) + [
        SWEEP_SIZES,
        {**SWEEP_SIZES, **SWEEP_EXTRA_SIZES},
    ]
    for sizes in attempts:
        try:
            config = AutoConfig.for_model(model_type, **sizes)
            with torch.device("meta"):
                size = sum(parameter.numel() for parameter in auto.from_config(config).parameters())
            if size > SWEEP_MAX_PARAMETERS:
                why = f"{size / 1e6:.0f}M parameters with the generic tiny sizes"
                continue
            torch.manual_seed(0)
            model = auto.from_config(config, attn_implementation="eager").eval()
            input_ids, mask = batch(model, [10, 7])
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask, output_attentions=True)
            break
        except Exception as error:  # noqa: BLE001 - a type that cannot be built tiny is skipped, with the reason
            model, why = None, f"cannot be built tiny: {type(error).__name__}: {str(error)[:80]}"
    if model is None:
        return "skipped", why
    try:
        problems, _ = run_exactness(model, tokenizer, model_type, task, lengths=[10, 7])
    except (ArchitectureError, ValueError) as error:
        return "refused", str(error).split(". supported model types")[0][:160]
    except Exception as error:  # noqa: BLE001 - accepted, then failed: not silent, but the refusal came too late
        return "wrong", f"accepted, then {type(error).__name__}: {str(error)[:160]}"
    return ("wrong", "; ".join(problems)) if problems else ("exact", "")


def test_sweep_over_transformers_auto_mappings(tokenizer):
    """Every encoder with a sequence-classification class and every decoder with a causal-LM class that transformers
    knows ends exact, refused by name, or skipped because it cannot be built tiny: none is silently wrong."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    transformers_logging.set_verbosity_error()
    outcomes = {}
    types = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) | set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for model_type in sorted(types):
        task = "classification" if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES else "next-token"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcomes[model_type] = sweep_one(model_type, task, tokenizer)
    counts = {
        kind: sum(1 for outcome, _ in outcomes.values() if outcome == kind)
        for kind in ("exact", "refused", "skipped", "wrong")
    }
    print(f"\nsweep over {len(outcomes)} model types: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    for model_type, (outcome, detail) in sorted(outcomes.items()):
        print(f"  {outcome:8s} {model_type}: {detail}")
    wrong = {model_type: detail for model_type, (outcome, detail) in outcomes.items() if outcome == "wrong"}
    assert wrong == {}
    # the accepted types of the issue are among the exact ones (built from generic sizes here)
    exact = {model_type for model_type, (outcome, _) in outcomes.items() if outcome == "exact"}
    assert {"bert", "gpt2", "llama", "opt", "phi"} <= exact
    assert outcomes["bloom"][0] == outcomes["falcon"][0] == "refused"


E2E_TEXTS = [
    "the film was a quiet triumph of patient acting and careful, generous direction",
    "a dull, overlong mess that wastes every one of its talented performers",
    "funny, warm and surprisingly moving from the first scene to the very last one",
    "nothing in this plodding sequel justifies its running time or its budget at all",
]


def saved_folder(model_type: str, folder, task: str = "classification"):
    """A tiny model of `model_type` saved with save_pretrained, with the bundled tokenizer (vocabulary 30522)."""
    from tests.conftest import save_model_folder

    return save_model_folder(tiny_model(model_type, task, vocab_size=30522), folder)


SAVED_CASES = [(name, "classification") for name in classification_types()] + [
    (name, "next-token") for name in ("gpt2", "granite", "mistral")
]


@pytest.mark.parametrize("model_type,task", SAVED_CASES, ids=[f"{name}-{task}" for name, task in SAVED_CASES])
def test_saved_folder_loads_extracts_and_replays(model_type, task, tmp_path):
    """Every accepted type from a folder saved with save_pretrained: load_model accepts it, a store of 4 examples is
    written from its capture, and from what the store holds, replaying the attention reproduces the stored logits
    and injecting effective attention keeps them."""
    from analysis.causal import intervened_logits
    from analysis.efficient_attention import efficient_attention
    from analysis.extraction import capture_examples, plan_extraction
    from analysis.models import load_model
    from storage_schemas.attention_store import (
        AttentionStoreLayout,
        create_attention_store,
        mark_prepared,
        open_attention_store,
        write_example_metadata,
        write_shard,
    )

    folder = saved_folder(model_type, tmp_path / model_type, task)
    loaded = load_model(str(folder), num_labels=2, task=task)
    assert loaded.adapter.name == adapter_for(model_type).name and loaded.task == task
    plan = plan_extraction(E2E_TEXTS, loaded.tokenizer, max_length=20)
    shape = loaded.shape
    layout = AttentionStoreLayout(
        n_examples=len(plan.length),
        max_length=plan.max_length,
        n_classes=2 if task == "classification" else int(loaded.model.config.vocab_size),
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden=shape.hidden,
        shard_size=len(plan.length),
        dtype="float32",
        task=task,
        top_k=5 if task == "next-token" else 0,
    )
    url = str(tmp_path / "store.zarr")
    group = create_attention_store(url, layout, {"model": {"name": loaded.name, "model_type": model_type}})
    write_example_metadata(
        group,
        plan.tokens,
        plan.length,
        plan.untruncated_length,
        plan.source_index,
        np.full(len(plan.length), -1),
        np.array([E2E_TEXTS[i] for i in plan.source_index]),
    )
    group["w_out"][:], group["out_bias"][:] = output_projection_slices(loaded.model, loaded.adapter)
    mark_prepared(group)
    captured = capture_examples(loaded, plan.tokens, plan.length, batch_size=4, top_k=5)
    write_shard(
        group,
        0,
        captured.attention,
        captured.value,
        captured.logits,
        *((captured.logit_ids, captured.logsumexp) if task == "next-token" else ()),
    )
    stored = open_attention_store(url)
    tokens, length, attention = stored["tokens"][:], stored["length"][:], stored["attention"][:]
    effective = efficient_attention(
        attention, stored["value"][:], stored["w_out"][:], length, causal=loaded.causal, variants=("effective",)
    )["effective"].efficient
    masks = np.ones((1, shape.layers, shape.heads), dtype=bool)
    for injected, tolerance in ((attention, 1e-5), (effective, 1e-4)):
        logits = intervened_logits(loaded, tokens, length, injected, masks)[0]
        if task == "next-token":
            logits = torch.gather(logits, -1, torch.as_tensor(stored["logit_ids"][:], dtype=torch.long))
            real = np.arange(plan.max_length)[None] < plan.length[:, None]
            np.testing.assert_allclose(logits.numpy()[real], stored["logits"][:][real], atol=tolerance, rtol=0)
        else:
            np.testing.assert_allclose(logits.numpy(), stored["logits"][:], atol=tolerance, rtol=0)


RUN_CASES = [("gpt2", "classification"), ("distilbert", "classification"), ("qwen2", "next-token")]


@pytest.mark.integration
@pytest.mark.parametrize("model_type,task", RUN_CASES, ids=[f"{name}-{task}" for name, task in RUN_CASES])
def test_effattn_run_on_a_saved_tiny_model(model_type, task, tmp_path, capsys):
    """`effattn run --model PATH --no-train` end to end (extract, efficient, causal, report) on a decoder with a
    Conv1D projection and a classification head, an encoder whose layer index is assigned, and a grouped-query
    decoder with a sliding window predicting next tokens."""
    from flows.cli import main
    from storage_schemas.attention_store import open_attention_store
    from tests.conftest import write_reviews_csv

    folder = saved_folder(model_type, tmp_path / model_type, task)
    corpus = write_reviews_csv(tmp_path / "reviews.csv")
    argv = [
        "run",
        "--corpus",
        str(corpus),
        "--model",
        str(folder),
        "--run-dir",
        str(tmp_path / "runs"),
        "--no-train",
        "--limit",
        "4",
        "--max-length",
        "16",
        "--shard-size",
        "4",
        "--batch-size",
        "2",
        "--variants",
        "effective",
        "--workers",
        "1",
        "--scope-examples",
        "2",
        "--task",
        task,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^sufficient \(effective\) +holds +largest \|Δlogit\| ", printed, re.MULTILINE), printed
    store = re.search(r"^attention store: (.+)$", printed, re.MULTILINE).group(1)
    model = open_attention_store(store).attrs["model"]
    assert model["model_type"] == model_type and model["adapter"] == adapter_for(model_type).name
    assert model["causal"] == (model_type != "distilbert")
    assert model["sliding_windows"] == ([None, WINDOW] if model_type == "qwen2" else [None, None])
    default = {"left": None, "right": 0 if model["causal"] else None}
    assert model["key_bands"] == (
        [default, {"left": WINDOW - 1, "right": 0}] if model_type == "qwen2" else [default, default]
    )


@pytest.mark.parametrize("model_type", ["albert", "bloom"])
def test_effattn_run_refuses_an_unsupported_folder_before_writing_anything(model_type, tmp_path, capsys):
    from flows.cli import main
    from tests.conftest import save_model_folder, write_reviews_csv

    folder = save_model_folder(tiny_model(model_type, vocab_size=30522), tmp_path / model_type)
    corpus = write_reviews_csv(tmp_path / "reviews.csv")
    run_dir = tmp_path / "runs"
    argv = [
        "run",
        "--corpus",
        str(corpus),
        "--model",
        str(folder),
        "--run-dir",
        str(run_dir),
        "--no-train",
        "--limit",
        "4",
        "--max-length",
        "16",
        "--variants",
        "effective",
        "--workers",
        "1",
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert (
        f"effattn run: error: model type '{model_type}' is not supported: {REFUSED_ARCHITECTURES[model_type]}" in error
    )
    assert "supported model types: bert, camembert, distilbert" in error
    assert not run_dir.exists() or not any(run_dir.rglob("*.zarr"))


def test_a_type_without_a_classification_class_says_to_use_next_token(tmp_path):
    from analysis.models import load_model

    folder = saved_folder("granite", tmp_path / "granite", task="next-token")
    with pytest.raises(
        ValueError,
        match=r"model type 'granite' has no SequenceClassification class in "
        r"transformers: use --task next-token",
    ):
        load_model(str(folder), num_labels=2)
    assert load_model(str(folder), num_labels=2, task="next-token").causal


# Windowed models whose bands have a null space (window wider than the head dim) on sequences longer than both:
# mistral with window 4 and head dim 2 (a causal band of 4 keys), ModernBERT with local_attention 8 and head dim 4
# (a band of 4 keys each side in its local layer 1; layer 0 is global).
WINDOWED_STORES = {
    "mistral": (dict(head_dim=2), (KeyBand(3, 0), KeyBand(3, 0))),
    "modernbert": (dict(num_attention_heads=12, local_attention=8), (FULL_BAND, KeyBand(4, 4))),
}


@pytest.mark.parametrize("model_type", list(WINDOWED_STORES))
def test_a_windowed_store_keeps_efficient_attention_and_its_noise_inside_the_band(model_type, tmp_path):
    """Extraction records the band each layer's mask allowed (observed); every variant the efficient stage writes
    keeps A·T with no weight outside the band (nor above the diagonal), stochastic rows sum to 1, simplex rows are
    non-negative, `effattn verify` agrees; the causal stage's efficient:effective and efficient+null-noise keep the
    logits with their matrices inside the band. Today's rule (projection on the whole prefix / sequence) would leak."""
    from analysis import store_checks
    from analysis.causal import intervened_logits
    from analysis.efficient_attention import efficient_attention
    from analysis.interventions import Intervention, intervention_matrices
    from analysis.models import load_model
    from analysis.variants import VARIANTS, variant_record
    from storage_schemas.attention_store import open_attention_store
    from storage_schemas.verification import verify_store
    from tests.conftest import save_model_folder
    from tests.store_builders import build_real_store, write_corpus

    overrides, bands = WINDOWED_STORES[model_type]
    folder = save_model_folder(tiny_model(model_type, vocab_size=30522, **overrides), tmp_path / model_type)
    url = build_real_store(str(tmp_path / "store.zarr"), folder, write_corpus(tmp_path / "reviews.csv"))
    group = open_attention_store(url)
    model = group.attrs["model"]
    assert store_key_bands(model, 2) == bands
    causal = model["causal"]
    length, tokens = group["length"][:], group["tokens"][:]
    attention, value, w_out = group["attention"][:], group["value"][:], group["w_out"][:]
    widest = max((band.left or 0) + (band.right or 0) + 1 for band in bands)  # keys a query sees
    assert (length > max(widest, group.attrs["layout"]["head_dim"])).mean() > 0.8  # one review is 3 tokens
    assert store_checks.future_magnitude(attention).max() == 0 if causal else True
    for variant in VARIANTS:
        efficient = group[f"efficient/{variant}"][:]
        assert outside_band_magnitude(efficient, length, bands).max() == 0.0, variant
        if causal:
            assert store_checks.future_magnitude(efficient).max() == 0.0, variant
        assert store_checks.output_residual(efficient, attention, value, w_out).max() < 1e-5, variant
        if variant_record(variant).keeps_row_sums:
            assert store_checks.row_sum_error(efficient, length).max() < 1e-5, variant
        if variant_record(variant).non_negative:
            assert efficient.min() >= 0.0, variant
        assert np.abs(efficient - attention).max() > 1e-3, f"{variant}: the bands must have a null space"
    assert verify_store(url).ok, verify_store(url).text()
    unbanded = efficient_attention(attention, value, w_out, length, causal=causal, variants=("effective",))
    assert outside_band_magnitude(unbanded["effective"].efficient, length, bands).max() > 1e-2

    loaded = load_model(str(folder), num_labels=2)
    masks = np.ones((1, 2, attention.shape[2]), dtype=bool)  # every head of every layer at once
    for name in ("efficient:effective", "efficient+null-noise:effective", "efficient+null-noise:stochastic"):
        intervention = Intervention.parse(name)
        matrices = intervention_matrices(
            intervention,
            attention,
            value,
            w_out,
            length,
            causal,
            efficient=group[f"efficient/{intervention.variant_name}"][:],
            example_indices=np.arange(len(length)),
            key_bands=store_key_bands(model, 2),
        )
        assert outside_band_magnitude(matrices, length, bands).max() == 0.0, name
        logits = intervened_logits(loaded, tokens, length, matrices, masks)[0]
        np.testing.assert_allclose(logits.numpy(), group["logits"][:], atol=1e-4, rtol=0, err_msg=name)


def test_key_bands_are_observed_from_the_masks_the_attention_receives(tokenizer):
    """At a probe longer than the windows each layer's band is what its mask allowed, whatever the family's
    sliding_window argument means (mistral masks i - w < j <= i, ModernBERT passes half its local window + 1 and
    masks |i - j| <= half); at a probe no longer than the windows they hide nothing. A mask that is not a band
    (chunked attention) is refused by name."""
    from analysis.extraction import observe_key_bands

    expected = {
        "mistral": (KeyBand(WINDOW - 1, 0),) * 2,
        "qwen2": (KeyBand(None, 0), KeyBand(WINDOW - 1, 0)),
        "gemma3_text": (KeyBand(WINDOW - 1, 0), KeyBand(None, 0)),
        "gpt2": (KeyBand(None, 0),) * 2,
        "modernbert": (FULL_BAND, KeyBand(WINDOW // 2, WINDOW // 2)),
        "bert": (FULL_BAND,) * 2,
    }
    for model_type, bands in expected.items():
        loaded = wrap_model(tiny_model(model_type), tokenizer, model_type)
        assert observe_key_bands(loaded, 14) == bands, model_type
        short = observe_key_bands(loaded, 3)
        assert short == ((KeyBand(None, 0),) * 2 if loaded.causal else (FULL_BAND,) * 2), model_type
    model = tiny_model("llama")
    wrap_model(model, tokenizer, "llama")
    observed = observe_layout(model, 9)
    chunked = torch.kron(torch.eye(3, dtype=torch.bool), torch.ones((3, 3), dtype=torch.bool)).tril()
    with pytest.raises(
        ArchitectureError,
        match=r"model type 'llama': the attention mask of layer 1 is not a band "
        r"around the diagonal .* sliding-window masks only",
    ):
        key_bands_of(model, dataclasses.replace(observed, visible=(observed.visible[0], chunked)))
