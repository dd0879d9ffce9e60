"""Attention as an explanation: token attributions, their faithfulness (ERASER) and their rank agreement.

For one example (its real tokens only, no padding) the *pooled position* is where the prediction is read: [CLS]
(position 0) for an encoder classifier, the last real token for a decoder (classifier or next-token). The
*target* is the class (or next token) the unmodified model predicts there, and every score below is the model's
probability of that target at the pooled position.

Attributions, one score per token ([L] float64):
- from stored matrices (no forward pass): the pooled row of raw attention A or of an efficient variant E, averaged
  over the heads of the last layer (`last-layer`) or over every layer and head (`all-layers`), and attention
  rollout (Abnar & Zuidema 2020) over layers, R = Â_{n-1} ··· Â_0 with Â = ½(Ā + I) and Ā the head mean
  (`rollout`; for A, whose rows sum to 1, this is Abnar & Zuidema's row-normalised rollout; E's rows are not
  renormalised, they need not sum to 1);
- norm-based (`attention-norm:AGG`, Kobayashi et al. 2020, and its efficient twin `<variant>-norm:AGG`, E in place
  of A), from the stored A (or E), V and W_O: token j's contribution to position i is ‖Σ_h A^h_ij t^h_j‖ with
  t^h_j = v^h_j W_O^h (T's row, value bias included); the same three aggregations, rollout over the row-normalised
  norm matrices;
- from the model: input × gradient and integrated gradients (Captum) of the target probability with respect to the
  input embeddings (IG's baseline replaces every removable token's embedding by the removal token's), leave-one-out
  occlusion (one forward per token, batched), and conservative propagation (`conservative-lrp`,
  analysis.conservative_propagation: gradient × input of the target logit with attention probabilities,
  normalisation scales and activation gates held constant, the LRP-class rules of Ali et al. 2022 / AttnLRP);
- `random`: a seeded random ranking, the floor.
Each method is one record of analysis.explainers (name, kind, description, compute function, figure style); the
functions below (and the aggregations of analysis.aggregations) are what the built-in records compute, and
analysis.example_explanation.explain_example calls every record a run names. Neither imports the registry.

Where the question exists: an efficient variant's attribution can differ from raw attention's only where E ≠ A,
i.e. in a block with a null space (L > rank(T), or rank([T|1])) and |E − A| above the storage precision
(DIFFERENCE_TOLERANCE). `efficient_differences` measures that for the layers an aggregation reads; an example is
testable for a comparison of an efficient method with its raw twin only where it differs.

Removing a token (ERASER, DeYoung et al. 2020): its id is replaced by the mask token (the pad token when the
tokenizer has none) and the attention mask is 0 there, so no query attends to it. Special tokens and the pooled
position are never removed. Comprehensiveness at k %: p(x) − p(x without the top k % of removable tokens);
sufficiency: p(x) − p(only the top k % kept); the count is ceil(k/100 · removable), at least 1. AOPC: the mean over
the k's. Rank agreement: Kendall τ-b between two attributions over the removable tokens (Jain & Wallace 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.aggregations import AGGREGATIONS, attention_rollout
from analysis.models import LoadedModel

FAITHFULNESS_METRICS: dict[str, str] = {
    "comprehensiveness": "p(x) - p(x without the top k % tokens): the drop when the explanation's tokens are removed",
    "sufficiency": "p(x) - p(only the top k % tokens): the drop when only the explanation's tokens are kept",
}
# |E - A| at or below this (probabilities, stored as float32) is storage precision, not a difference
DIFFERENCE_TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------------------
# which tokens


def pooled_position(length: int, causal: bool) -> int:
    """Where the prediction is read: 0 ([CLS]) for an encoder, the last real token for a decoder."""
    return int(length) - 1 if causal else 0


def removable_tokens(tokens: np.ndarray, special_ids: Sequence[int], pooled: int) -> np.ndarray:
    """tokens: [L] the real ids. Returns [L] bool: True where a token may be removed (not special, not pooled)."""
    removable = ~np.isin(np.asarray(tokens), np.asarray(list(special_ids), dtype=np.int64))
    removable[pooled] = False
    return removable


def removal_token_id(tokenizer) -> int:
    """The id that replaces a removed token: the mask token, else the pad token."""
    for token_id in (getattr(tokenizer, "mask_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a mask nor a pad token: set tokenizer.pad_token before explaining")


# --------------------------------------------------------------------------------------------------------------
# attributions from stored matrices


def head_vectors(value: np.ndarray, w_out: np.ndarray) -> np.ndarray:
    """value: [kv_head, L, d] one layer's values (bias included) on the real tokens; w_out: [head, d, D] the heads'
    output projections. Returns T [head, L, D] float64, t^h_j = v^{kv(h)}_j W_O^h (query head h reads kv head
    h // (heads / kv_heads), as in every grouped-query model)."""
    value, w_out = np.asarray(value, dtype=np.float64), np.asarray(w_out, dtype=np.float64)
    groups = w_out.shape[0] // value.shape[0]
    return np.einsum("hld,hdo->hlo", np.repeat(value, groups, axis=0), w_out)


def norm_matrix(
    weights: np.ndarray, value: np.ndarray, w_out: np.ndarray, rows: np.ndarray | None = None, chunk_rows: int = 64
) -> np.ndarray:
    """Norm-based attention of one layer (Kobayashi et al. 2020): N[i, j] = ||sum_h weights[h, i, j] t^h_j||.

    weights: [head, L, L] A (or E) on the real block; value: [kv_head, L, d]; w_out: [head, d, D]; rows: the query
    rows wanted (default all). Returns [rows, L] float64. The heads x L x L x D tensor is never formed:
    ||sum_h w_h t^h_j||^2 = sum_{h,h'} w_h w_h' <t^h_j, t^h'_j>, from the per-token Gram matrices [L, head, head],
    `chunk_rows` query rows at a time (memory heads x chunk_rows x L)."""
    vectors = head_vectors(value, w_out)
    gram = np.einsum("hjo,kjo->jhk", vectors, vectors)
    weights = np.asarray(weights, dtype=np.float64)
    rows = np.arange(weights.shape[1]) if rows is None else np.asarray(rows)
    result = np.empty((len(rows), weights.shape[2]))
    for start in range(0, len(rows), chunk_rows):
        block = weights[:, rows[start : start + chunk_rows]]  # [head, chunk, L]
        squared = np.einsum("hij,jhk,kij->ij", block, gram, block, optimize=True)
        result[start : start + chunk_rows] = np.sqrt(np.maximum(squared, 0.0))
    return result


def norm_attributions(
    weights: np.ndarray, value: np.ndarray, w_out: np.ndarray, pooled: int, aggregation: str
) -> np.ndarray:
    """weights: [layer, head, L, L] A or E on the real block; value: [layer, kv_head, L, d]; w_out: [layer, head, d,
    D]. Returns [L] float64: the pooled row of the norm matrices, aggregated as AGGREGATIONS says (rollout over the
    row-normalised norm matrices; a row of zeros stays zero)."""
    layers = weights.shape[0]
    if aggregation == "last-layer":
        return norm_matrix(weights[-1], value[-1], w_out[-1], rows=np.array([pooled]))[0]
    if aggregation == "all-layers":
        return np.mean(
            [
                norm_matrix(weights[layer], value[layer], w_out[layer], rows=np.array([pooled]))[0]
                for layer in range(layers)
            ],
            axis=0,
        )
    if aggregation == "rollout":
        matrices = np.stack([norm_matrix(weights[layer], value[layer], w_out[layer]) for layer in range(layers)])
        sums = matrices.sum(-1, keepdims=True)
        return attention_rollout(np.divide(matrices, sums, out=np.zeros_like(matrices), where=sums > 0))[pooled]
    raise ValueError(f"unknown aggregation {aggregation!r}: choose from {list(AGGREGATIONS)}")


def efficient_differences(attention: np.ndarray, efficient: np.ndarray, null_dim: np.ndarray) -> np.ndarray:
    """attention, efficient: [layer, head, L, L] A and E on the real block; null_dim: [layer, head] the stored
    diagnostics. Returns [layer] float64: the largest |E - A| over the heads of each layer that have a null space
    (0 where none has: there E is A by construction)."""
    difference = np.abs(np.asarray(efficient, np.float64) - np.asarray(attention, np.float64)).max(axis=(2, 3))
    return np.where(np.asarray(null_dim) > 0, difference, 0.0).max(axis=1)


def draw_examples(candidates: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """candidates: [example] bool, where the question exists. Returns the sorted indices of `count` of them drawn
    without replacement by a generator seeded with `seed` (all of them when count is None or there are no more)."""
    chosen = np.flatnonzero(np.asarray(candidates, dtype=bool))
    if count is None or count >= len(chosen):
        return chosen
    return np.sort(np.random.default_rng([int(seed), 0x5EED]).choice(chosen, size=int(count), replace=False))


def random_attributions(length: int, seed: int, example_index: int) -> np.ndarray:
    """[L] a random ranking, the same for the same (seed, example)."""
    return np.random.default_rng([int(seed), int(example_index)]).permutation(length).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# the model's side


def pooled_logits(loaded: LoadedModel, pooled: int, **inputs) -> torch.Tensor:
    """The model's logits at the pooled position: [n, class] or [n, vocab]. A language model computes the vocabulary
    logits of the last position only when it is the pooled one (`logits_to_keep`; otherwise n x L x vocab floats)."""
    length = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
    if loaded.task == "next-token" and pooled == length - 1:
        return loaded.model(**inputs, logits_to_keep=1).logits[:, -1]
    logits = loaded.model(**inputs).logits
    return logits[:, pooled] if logits.ndim == 3 else logits


def target_probabilities(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooled: int,
    target: int,
    rows: int = 64,
) -> np.ndarray:
    """input_ids, attention_mask: [n, L]. Returns [n] float64: the probability of `target` at the pooled position,
    forward passes of at most `rows` rows."""
    found = []
    with torch.inference_mode():
        for start in range(0, input_ids.shape[0], rows):
            logits = pooled_logits(
                loaded,
                pooled,
                input_ids=input_ids[start : start + rows].to(loaded.device),
                attention_mask=attention_mask[start : start + rows].to(loaded.device),
            )
            found.append(torch.softmax(logits.double(), -1)[:, target].cpu().numpy())
    return np.concatenate(found) if found else np.zeros(0)


def kept_token_probabilities(
    loaded: LoadedModel,
    tokens: np.ndarray,
    keep: np.ndarray,
    pooled: int,
    target: int,
    replacement_id: int,
    rows: int = 64,
) -> np.ndarray:
    """tokens: [L] real ids; keep: [n, L] bool (False = removed: replaced by `replacement_id`, attention off).
    Returns [n] float64 target probabilities."""
    keep = torch.as_tensor(np.asarray(keep, dtype=bool))
    ids = torch.where(keep, torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None], int(replacement_id))
    return target_probabilities(loaded, ids, keep.long(), pooled, target, rows)


def predicted_target(loaded: LoadedModel, tokens: np.ndarray, pooled: int) -> int:
    """The class (or next token) the unmodified model predicts at the pooled position."""
    with torch.inference_mode():
        logits = pooled_logits(
            loaded, pooled, input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None].to(loaded.device)
        )
    return int(logits[0].argmax())


