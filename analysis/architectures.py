"""Architectures as data: one adapter record per transformer architecture that effattn captures, and the refusals.

A record says where a model's layers are, which module of a layer calls the attention function, which module is
that attention's output projection and how its weight is laid out, whether attention is causal, and how the layer
index is known. Everything that differs between architectures is here; the rest of effattn iterates the record.

A record is never trusted blindly: `prepare_architecture` runs one short probe forward pass through the effattn
backend and checks what it observes (every layer's attention called once, by the record's module, its output
consumed by the record's projection, causal or not as recorded; then `check_uniform_shape`: the config's sizes).
A model type without a record is accepted when the probe finds the usual layout (`discover_adapter`), and refused
with the reason otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from analysis.attention_backend import (
    UnsupportedAttentionError,
    observe_attention_calls,
    use_capture_backend,
)
from analysis.key_bands import KeyBand, band_of_visible

# How an output projection stores its weight: nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out].
WEIGHT_LAYOUTS = ("linear", "conv1d")
# How a layer's index is known: the attention module's own `layer_idx`, or assigned from the layer order (the
# attention module of DistilBERT keeps none).
LAYER_INDEX_SOURCES = ("module", "assigned")


class ArchitectureError(ValueError):
    """A model whose attention effattn cannot capture exactly; the message says why and what is supported."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where the attention of one architecture is. Paths are dotted attribute names.

    layers: from `model.base_model` to the list of layers (one entry per hidden layer, in order);
    attention: from a layer to the module that calls the attention function;
    output_projection: from a layer to the module that maps the heads' concatenated outputs to the hidden size.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    output_projection: str
    causal: bool
    weight_layout: str = "linear"
    layer_index: str = "module"
    discovered: bool = False  # built by `discover_adapter` from a probe, not kept in ADAPTERS

    def __post_init__(self):
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {self.weight_layout!r}")
        if self.layer_index not in LAYER_INDEX_SOURCES:
            raise ValueError(f"layer_index must be one of {LAYER_INDEX_SOURCES}, got {self.layer_index!r}")


_DECODER_LAYOUT = dict(layers="layers", attention="self_attn", output_projection="self_attn.o_proj", causal=True)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(
        "bert-encoder",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        layers="encoder.layer",
        attention="attention.self",
        output_projection="attention.output.dense",
        causal=False,
    ),
    ArchitectureAdapter(
        "distilbert-encoder",
        ("distilbert",),
        layers="transformer.layer",
        attention="attention",
        output_projection="attention.out_lin",
        causal=False,
        layer_index="assigned",
    ),
    ArchitectureAdapter(
        "modernbert-encoder",
        ("modernbert",),
        layers="layers",
        attention="attn",
        output_projection="attn.Wo",
        causal=False,
    ),
    ArchitectureAdapter(
        "gpt2-decoder",
        ("gpt2",),
        layers="h",
        attention="attn",
        output_projection="attn.c_proj",
        causal=True,
        weight_layout="conv1d",
    ),
    ArchitectureAdapter(
        "gptj-decoder",
        ("gptj",),
        layers="h",
        attention="attn",
        output_projection="attn.out_proj",
        causal=True,
    ),
    ArchitectureAdapter(
        "gpt-neox-decoder",
        ("gpt_neox",),
        layers="layers",
        attention="attention",
        output_projection="attention.dense",
        causal=True,
    ),
    ArchitectureAdapter(
        "opt-decoder",
        ("opt",),
        layers="decoder.layers",
        attention="self_attn",
        output_projection="self_attn.out_proj",
        causal=True,
    ),
    ArchitectureAdapter(
        "phi-decoder",
        ("phi",),
        layers="layers",
        attention="self_attn",
        output_projection="self_attn.dense",
        causal=True,
    ),
    ArchitectureAdapter(
        "llama-decoder",
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo2",
            "smollm3",
            "granite",
            "starcoder2",
            "phi3",
        ),
        **_DECODER_LAYOUT,
    ),
)

# model_type -> why it is refused. Checked before any record or discovery.
REFUSED_ARCHITECTURES: dict[str, str] = {
    "albert": "one attention module is shared by all layers, so a capture could not tell the layers apart",
    "deberta": "its disentangled attention does not go through transformers' AttentionInterface",
    "deberta-v2": "its disentangled attention does not go through transformers' AttentionInterface",
    "falcon": "its attention (ALiBi or rotary) does not go through transformers' AttentionInterface",
    "bloom": "its ALiBi attention does not go through transformers' AttentionInterface",
    "gpt_oss": "its attention sinks (s_aux) are not implemented by the effattn backend",
    "t5": "its relative position bias (position_bias) is not implemented by the effattn backend",
    "mt5": "its relative position bias (position_bias) is not implemented by the effattn backend",
    "umt5": "its relative position bias (position_bias) is not implemented by the effattn backend",
}


