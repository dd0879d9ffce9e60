"""Tiny random-initialised models of every architecture effattn accepts or refuses, built from config classes (never
from the hub): hidden 48, 2 layers, 4 heads. Grouped-query attention (2 kv heads) wherever the family has it, sliding
windows of 4 keys (shorter than the test sequences), a non-square output projection (heads x head_dim != hidden) for
gemma and qwen3, and a small softcap (2.0) for gemma2."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

TINY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
)
GQA = dict(num_key_value_heads=2)
WINDOW = 4
# Special token ids inside a small vocabulary (several configs default to ids of their real vocabulary).
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type -> config overrides. Every accepted type of the issue is here.
ACCEPTED_CONFIGS: dict[str, dict] = {
    "bert": {},
    "roberta": dict(pad_token_id=1),
    "xlm-roberta": dict(pad_token_id=1),
    "electra": {},
    "camembert": dict(pad_token_id=1),
    "distilbert": {},
    "modernbert": dict(local_attention=WINDOW, global_attn_every_n_layers=2, cls_token_id=1, sep_token_id=2),
    "gpt2": {},
    "gpt_neox": {},
    "gptj": dict(rotary_dim=4),
    "opt": dict(word_embed_proj_dim=48, ffn_dim=64),
    "phi": GQA,
    "phi3": dict(GQA, sliding_window=WINDOW),
    "llama": GQA,
    "mistral": dict(GQA, sliding_window=WINDOW),
    "mixtral": dict(GQA, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=2),
    "qwen2": dict(GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(GQA, head_dim=16),  # 4 x 16 = 64 != hidden 48: a wrong transpose cannot hide
    "gemma": dict(GQA, head_dim=16),
    "gemma2": dict(GQA, head_dim=12, sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=12),
    "gemma3_text": dict(
        GQA,
        head_dim=12,
        sliding_window=WINDOW,
        query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "olmo2": GQA,
    "smollm3": GQA,
    "granite": GQA,
    "starcoder2": dict(GQA, sliding_window=WINDOW),
}
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "modernbert")
# Types whose transformers has no sequence-classification class: next-token only.
NEXT_TOKEN_ONLY = ("granite",)

# Refused types: a tiny config of each (the refusal comes before any weight is used).
REFUSED_CONFIGS: dict[str, dict] = {
    "albert": dict(embedding_size=16),
    "deberta-v2": {},
    "falcon": {},
    "bloom": dict(n_head=4),
    "gpt_oss": dict(GQA, head_dim=12, num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW),
    "t5": dict(d_model=48, d_kv=12, num_heads=4, num_layers=2, d_ff=64, decoder_start_token_id=0),
}


def tiny_config(model_type: str, vocab_size: int = 256, num_labels: int = 2, **overrides):
    settings = {
        **TINY,
        **SPECIAL_IDS,
        **ACCEPTED_CONFIGS.get(model_type, {}),
        **REFUSED_CONFIGS.get(model_type, {}),
        **overrides,
    }
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, num_labels=num_labels, **settings)


def tiny_model(model_type: str, task: str = "classification", seed: int = 0, **config_overrides):
    """A random model of `model_type` (sequence classification or causal LM) in eval mode, on the eager backend."""
    config = tiny_config(model_type, **config_overrides)
    torch.manual_seed(seed)
    auto_class = AutoModelForCausalLM if task == "next-token" else AutoModelForSequenceClassification
    model = auto_class.from_config(config, attn_implementation="eager").eval()
    if model_type == "gemma2":
        # random init gives scores far below the softcap of 2.0; larger queries make the cap change attention a lot
        with torch.no_grad():
            for layer in model.base_model.layers:
                layer.self_attn.q_proj.weight.mul_(100.0)
    return model


def classification_types() -> list[str]:
    return [name for name in ACCEPTED_CONFIGS if name not in NEXT_TOKEN_ONLY]


def decoder_types() -> list[str]:
    return [name for name in ACCEPTED_CONFIGS if name not in ENCODER_TYPES]