def ranked_removable(attributions: np.ndarray, removable: np.ndarray) -> np.ndarray:
    """Removable positions, highest attribution first (NaN last; ties by position)."""
    positions = np.flatnonzero(removable)
    scores = np.nan_to_num(np.asarray(attributions, dtype=np.float64)[positions], nan=-np.inf)
    return positions[np.argsort(-scores, kind="stable")]


def removal_count(percent: float, removable: int) -> int:
    """Tokens in the top `percent` %: ceil(percent/100 · removable), at least 1 (0 when nothing is removable)."""
    if removable == 0:
        return 0
    return min(removable, max(1, math.ceil(percent / 100 * removable - 1e-9)))


def faithfulness_masks(
    attributions: dict[str, np.ndarray], removable: np.ndarray, percents: Sequence[float]
) -> tuple[np.ndarray, list[tuple[str, str, int]]]:
    """The keep masks of every (method, metric, k): [rows, L] bool, and what each row is. Row 0 is the full
    input, row 1 the empty one (every removable token removed). A method with no score on any removable token (e.g.
    leave-one-out beyond its cap) gets no rows."""
    removable = np.asarray(removable, dtype=bool)
    masks = [np.ones_like(removable), ~removable]
    labels: list[tuple[str, str, int]] = [("", "full", -1), ("", "empty", -1)]
    for name, scores in attributions.items():
        if removable.any() and np.isnan(np.asarray(scores, dtype=np.float64)[removable]).all():
            continue
        order = ranked_removable(scores, removable)
        for index, percent in enumerate(percents):
            top = order[: removal_count(percent, len(order))]
            comprehensive = np.ones_like(removable)
            comprehensive[top] = False
            sufficient = ~removable
            sufficient[top] = True
            masks += [comprehensive, sufficient]
            labels += [(name, "comprehensiveness", index), (name, "sufficiency", index)]
    return np.stack(masks), labels