def supported_model_types() -> list[str]:
    """Every model type with an adapter record, sorted."""
    return sorted(model_type for adapter in ADAPTERS for model_type in adapter.model_types)


def _support_hint() -> str:
    return (
        f"supported model types: {', '.join(supported_model_types())} (and others whose attention has the usual "
        "layout); refused: " + "; ".join(f"{name} ({why})" for name, why in sorted(REFUSED_ARCHITECTURES.items()))
    )


def refusal_reason(model_type: str) -> str | None:
    """Why `model_type` is refused, or None."""
    return REFUSED_ARCHITECTURES.get(model_type)


def check_not_refused(model_type: str) -> None:
    """A clear error for a refused model type (before anything is loaded or written)."""
    reason = refusal_reason(model_type)
    if reason is not None:
        raise ArchitectureError(f"model type '{model_type}' is not supported: {reason}. {_support_hint()}")


def adapter_for(model_type: str) -> ArchitectureAdapter | None:
    """The adapter record of `model_type`, None when there is none (a refused type raises)."""
    check_not_refused(model_type)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    return None


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's attention module and output projection (the projection maps [.., heads*head_dim] -> [.., hidden])."""

    index: int
    attention: torch.nn.Module
    projection: torch.nn.Module


def attention_layers(model: torch.nn.Module, adapter: ArchitectureAdapter) -> list[AttentionLayer]:
    """Every layer's attention module and output projection, in layer order, as the record says.

    An attention module shared by several layers (ALBERT-like) is refused: it would be captured once per use
    under one index. With `layer_index="assigned"` the modules get `layer_idx` from the layer order.
    """
    model_type = model.config.model_type
    try:
        layers = list(_resolve(model.base_model, adapter.layers))
        found = [
            AttentionLayer(i, _resolve(layer, adapter.attention), _resolve(layer, adapter.output_projection))
            for i, layer in enumerate(layers)
        ]
    except (AttributeError, IndexError, TypeError) as error:
        raise ArchitectureError(
            f"model type '{model_type}' does not have the layout of the adapter record '{adapter.name}' "
            f"(layers at base_model.{adapter.layers}, attention at .{adapter.attention}, projection at "
            f".{adapter.output_projection}): {error}"
        ) from error
    if len({id(layer.attention) for layer in found}) != len(found):
        raise ArchitectureError(
            f"model type '{model_type}': one attention module is shared by several layers, so a capture could not "
            f"tell the layers apart. {_support_hint()}"
        )
    for layer in found:
        if adapter.layer_index == "assigned":
            layer.attention.layer_idx = layer.index
        elif getattr(layer.attention, "layer_idx", None) != layer.index:
            raise ArchitectureError(
                f"model type '{model_type}': the attention module of layer {layer.index} has layer_idx "
                f"{getattr(layer.attention, 'layer_idx', None)!r}; the adapter record '{adapter.name}' expects the "
                "layer's own index"
            )
    return found


def projection_weight(projection: torch.nn.Module, adapter: ArchitectureAdapter) -> torch.Tensor:
    """The projection's weight as [in = heads*head_dim, out = hidden], whatever its storage layout."""
    weight = projection.weight.detach()
    return weight if adapter.weight_layout == "conv1d" else weight.T


@dataclass(frozen=True)
class ObservedLayout:
    """What a probe forward pass showed: for each attention call in order, the calling module, its layer index,
    the module that consumed its output (None if none did exactly), whether it was causal, and its sizes."""

    modules: tuple[torch.nn.Module, ...]
    layer_indices: tuple[int | None, ...]
    consumers: tuple[torch.nn.Module | None, ...]
    causal: tuple[bool, ...]
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    sliding_windows: tuple[int | None, ...]
    visible: tuple[torch.Tensor, ...] = ()  # per call, [query, key] bool: the keys its mask let each query see


PROBE_LENGTH = 12


