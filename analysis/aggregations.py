"""How attention matrices become one attribution per token: the aggregations of the pooled row.

Numpy only (the explainer registry, analysis.explainers, reads AGGREGATIONS without importing torch). The matrices
are raw attention or an efficient variant (analysis.explainers' matrix methods) or norm matrices
(analysis.explanations.norm_attributions).
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS: dict[str, str] = {
    "last-layer": "the pooled row averaged over the heads of the last layer",
    "all-layers": "the pooled row averaged over every layer and head",
    "rollout": "the pooled row of attention rollout, prod over layers of (head mean + I) / 2 (Abnar & Zuidema 2020)",
}


def attention_rollout(head_mean: np.ndarray) -> np.ndarray:
    """head_mean: [layer, L, L] each layer's attention averaged over heads. Returns [L, L] = Â_{n-1} ··· Â_0 with
    Â = ½(Ā + I): how much each position of the last layer draws from each input token, through the residual."""
    layers, length, _ = head_mean.shape
    identity = np.eye(length)
    rollout = identity.copy()
    for layer in range(layers):
        rollout = (0.5 * head_mean[layer].astype(np.float64) + 0.5 * identity) @ rollout
    return rollout


def matrix_attributions(matrices: np.ndarray, pooled: int, aggregation: str) -> np.ndarray:
    """matrices: [layer, head, L, L] one example's attention (or efficient attention) on its real block.
    Returns [L] float64: the pooled row aggregated as AGGREGATIONS says."""
    matrices = np.asarray(matrices, dtype=np.float64)
    if aggregation == "last-layer":
        return matrices[-1].mean(0)[pooled]
    if aggregation == "all-layers":
        return matrices.mean((0, 1))[pooled]
    if aggregation == "rollout":
        return attention_rollout(matrices.mean(1))[pooled]
    raise ValueError(f"unknown aggregation {aggregation!r}: choose from {list(AGGREGATIONS)}")


def aggregation_layers(aggregation: str, layers: int) -> list[int]:
    """The layers an aggregation reads: the last one, or all."""
    return [layers - 1] if aggregation == "last-layer" else list(range(layers))