def faithfulness(
    score: Callable[[np.ndarray], np.ndarray],
    attributions: dict[str, np.ndarray],
    removable: np.ndarray,
    percents: Sequence[float],
) -> dict[str, np.ndarray | float]:
    """ERASER comprehensiveness and sufficiency of every method at every k, in one batched call of `score`
    (keep masks [n, L] -> target probabilities [n]) over the distinct masks.

    Returns {"comprehensiveness": [method, k], "sufficiency": [method, k] (methods in the order of
    `attributions`; NaN for a method without scores), "full": p(x), "empty": p(empty input)}."""
    masks, labels = faithfulness_masks(attributions, removable, percents)
    # one forward per distinct mask (small k's often remove the same tokens; keeping everything is the full input)
    distinct, inverse = np.unique(masks, axis=0, return_inverse=True)
    probabilities = score(distinct)[inverse.reshape(-1)]
    full = float(probabilities[0])
    result = {metric: np.full((len(attributions), len(percents)), np.nan) for metric in FAITHFULNESS_METRICS}
    names = list(attributions)
    for (name, metric, index), probability in zip(labels[2:], probabilities[2:]):
        result[metric][names.index(name), index] = full - probability
    return {**result, "full": full, "empty": float(probabilities[1])}


def aopc(curve: np.ndarray) -> np.ndarray:
    """Area over the perturbation curve: the mean over the k's (last dim) of comprehensiveness or sufficiency."""
    return np.asarray(curve, dtype=np.float64).mean(-1)


