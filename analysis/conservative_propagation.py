"""Conservative propagation: an LRP-class attribution through gradient × input (Ali et al. 2022, "XAI for
Transformers: Better Explanations through Conservative Propagation"; AttnLRP, Achtibat et al. 2024, keeps the same
rules for attention and normalisation).

Plain gradient × input is not conservative on a transformer: the softmax of attention, the scale of LayerNorm /
RMSNorm and the gate of a nonlinearity each make the network non-linear in its input. Holding them constant in the
backward pass (their values unchanged, their gradients cut) makes the logit a linear function of the input
embeddings along the path the backward pass sees, so the relevances R_j = x_j · ∂f/∂x_j (summed over the hidden dim)
add up to the explained logit f, less what the biases and position embeddings carry. The rules, applied with this
project's attention backend and forward hooks, so every supported architecture gets them without a fork of its code:

- attention: the probabilities are held constant (`analysis.attention_backend.attention_held_constant`): relevance
  flows through the values only (AttnLRP's rule for the softmax's output);
- LayerNorm: y = (x − mean(x)) / σ · w + b with σ constant (Ali et al.'s LN rule); RMSNorm: y = x · (w / rms) with
  the scale constant;
- an elementwise nonlinearity g (GELU, SiLU, tanh, ...): y = x · (g(x) / x) with the ratio constant (the identity
  rule of LRP for activations); in a gated MLP (the module has `gate_proj` or `gate_up_proj`), the activated gate
  that multiplies the up projection is held constant whole (the signal-take-all rule of Arras et al. 2017), since a
  product of two input-dependent factors would count its relevance twice.

A mixture-of-experts router's softmax weights are not modules and stay in the backward pass: such models get these
rules without exact conservation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch

from analysis.attention_backend import attention_held_constant

GATED_MLP_ATTRIBUTES = ("gate_proj", "gate_up_proj")  # a module with one of these multiplies act(gate) by up
# Activation modules are recognised by where their class is defined (torch's and transformers' activations).
ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def _is_activation(module: torch.nn.Module) -> bool:
    return type(module).__module__ in ACTIVATION_MODULES and not any(True for _ in module.parameters())


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _linear_layer_norm(module: torch.nn.LayerNorm, inputs, output: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its scale σ held constant: the same value, the gradient of (x − mean) / σ · w."""
    x = inputs[0]
    dims = tuple(range(-len(module.normalized_shape), 0))
    sigma = torch.sqrt(x.detach().var(dim=dims, unbiased=False, keepdim=True) + module.eps)
    moving = x - x.detach()  # zero, with x's gradient
    centred = moving - moving.mean(dim=dims, keepdim=True)
    scale = module.weight if module.weight is not None else 1.0
    return output.detach() + centred / sigma * scale


def _linear_scale(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """y = x · s(x) with the ratio s = y / x held constant (0 where x is 0: there y is 0 too for every rule here)."""
    x = inputs[0]
    ratio = torch.where(
        x.detach() != 0, output.detach() / torch.where(x.detach() != 0, x.detach(), 1.0), torch.zeros_like(output)
    )
    return output.detach() + (x - x.detach()) * ratio


def _held_constant(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


_active = threading.local()


def _in_this_thread(rule):
    """The hook applies `rule` only in a thread inside `conservative_rules`: a model cached and shared by a Dask
    worker's threads keeps its plain gradients in the others."""

    def hook(module, inputs, output):
        return rule(module, inputs, output) if getattr(_active, "depth", 0) else None

    return hook


@contextlib.contextmanager
def conservative_rules(model: torch.nn.Module) -> Iterator[int]:
    """Within this context, `model`'s forward passes in this thread compute the same values, and their backward
    passes follow the conservative rules (module docstring). Yields the number of modules given a rule. The model
    must use the effattn attention backend (analysis.attention_backend.use_capture_backend; analysis.models.wrap_model
    does it). The rules are idempotent, so two threads in this context on one model give the same gradients."""
    handles = []
    gates = set()
    for module in model.modules():
        if any(hasattr(module, name) for name in GATED_MLP_ATTRIBUTES):
            gates.update(id(child) for child in module.children() if _is_activation(child))
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            rule = _linear_layer_norm
        elif _is_rms_norm(module):
            rule = _linear_scale
        elif _is_activation(module):
            rule = _held_constant if id(module) in gates else _linear_scale
        else:
            continue
        handles.append(module.register_forward_hook(_in_this_thread(rule)))
    _active.depth = getattr(_active, "depth", 0) + 1
    try:
        with attention_held_constant():
            yield len(handles)
    finally:
        _active.depth -= 1
        for handle in handles:
            handle.remove()


def conservative_relevance(model: torch.nn.Module, logit, inputs_embeds: torch.Tensor) -> tuple[np.ndarray, float]:
    """inputs_embeds: [1, L, hidden]; logit: embeddings [1, L, hidden] -> the scalar explained (e.g. the target
    class's logit at the pooled position). Returns (relevances [L] float64: x · ∂f/∂x summed over the hidden dim,
    under the conservative rules; the logit f). Relevances sum to f less the share of biases and position
    embeddings (exactly f when those are zero)."""
    embeddings = inputs_embeds.detach().float().clone().requires_grad_(True)
    with torch.enable_grad(), conservative_rules(model):
        value = logit(embeddings)
        (gradient,) = torch.autograd.grad(value, embeddings)
    return (embeddings.detach() * gradient).sum(-1)[0].double().cpu().numpy(), float(value.detach())