def observe_layout(model: torch.nn.Module, length: int = PROBE_LENGTH) -> ObservedLayout:
    """One forward pass over an unpadded batch of `length` tokens through the effattn backend, watching every
    attention call and every Linear / Conv1D input to find the module that consumes each call's output unchanged."""
    use_capture_backend(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    first = 5 if vocab > 20 else 0  # skip the low ids, where special tokens (padding) usually are
    input_ids = (torch.arange(length) % max(vocab - first, 1) + first)[None].to(model.device)
    consumers: dict[int, torch.nn.Module] = {}  # call index -> the first module whose input is its output

    with torch.no_grad(), observe_attention_calls() as calls:

        def watch(module, inputs):
            if not calls or not inputs or not isinstance(inputs[0], torch.Tensor) or len(calls) - 1 in consumers:
                return
            output = calls[-1].output
            if inputs[0].numel() == output.numel() and torch.equal(inputs[0].reshape(-1), output.reshape(-1)):
                consumers[len(calls) - 1] = module

        handles = [
            module.register_forward_pre_hook(watch)
            for module in model.modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        ]
        try:
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        finally:
            for handle in handles:
                handle.remove()
    upper = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1).to(model.device)
    return ObservedLayout(
        modules=tuple(call.module for call in calls),
        layer_indices=tuple(call.layer_index for call in calls),
        consumers=tuple(consumers.get(index) for index in range(len(calls))),
        causal=tuple(bool((call.weights[..., upper] == 0).all()) for call in calls),
        heads=tuple(call.weights.shape[1] for call in calls),
        kv_heads=tuple(call.kv_heads for call in calls),
        head_dims=tuple(call.output.shape[-1] for call in calls),
        sliding_windows=tuple(None if call.sliding_window is None else int(call.sliding_window) for call in calls),
        visible=tuple(call.visible for call in calls),
    )


def key_bands_of(model: torch.nn.Module, observed: ObservedLayout) -> tuple[KeyBand, ...]:
    """Each attention call's band of visible keys (analysis.key_bands), read from the mask it received in the probe:
    exact for every length up to the probe's. A mask that is not a band around the diagonal is refused."""
    bands = []
    for index, visible in enumerate(observed.visible):
        try:
            bands.append(band_of_visible(visible.numpy()))
        except ValueError as error:
            raise ArchitectureError(
                f"model type '{model.config.model_type}': the attention mask of layer {index} is not a band around the "
                f"diagonal ({error}); effattn restricts efficient attention to the keys each query sees and supports "
                "full, causal and sliding-window masks only"
            ) from None
    return tuple(bands)


def _expected_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def check_observed_layout(model: torch.nn.Module, adapter: ArchitectureAdapter, observed: ObservedLayout) -> None:
    """The probe must agree with the record: one call per layer by the record's attention module, consumed by the
    record's projection, causal as recorded (the sizes are checked by `check_uniform_shape`)."""
    model_type = model.config.model_type
    layers = attention_layers(model, adapter)
    if not observed.modules:
        raise ArchitectureError(
            f"model type '{model_type}': its attention does not go through transformers' AttentionInterface, so "
            f"effattn cannot capture it. {_support_hint()}"
        )
    if len(observed.modules) != len(layers):
        raise ArchitectureError(
            f"model type '{model_type}': a forward pass called the attention function {len(observed.modules)} times "
            f"for {len(layers)} layers (an attention that bypasses the interface, or one shared between layers). "
            f"{_support_hint()}"
        )
    for layer, module, consumer, causal in zip(layers, observed.modules, observed.consumers, observed.causal):
        problem = None
        if module is not layer.attention:
            problem = f"layer {layer.index}'s attention was called by {type(module).__name__}, not the record's module"
        elif consumer is not layer.projection:
            found = "no module" if consumer is None else type(consumer).__name__
            problem = (
                f"layer {layer.index}'s attention output was consumed unchanged by {found}, not by the "
                f"record's output projection .{adapter.output_projection}"
            )
        elif causal != adapter.causal:
            kind = "causal" if causal else "bidirectional"
            problem = f"layer {layer.index}'s attention is {kind}, the record says otherwise"
        if problem:
            raise ArchitectureError(
                f"model type '{model_type}' does not match the adapter record '{adapter.name}': {problem}; "
                "effattn refuses it rather than store attention it cannot rebuild exactly"
            )


def check_uniform_shape(
    model: torch.nn.Module,
    adapter: ArchitectureAdapter,
    observed: ObservedLayout,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
) -> None:
    """The sizes the store is laid out by (from the config) must be every layer's, as the probe saw them, and every
    output projection must map heads * head_dim -> hidden."""
    model_type = model.config.model_type
    seen = {"heads": set(observed.heads), "kv heads": set(observed.kv_heads), "head dim": set(observed.head_dims)}
    expected = {"heads": heads, "kv heads": kv_heads, "head dim": head_dim}
    for what, values in seen.items():
        if values != {expected[what]}:
            raise ArchitectureError(
                f"model type '{model_type}': its layers have {what} {sorted(values)}, the config says "
                f"{expected[what]}; the attention store needs one shape for every layer, so effattn refuses it"
            )
    for layer in attention_layers(model, adapter):
        weight = projection_weight(layer.projection, adapter)
        if tuple(weight.shape) != (heads * head_dim, hidden):
            raise ArchitectureError(
                f"model type '{model_type}': layer {layer.index}'s output projection maps {weight.shape[0]} -> "
                f"{weight.shape[1]} features, not {heads} heads x {head_dim} -> hidden {hidden} (adapter "
                f"'{adapter.name}', weight layout {adapter.weight_layout})"
            )