def leave_one_out(
    score: Callable[[np.ndarray], np.ndarray], full_probability: float, removable: np.ndarray, max_tokens: int
) -> np.ndarray:
    """[L] p(x) - p(x without token i) for every removable token i (NaN elsewhere, and everywhere when more than
    `max_tokens` tokens are removable: the cost cap). One batched call of `score`."""
    removable = np.asarray(removable, dtype=bool)
    result = np.full(len(removable), np.nan)
    positions = np.flatnonzero(removable)
    if not len(positions) or len(positions) > max_tokens:
        return result
    masks = np.ones((len(positions), len(removable)), dtype=bool)
    masks[np.arange(len(positions)), positions] = False
    result[positions] = full_probability - score(masks)
    return result


@dataclass
class GradientAttributions:
    """input_x_gradient, integrated_gradients: [L] per-token sums over the hidden dim; delta: Captum's convergence
    delta of integrated gradients (sum of attributions - (f(x) - f(baseline))); f_input, f_baseline: the target
    probability at the input and at the baseline."""

    input_x_gradient: np.ndarray
    integrated_gradients: np.ndarray
    delta: float
    f_input: float
    f_baseline: float


def gradient_attributions(
    loaded: LoadedModel,
    tokens: np.ndarray,
    removable: np.ndarray,
    pooled: int,
    target: int,
    replacement_id: int,
    steps: int = 32,
) -> GradientAttributions:
    """Input × gradient and integrated gradients (Captum) of the target probability for one example (tokens [L],
    unpadded) with respect to its input embeddings. IG's baseline: the removal token's embedding at every
    removable position, the input's elsewhere (so only removable tokens get attributions)."""
    from captum.attr import InputXGradient, IntegratedGradients

    model = loaded.model
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=loaded.device)[None]
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        inputs = embedding(ids).float()
        replaced = embedding(torch.full_like(ids, int(replacement_id))).float()
    where = torch.as_tensor(np.asarray(removable, dtype=bool), device=loaded.device)[None, :, None]
    baseline = torch.where(where, replaced, inputs)
    attention_mask = torch.ones_like(ids)

    def probability(embeddings: torch.Tensor) -> torch.Tensor:
        logits = pooled_logits(
            loaded, pooled, inputs_embeds=embeddings, attention_mask=attention_mask.expand(embeddings.shape[0], -1)
        )
        return torch.softmax(logits.float(), -1)[:, target]

    with torch.enable_grad():
        ixg = InputXGradient(probability).attribute(inputs.clone().requires_grad_(True))
        ig, delta = IntegratedGradients(probability).attribute(
            inputs,
            baselines=baseline,
            n_steps=int(steps),
            internal_batch_size=int(steps),
            return_convergence_delta=True,
        )
    with torch.no_grad():
        f_input, f_baseline = probability(torch.cat([inputs, baseline])).tolist()
    return GradientAttributions(
        input_x_gradient=ixg.sum(-1)[0].detach().double().cpu().numpy(),
        integrated_gradients=ig.sum(-1)[0].detach().double().cpu().numpy(),
        delta=float(delta.reshape(-1)[0]),
        f_input=float(f_input),
        f_baseline=float(f_baseline),
    )


