"""Cost per example of each explanation method against one plain forward pass of the same example.

Real rt-sentiment examples through MiniLM (random head: the cost does not depend on it), one example at a time as
the explanation stage runs them (analysis.explanations), best of --rounds rounds per example, summed over the
examples:
  * forward: one plain forward pass of the example (the unit of every ratio);
  * <source>:<aggregation>: the attribution from stored matrices (no forward pass);
  * attention-norm:<aggregation>: norm-based attention from the stored A, V and W_O (no forward pass);
  * ERASER per method: comprehensiveness and sufficiency at k = 1, 5, 10, 20, 50 % for one method (batched);
  * gradients: input x gradient and integrated gradients together (Captum, --ig-steps steps);
  * leave-one-out: one forward per removable token, batched;
  * conservative-lrp: conservative propagation, one forward and one backward pass under its rules;
  * minimality: the simplex rows' support test, --minimality-rows sampled rows per layer (needs the simplex rows,
    whose cost is the efficient stage's and is printed apart).

    .venv/bin/python benchmarks/explanation_cost.py [--examples 8] [--rounds 3] [--model minilm]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.aggregations import AGGREGATIONS, matrix_attributions
from analysis.corpora import load_corpus
from analysis.efficient_attention import efficient_attention
from analysis.explainers import PERCENTS
from analysis.explanations import (
    conservative_attributions,
    faithfulness,
    gradient_attributions,
    kept_token_probabilities,
    leave_one_out,
    norm_attributions,
    pooled_position,
    predicted_target,
    removable_tokens,
    removal_token_id,
)
from analysis.extraction import forward_with_capture, plan_extraction
from analysis.models import load_model, output_projection_slices
from analysis.support_minimality import layer_minimality


def best_of(rounds: int, function) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--minimality-rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    loaded = load_model(arguments.model, num_labels=2)
    plan = plan_extraction(
        load_corpus("rt-sentiment").texts, loaded.tokenizer, arguments.max_length, limit=arguments.examples
    )
    w_out, _ = output_projection_slices(loaded.model, loaded.adapter)
    special = loaded.tokenizer.all_special_ids
    replacement = removal_token_id(loaded.tokenizer)
    costs: dict[str, float] = {}
    simplex_seconds = 0.0

    def add(name: str, seconds: float) -> None:
        costs[name] = costs.get(name, 0.0) + seconds

    for row in range(len(plan.length)):
        length = int(plan.length[row])
        tokens = plan.tokens[row, :length]
        batch = tokens[None].astype(np.int64)
        captured, _ = forward_with_capture(loaded, batch, np.array([length]))
        attention = np.stack([layer.attention[0].float().cpu().numpy() for layer in captured])
        value = np.stack([layer.value[0].float().cpu().numpy() for layer in captured])
        pooled = pooled_position(length, loaded.causal)
        removable = removable_tokens(tokens, special, pooled)
        target = predicted_target(loaded, tokens, pooled)

        def score(keep, tokens=tokens, pooled=pooled, target=target):
            return kept_token_probabilities(loaded, tokens, keep, pooled, target, replacement)

        add("forward", best_of(arguments.rounds, lambda: score(np.ones((1, length), dtype=bool))))
        for aggregation in AGGREGATIONS:
            add(
                f"attention:{aggregation}",
                best_of(arguments.rounds, lambda a=aggregation: matrix_attributions(attention, pooled, a)),
            )
        for aggregation in AGGREGATIONS:
            add(
                f"attention-norm:{aggregation}",
                best_of(arguments.rounds, lambda a=aggregation: norm_attributions(attention, value, w_out, pooled, a)),
            )
        scores = {"attention:rollout": matrix_attributions(attention, pooled, "rollout")}
        add("ERASER per method", best_of(arguments.rounds, lambda: faithfulness(score, scores, removable, PERCENTS)))
        add(
            "gradients (IxG + IG)",
            best_of(
                arguments.rounds,
                lambda: gradient_attributions(
                    loaded, tokens, removable, pooled, target, replacement, arguments.ig_steps
                ),
            ),
        )
        add(
            "conservative-lrp",
            best_of(arguments.rounds, lambda: conservative_attributions(loaded, tokens, pooled, target)),
        )
        full = float(score(np.ones((1, length), dtype=bool))[0])
        add("leave-one-out", best_of(arguments.rounds, lambda: leave_one_out(score, full, removable, 10**6)))
        began = time.perf_counter()
        simplex = efficient_attention(
            attention[None], value[None], w_out, np.array([length]), loaded.causal, variants=["simplex"]
        )["simplex"].efficient[0]
        simplex_seconds += time.perf_counter() - began
        add(
            "minimality",
            best_of(
                arguments.rounds,
                lambda: layer_minimality(
                    attention, simplex, value, w_out, arguments.minimality_rows, np.random.default_rng(0), 1e-8
                ),
            ),
        )

    forward = costs["forward"]
    count = len(plan.length)
    print(
        f"{arguments.model}, {count} rt-sentiment examples (mean length {plan.length.mean():.1f}), "
        f"{arguments.threads} torch threads, best of {arguments.rounds} rounds, IG {arguments.ig_steps} steps, "
        f"{arguments.minimality_rows} minimality rows per layer"
    )
    print(f"  {'method':<26} {'ms / example':>13} {'ratio to forward':>17}")
    for name, seconds in costs.items():
        print(f"  {name:<26} {1000 * seconds / count:13.2f} {seconds / forward:17.1f}")
    print(
        f"  (simplex rows for the minimality test: {1000 * simplex_seconds / count:.1f} ms / example, the efficient "
        "stage's cost)"
    )


if __name__ == "__main__":
    main()