_LAYER_PATH = re.compile(r"^(?P<layers>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def discover_adapter(model: torch.nn.Module, observed: ObservedLayout | None = None) -> ArchitectureAdapter:
    """An adapter for a model type without a record, built from a probe: accepted only for the usual layout (one
    call per layer in layer order, each by a distinct module at `<layers>.<i>.<attention>` whose layer_idx is i or
    absent (then assigned), its output consumed unchanged by a Linear or Conv1D at `<layers>.<i>.<projection>`, all
    layers causal or all bidirectional); anything else is refused."""
    model_type = model.config.model_type
    observed = observed if observed is not None else observe_layout(model)
    names = {id(module): name for name, module in model.base_model.named_modules()}

    def refuse(why: str) -> ArchitectureError:
        return ArchitectureError(
            f"model type '{model_type}' has no adapter record and its layout is not the usual one: {why}. "
            f"{_support_hint()}"
        )

    n_layers = _expected_layers(model)
    if not observed.modules:
        raise refuse("its attention does not go through transformers' AttentionInterface")
    if len(observed.modules) != n_layers or len({id(m) for m in observed.modules}) != n_layers:
        raise refuse(
            f"a forward pass made {len(observed.modules)} attention calls by "
            f"{len({id(m) for m in observed.modules})} modules for {n_layers} layers"
        )
    indexed = list(observed.layer_indices) != [None] * n_layers
    if indexed and list(observed.layer_indices) != list(range(n_layers)):
        raise refuse(f"the attention modules' layer_idx are {list(observed.layer_indices)}, not 0..{n_layers - 1}")
    if len(set(observed.causal)) != 1:
        raise refuse("some layers are causal and others are not")
    layouts = set()
    for index, (module, consumer) in enumerate(zip(observed.modules, observed.consumers)):
        if consumer is None:
            raise refuse(f"no Linear or Conv1D consumes layer {index}'s attention output unchanged")
        attention_match = _LAYER_PATH.match(names.get(id(module), ""))
        projection_match = _LAYER_PATH.match(names.get(id(consumer), ""))
        if not attention_match or not projection_match:
            raise refuse(f"layer {index}'s attention or projection is not inside a numbered layer list")
        layouts.add(
            (
                attention_match["layers"],
                attention_match["index"] == projection_match["index"] == str(index),
                attention_match["rest"],
                projection_match["layers"],
                projection_match["rest"],
                "conv1d" if isinstance(consumer, Conv1D) else "linear",
            )
        )
    if len(layouts) != 1:
        raise refuse("the layers do not all have the same layout")
    layers, same_index, attention, projection_layers, projection, layout = layouts.pop()
    if not same_index or projection_layers != layers:
        raise refuse("an attention's output is projected in another layer")
    # without layer_idx the index is the layer's place in its list, which must be the order of the calls
    adapter = ArchitectureAdapter(
        name=f"discovered:{model_type}",
        model_types=(model_type,),
        layers=layers,
        attention=attention,
        output_projection=projection,
        causal=observed.causal[0],
        weight_layout=layout,
        layer_index="module" if indexed else "assigned",
        discovered=True,
    )
    check_observed_layout(model, adapter, observed)
    return adapter


def prepare_architecture(model: torch.nn.Module) -> tuple[ArchitectureAdapter, ObservedLayout]:
    """The adapter of a loaded model, checked against a probe forward pass (which also assigns layer indices where
    the record says so and switches the model to the effattn backend), and what the probe observed. Refused models
    raise ArchitectureError."""
    model_type = model.config.model_type
    adapter = adapter_for(model_type)
    if adapter is not None:
        attention_layers(model, adapter)  # assigns layer_idx before the probe needs it
    try:
        observed = observe_layout(model)
    except UnsupportedAttentionError as error:
        raise ArchitectureError(str(error)) from error
    except Exception as error:
        raise ArchitectureError(
            f"model type '{model_type}': a probe forward pass on token ids failed ({type(error).__name__}: "
            f"{error}); effattn captures text models that run on input_ids and an attention mask"
        ) from error
    key_bands_of(model, observed)  # a mask that is not a band is refused here, before anything is written
    if adapter is None:
        return discover_adapter(model, observed), observed
    check_observed_layout(model, adapter, observed)
    return adapter, observed


__all__ = [
    "ADAPTERS",
    "REFUSED_ARCHITECTURES",
    "ArchitectureAdapter",
    "ArchitectureError",
    "AttentionLayer",
    "adapter_for",
    "attention_layers",
    "check_not_refused",
    "check_uniform_shape",
    "discover_adapter",
    "key_bands_of",
    "observe_layout",
    "prepare_architecture",
    "projection_weight",
    "refusal_reason",
    "supported_model_types",
]
