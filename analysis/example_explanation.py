"""One example, every method a run names: attributions, faithfulness and rank agreement (`explain_example`).

The driver of the explanation study: it iterates the explainer records (analysis.explainers), each of which
computes its attribution with the functions of analysis.explanations and analysis.aggregations, and measures them
all the same way (ERASER faithfulness, Kendall τ against the references, testability against raw attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.aggregations import aggregation_layers
from analysis.explainers import (
    ATTENTION_SOURCE,
    ExampleInputs,
    ExplanationSettings,
    explainer_record,
    references,
)
from analysis.explanations import (
    DIFFERENCE_TOLERANCE,
    FAITHFULNESS_METRICS,
    efficient_differences,
    faithfulness,
    kendall_tau,
    kept_token_probabilities,
    pooled_position,
    predicted_target,
    removable_tokens,
    removal_token_id,
)
from analysis.models import LoadedModel


@dataclass
class ExampleExplanation:
    """Everything measured for one example (methods in the given order; k in `percents` order).

    attributions: [method, L] (NaN where a token may not be removed); faithfulness: {metric: [method, k]};
    kendall_tau: [method, reference]; target: the predicted class / token; full_probability, empty_probability;
    integrated_gradients_delta: NaN when IG was not run; removable: [L] bool; largest_difference: [method] the
    largest |E − A| over the blocks with a null space in the layers the method's aggregation reads (NaN for methods
    that read no efficient variant); testable: [method] 1 where that exceeds DIFFERENCE_TOLERANCE (the method can
    differ from its raw twin), 0 where it cannot, -1 for methods that read no efficient variant."""

    attributions: np.ndarray
    faithfulness: dict[str, np.ndarray]
    kendall_tau: np.ndarray
    target: int
    full_probability: float
    empty_probability: float
    integrated_gradients_delta: float
    removable: np.ndarray
    largest_difference: np.ndarray
    testable: np.ndarray


def explain_example(
    loaded: LoadedModel,
    tokens: np.ndarray,
    matrices: dict[str, np.ndarray],
    settings: ExplanationSettings,
    example_index: int,
    causal: bool,
    rows: int = 64,
    value: np.ndarray | None = None,
    w_out: np.ndarray | None = None,
    null_dims: dict[str, np.ndarray] | None = None,
) -> ExampleExplanation:
    """Every method of `settings.methods`: attributions, faithfulness and rank agreement for one example.

    tokens: [L] the real ids; matrices: {source: [layer, head, L, L]} raw attention ('attention') and each
    efficient variant on the real block; example_index: the store's index (seeds the random ranking); value:
    [layer, kv_head, L, d] and w_out: [layer, head, d, D] (norm-based methods); null_dims: {variant: [layer, head]}
    the stored diagnostics (testability of the efficient methods; without them every head counts as having a null
    space)."""
    tokens = np.asarray(tokens)
    length = len(tokens)
    pooled = pooled_position(length, causal)
    special = getattr(loaded.tokenizer, "all_special_ids", [])
    removable = removable_tokens(tokens, special, pooled)
    replacement = removal_token_id(loaded.tokenizer)
    target = predicted_target(loaded, tokens, pooled)

    def score(keep: np.ndarray) -> np.ndarray:
        return kept_token_probabilities(loaded, tokens, keep, pooled, target, replacement, rows)

    records = [explainer_record(name) for name in settings.methods]
    for record in records:
        if record.reads_matrices and record.source not in matrices:
            raise ValueError(f"method {record.name} needs the stored matrices of {record.source!r}")
    differences = {}
    for source in {record.source for record in records if record.is_efficient}:
        if ATTENTION_SOURCE not in matrices:
            raise ValueError(
                f"efficient methods of {source!r} need the stored matrices of {source!r} and of {ATTENTION_SOURCE!r}"
            )
        null_dim = (null_dims or {}).get(source, np.ones(matrices[source].shape[:2], dtype=np.int64))
        differences[source] = efficient_differences(matrices[ATTENTION_SOURCE], matrices[source], null_dim)
    largest_difference = np.full(len(records), np.nan)
    testable = np.full(len(records), -1, dtype=np.int8)
    for row, record in enumerate(records):
        if record.is_efficient:
            layers = aggregation_layers(record.aggregation, len(differences[record.source]))
            largest_difference[row] = differences[record.source][layers].max()
            testable[row] = int(largest_difference[row] > DIFFERENCE_TOLERANCE)
    example = ExampleInputs(
        loaded=loaded,
        tokens=tokens,
        pooled=pooled,
        target=target,
        removable=removable,
        replacement_id=replacement,
        matrices=matrices,
        value=value,
        w_out=w_out,
        settings=settings,
        example_index=example_index,
        score=score,
        full_probability=float(score(np.ones((1, length), dtype=bool))[0]),
    )
    attributions = {record.name: np.asarray(record.compute(example, record), dtype=np.float64) for record in records}
    measured = faithfulness(score, attributions, removable, settings.percents)
    taus = np.full((len(records), len(references())), np.nan)
    for column, reference in enumerate(references()):
        if reference in attributions:
            for row, name in enumerate(attributions):
                taus[row, column] = kendall_tau(attributions[name], attributions[reference], removable)
    stacked = np.stack([np.where(removable, attributions[name], np.nan) for name in attributions])
    return ExampleExplanation(
        attributions=stacked,
        faithfulness={metric: measured[metric] for metric in FAITHFULNESS_METRICS},
        kendall_tau=taus,
        target=target,
        full_probability=example.full_probability,
        empty_probability=measured["empty"],
        integrated_gradients_delta=example.integrated_gradients_delta,
        removable=removable,
        largest_difference=largest_difference,
        testable=testable,
    )