def kendall_tau(attributions: np.ndarray, reference: np.ndarray, removable: np.ndarray) -> float:
    """Kendall τ-b of two attributions over the removable tokens (NaN with fewer than 2, or when either is
    constant or unmeasured)."""
    from scipy.stats import kendalltau

    chosen = np.asarray(removable, dtype=bool)
    first, second = np.asarray(attributions, np.float64)[chosen], np.asarray(reference, np.float64)[chosen]
    if len(first) < 2 or np.isnan(first).any() or np.isnan(second).any() or np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")
    return float(kendalltau(first, second).statistic)


def conservative_attributions(loaded: LoadedModel, tokens: np.ndarray, pooled: int, target: int) -> np.ndarray:
    """[L] conservative propagation's relevances of the target logit at the pooled position
    (analysis.conservative_propagation)."""
    from analysis.conservative_propagation import conservative_relevance

    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=loaded.device)[None]
    mask = torch.ones_like(ids)

    def logit(inputs_embeds: torch.Tensor) -> torch.Tensor:
        return pooled_logits(loaded, pooled, inputs_embeds=inputs_embeds, attention_mask=mask)[0, target]

    with torch.no_grad():
        embeddings = loaded.model.get_input_embeddings()(ids)
    return conservative_relevance(loaded.model, logit, embeddings)[0]
