"""The attention backend: one custom attention function that computes eager attention, captures it, and can
replace it.

Models of transformers 5.x look their attention function up by name in `AttentionInterface` and their mask
function in `AttentionMaskInterface`. This module registers both under `ATTENTION_IMPLEMENTATION`; a model
switched to it with `use_capture_backend(model)` computes exactly the eager attention of its architecture
(`softcap` included; the sliding window comes through the mask; any other argument that would change attention is
refused by name, never dropped) and
- while a `capture_attention()` context is open, hands the probabilities and the values of every layer to a
  recorder;
- while an `inject_attention(injection)` context is open, replaces the probabilities of chosen (layer, head)
  pairs by given matrices on the real tokens (padding untouched) before the product with the values.

Forward hooks on modules cannot do this: the product of probabilities and values happens inside the function.
Without the mask registration the model would get no padding mask at all and silently attend to padding.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTENTION_IMPLEMENTATION = "effattn"

# Keyword arguments models pass that do not change the attention the eager reference computes (cache and position
# bookkeeping, flash-attention-only switches). Anything else with a value is either honoured below or refused.
INERT_ATTENTION_ARGUMENTS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "past_key_values",
        "past_key_value",
        "encoder_hidden_states",
        "deterministic",
        "output_router_logits",
        "output_hidden_states",
        "return_dict",
    }
)
# Arguments honoured by this backend: `softcap` (tanh capping of the scores, Gemma 2), `sliding_window` and
# `is_causal` (applied by the mask function; checked to have reached a mask).
HONOURED_ATTENTION_ARGUMENTS = frozenset({"softcap", "sliding_window", "is_causal"})
# Arguments whose attention this backend does not implement, with what they are (for the refusal message).
UNIMPLEMENTED_ATTENTION_ARGUMENTS = {
    "s_aux": "attention sinks (an extra logit per head that takes probability mass)",
    "sinks": "attention sinks (an extra logit per head that takes probability mass)",
    "position_bias": "a relative position bias added to the scores (T5)",
    "alibi": "ALiBi position biases added to the scores",
    "head_mask": "a per-head multiplicative mask",
}


class UnsupportedAttentionError(ValueError):
    """A model's attention needs a feature this backend does not implement (it is refused, never approximated)."""


class MissingLayerIndexError(RuntimeError):
    """An attention module without `layer_idx`: its calls cannot be told apart by layer."""


def model_type_of(module: torch.nn.Module) -> str:
    """The config's model_type of an attention module (its class name when it keeps no config)."""
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def check_attention_arguments(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse, naming the model type and the argument, any keyword argument that would change attention and that
    this backend does not implement (a value of None means the feature is off)."""
    for name, argument in kwargs.items():
        if argument is None or name in INERT_ATTENTION_ARGUMENTS or name in HONOURED_ATTENTION_ARGUMENTS:
            continue
        what = UNIMPLEMENTED_ATTENTION_ARGUMENTS.get(name, "an argument the effattn backend does not know")
        raise UnsupportedAttentionError(
            f"model type '{model_type_of(module)}' passes '{name}' to its attention function ({what}); the effattn "
            "backend does not implement it and will not compute plain attention in its place: this model cannot be "
            "captured (see the supported model types in analysis.architectures)"
        )


@dataclass
class CapturedLayer:
    """What one layer's attention function saw in one forward pass.

    attention: [batch, heads, query, key] probabilities (after softmax, before dropout).
    value: [batch, kv_heads, position, head_dim] the value vectors, bias included (before any repetition for
        grouped-query attention).
    """

    attention: torch.Tensor
    value: torch.Tensor


@dataclass
class AttentionRecorder:
    """Collects `CapturedLayer`s by layer index during one forward pass."""

    layers: dict[int, CapturedLayer] = field(default_factory=dict)

    def record(self, layer_index: int, attention: torch.Tensor, value: torch.Tensor) -> None:
        if layer_index in self.layers:
            raise RuntimeError(
                f"layer {layer_index} was captured twice in one forward pass; open a new capture_attention() "
                "context for every forward pass"
            )
        self.layers[layer_index] = CapturedLayer(attention=attention.detach(), value=value.detach())

    def ordered(self, n_layers: int) -> list[CapturedLayer]:
        """The captured layers 0..n_layers-1, in order; an error names any layer that was not captured."""
        missing = [index for index in range(n_layers) if index not in self.layers]
        if missing:
            raise RuntimeError(
                f"no attention was captured for layers {missing}: is the model using the "
                f"'{ATTENTION_IMPLEMENTATION}' attention implementation (call use_capture_backend(model))?"
            )
        return [self.layers[index] for index in range(n_layers)]


@dataclass
class LayerInjection:
    """Replacement probabilities for one layer of a forward pass over `copies` copies of a batch.

    The model's input is the batch repeated `copies` times, copy-major: row c * batch + b is example b of copy c.
    replacement: [batch, heads, Lq, Lk] the matrices to inject (shared by every copy);
    replace: [copies, batch, heads] bool, which heads of which copy take them;
    real: [batch, 1, Lq, Lk] bool, the real block of each example (only there is anything replaced).
    """

    replacement: torch.Tensor
    replace: torch.Tensor
    real: torch.Tensor

    def apply(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [copies * batch, heads, Lq, Lk] -> the same with the chosen heads replaced on the real block."""
        copies, batch, heads = self.replace.shape
        if weights.shape[0] != copies * batch or weights.shape[1] != heads:
            raise RuntimeError(
                f"the injection is for {copies} copies of a batch of {batch} with {heads} heads, but the model ran "
                f"a batch of {weights.shape[0]} with {weights.shape[1]} heads: repeat the inputs copy-major"
            )
        chosen = self.replace[:, :, :, None, None] & self.real[None]
        replaced = torch.where(
            chosen, self.replacement[None].to(weights.dtype), weights.view(copies, batch, *weights.shape[1:])
        )
        return replaced.view(weights.shape)


@dataclass
class AttentionInjection:
    """Replacements by layer index for one forward pass (layers not listed run unchanged)."""

    layers: dict[int, LayerInjection] = field(default_factory=dict)


@dataclass
class AttentionCall:
    """One call of the attention function seen by `observe_attention_calls` (used to check an architecture's layout).

    weights: [batch, heads, query, key]; output: [batch, query, heads, head_dim], what the model's next module gets;
    sliding_window: the window argument the model passed (None: full attention), applied by the mask.
    visible: [query, key] bool, the keys the mask let each query of the first batch entry see (all without a mask).
    """

    module: torch.nn.Module
    layer_index: int
    weights: torch.Tensor
    output: torch.Tensor
    kv_heads: int = 0
    sliding_window: int | None = None
    visible: torch.Tensor | None = None


def visible_keys(attention_mask: torch.Tensor | None, queries: int, keys: int) -> torch.Tensor:
    """[query, key] bool: where the mask the attention function got lets a key through (first batch entry).
    An additive mask blocks with the dtype's lowest value (or -inf), a boolean one with False; no mask blocks
    nothing."""
    if attention_mask is None:
        return torch.ones((queries, keys), dtype=torch.bool)
    mask = attention_mask[0, 0, :, :keys].detach().cpu()  # a key-only mask [.., 1, keys] broadcasts over queries
    mask = mask.expand(queries, mask.shape[-1]) if mask.shape[0] == 1 else mask
    if mask.dtype == torch.bool:
        return mask.clone()
    return mask > torch.finfo(mask.dtype).min / 2


_active = threading.local()


@contextlib.contextmanager
def observe_attention_calls() -> Iterator[list[AttentionCall]]:
    """Within this context, every call of the backend's attention function is appended to the yielded list."""
    calls: list[AttentionCall] = []
    previous = getattr(_active, "observer", None)
    _active.observer = calls
    try:
        yield calls
    finally:
        _active.observer = previous


@contextlib.contextmanager
def capture_attention() -> Iterator[AttentionRecorder]:
    """Within this context, every call of the backend's attention function records into the yielded recorder."""
    recorder = AttentionRecorder()
    previous = getattr(_active, "recorder", None)
    _active.recorder = recorder
    try:
        yield recorder
    finally:
        _active.recorder = previous


@contextlib.contextmanager
def inject_attention(injection: AttentionInjection) -> Iterator[AttentionInjection]:
    """Within this context, the backend's attention function replaces probabilities as `injection` says."""
    previous = getattr(_active, "injection", None)
    _active.injection = injection
    try:
        yield injection
    finally:
        _active.injection = previous


@contextlib.contextmanager
def attention_held_constant() -> Iterator[None]:
    """Within this context, the backend's attention function computes the same probabilities but cuts their
    gradient: a backward pass flows through the values only (conservative propagation's rule for the softmax,
    analysis.conservative_propagation)."""
    previous = getattr(_active, "hold_constant", False)
    _active.hold_constant = True
    try:
        yield
    finally:
        _active.hold_constant = previous


def _repeat_kv_heads(states: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_groups, seq, head_dim]; query head h uses kv head
    h // n_groups, as in every grouped-query model of transformers."""
    if n_groups == 1:
        return states
    return states.repeat_interleave(n_groups, dim=1)


def effattn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention, as transformers' eager functions compute it, plus capture and injection.

    query: [batch, heads, query, head_dim]; key, value: [batch, kv_heads, key, head_dim];
    attention_mask: additive float mask [batch, 1, query, key] or None.
    softcap: scores become tanh(scores / softcap) * softcap before the mask (Gemma 2), as in its eager function.
    sliding_window: already applied by the mask function; a window shorter than the keys with no mask is refused.
    Returns (output [batch, query, heads, head_dim], weights [batch, heads, query, key]).
    """
    check_attention_arguments(module, kwargs)
    if kwargs.get("is_causal") and attention_mask is None and query.shape[-2] > 1:
        raise UnsupportedAttentionError(
            f"model type '{model_type_of(module)}' asks for causal attention (is_causal) but its attention got no "
            "mask: causality would be dropped; load the model through analysis.models so that the effattn mask "
            "function is registered"
        )
    if sliding_window is not None and attention_mask is None and key.shape[-2] > sliding_window:
        raise UnsupportedAttentionError(
            f"model type '{model_type_of(module)}' asks for a sliding window of {sliding_window} keys but its "
            f"attention got no mask for {key.shape[-2]} keys: the window would be dropped; load the model through "
            "analysis.models so that the effattn mask function is registered"
        )
    layer_index = getattr(module, "layer_idx", None)
    observer: list | None = getattr(_active, "observer", None)
    capturing = getattr(_active, "recorder", None) is not None or getattr(_active, "injection", None) is not None
    if layer_index is None and (capturing or observer is None):  # a probe may watch modules not yet indexed
        raise MissingLayerIndexError(
            f"the attention module {type(module).__name__} has no layer_idx: wrap the model with "
            "analysis.models.wrap_model (or load_model), which assigns one from the architecture's adapter record"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_groups = query.shape[1] // key.shape[1]
    key_states = _repeat_kv_heads(key, n_groups)
    value_states = _repeat_kv_heads(value, n_groups)

    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key_states.shape[-2]]
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    injection: AttentionInjection | None = getattr(_active, "injection", None)
    if injection is not None and layer_index in injection.layers:
        weights = injection.layers[layer_index].apply(weights)

    if getattr(_active, "hold_constant", False):
        weights = weights.detach()

    recorder: AttentionRecorder | None = getattr(_active, "recorder", None)
    if recorder is not None:
        recorder.record(layer_index, weights, value)

    weights_after_dropout = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights_after_dropout, value_states).transpose(1, 2).contiguous()
    if observer is not None:
        observer.append(
            AttentionCall(
                module=module,
                layer_index=layer_index,
                weights=weights.detach(),
                output=output.detach(),
                kv_heads=value.shape[1],
                sliding_window=sliding_window,
                visible=visible_keys(attention_mask, query.shape[-2], key_states.shape[-2]),
            )
        )
    return output, weights


def register_backend() -> None:
    """Register the attention function and the eager mask function under ATTENTION_IMPLEMENTATION (idempotent)."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, effattn_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


def use_capture_backend(model: torch.nn.Module) -> None:
    """Switch `model` (a transformers PreTrainedModel) to this module's attention function."""
    register_backend()
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


register_backend()
