"""Cost of an intervened forward pass against the plain eager forward pass, on the same batches.

In one run, on the same batches of real rt-sentiment examples through MiniLM (random head: the cost does not
depend on it), all timed in alternation over --rounds rounds, best round reported:
  * eager: the model with transformers' own "eager" attention (no output_attentions): the reference;
  * backend: the same model on the effattn backend, nothing injected;
  * intervened (all): efficient attention injected into every head of every layer (one copy of the batch);
  * intervened (heads): 4 targets of single heads in one pass (4 copies of the batch), cost per copy;
and, separately, the cost of building the injected matrices (analysis.interventions) for the same batches.

Then the rows of a pass (analysis.causal.rows_per_pass), at 512 tokens (the longest bbc-topic articles, 5 classes)
and at rt-sentiment's lengths (up to 128): the same (targets x examples) rows, timed as
  * plain: the same number of rows as plain forward passes (batches of --batch-size examples, once per target);
  * fixed rows (before): intervened passes of `forward_rows` (64) rows whatever the length;
  * budget (after): intervened passes of rows_per_pass(64, L) rows (64 up to 128 positions, 4 at 512);
each with its ratio to plain (target <= 1.3 at 512 tokens). Targets: every head, and one layer at a time.

    .venv/bin/python benchmarks/causal_forward.py [--examples 128] [--batch-size 16] [--rounds 5]
    .venv/bin/python benchmarks/causal_forward.py --rows-only [--long-examples 16] [--targets 4]
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

from analysis.causal import Target, forward_groups, intervened_logits, plain_logits, rows_per_pass
from analysis.corpora import load_corpus
from analysis.efficient_attention import efficient_attention
from analysis.extraction import capture_examples, plan_extraction
from analysis.interventions import Intervention, intervention_matrices
from analysis.models import load_model, output_projection_slices


def batches(plan, batch_size):
    for start in range(0, len(plan.length), batch_size):
        yield plan.tokens[start : start + batch_size], plan.length[start : start + batch_size]


def timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows-only", action="store_true", help="only the rows of a pass, before and after")
    parser.add_argument("--long-examples", type=int, default=16, help="bbc-topic articles at 512 tokens")
    parser.add_argument("--targets", type=int, default=4, help="targets per example: all, then layers")
    parser.add_argument("--forward-rows", type=int, default=64)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    if not arguments.rows_only:
        compare_backends(arguments)
    print(
        f"rows of a pass: {arguments.targets} targets, forward_rows {arguments.forward_rows}, "
        f"{arguments.threads} torch threads, best of {arguments.rounds} rounds"
    )
    rt = load_corpus("rt-sentiment")
    bbc = load_corpus("bbc-topic")
    for corpus, labels, max_length, examples in (
        (bbc, 5, 512, arguments.long_examples),
        (rt, 2, 128, arguments.examples),
    ):
        compare_rows(arguments, corpus, labels, max_length, examples)


def compare_rows(arguments, corpus, labels: int, max_length: int, examples: int) -> None:
    """Plain passes against intervened passes of fixed rows and of budgeted rows, on the same rows (the longest
    `examples` texts of `corpus` at `max_length`, in batches of --batch-size examples as the causal stage reads
    them). The stored attention is injected (replay): what is injected does not change the cost."""
    loaded = load_model("minilm", num_labels=labels)
    plan = plan_extraction(corpus.texts, loaded.tokenizer, max_length)
    chosen = np.sort(np.argsort(plan.length, kind="stable")[-examples:])
    tokens, length = plan.tokens[chosen], plan.length[chosen]
    layers, heads = loaded.shape.layers, loaded.shape.heads
    targets = [Target("all")] + [Target("layer", layer) for layer in range(layers)]
    masks = np.stack([target.mask(layers, heads) for target in targets[: arguments.targets]])
    batches = []
    for start in range(0, len(length), arguments.batch_size):
        batch = slice(start, start + arguments.batch_size)
        captured = capture_examples(loaded, tokens[batch], length[batch], arguments.batch_size)
        batches.append((tokens[batch], length[batch], captured.attention))

    def plain() -> None:
        for batch_tokens, batch_length, _ in batches:
            for _ in masks:
                plain_logits(loaded, batch_tokens, batch_length)

    def intervened(budget: bool) -> int:
        passes = 0
        for batch_tokens, batch_length, attention in batches:
            everything = np.arange(len(batch_length))
            for examples, group in forward_groups(
                everything, list(range(len(masks))), arguments.forward_rows, batch_length if budget else None
            ):
                intervened_logits(
                    loaded, batch_tokens[examples], batch_length[examples], attention[examples], masks[group]
                )
                passes += 1
        return passes

    runs = {
        "plain": plain,
        "fixed rows (before)": lambda: intervened(False),
        "budget (after)": lambda: intervened(True),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(arguments.rounds):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    rows = len(masks) * len(length)
    longest = int(length.max())
    print(f"  {corpus.name}: {len(length)} examples, lengths {int(length.min())}..{longest}, {rows} rows")
    for name, budget in (("plain", None), ("fixed rows (before)", False), ("budget (after)", True)):
        detail = (
            ""
            if budget is None
            else (
                f"  {intervened_passes(batches, len(masks), arguments.forward_rows, budget)} passes of at most "
                f"{rows_per_pass(arguments.forward_rows, longest) if budget else arguments.forward_rows} rows"
            )
        )
        print(
            f"    {name:<22} {best[name]:8.2f} s   ratio to plain {best[name] / best['plain']:5.2f}{detail}", flush=True
        )


def intervened_passes(batches, targets: int, forward_rows: int, budget: bool) -> int:
    return sum(
        len(
            list(
                forward_groups(
                    np.arange(len(batch_length)), list(range(targets)), forward_rows, batch_length if budget else None
                )
            )
        )
        for _, batch_length, _ in batches
    )


def compare_backends(arguments) -> None:
    """The eager model, the effattn backend and intervened passes on the same rt-sentiment batches."""

    corpus = load_corpus("rt-sentiment")
    loaded = load_model("minilm", num_labels=2)
    eager = load_model("minilm", num_labels=2)
    eager.model.set_attn_implementation("eager")
    plan = plan_extraction(corpus.texts, loaded.tokenizer, 128, limit=arguments.examples)
    w_out, _ = output_projection_slices(loaded.model, loaded.adapter)
    layers, heads = loaded.shape.layers, loaded.shape.heads
    everything = Target("all").mask(layers, heads)[None]
    single_heads = np.stack([Target("head", layer, 0).mask(layers, heads) for layer in range(4)])

    prepared = []
    build_seconds = 0.0
    for tokens, length in batches(plan, arguments.batch_size):
        shard = capture_examples(loaded, tokens, length, arguments.batch_size)
        efficient = efficient_attention(
            shard.attention, shard.value, w_out, length, causal=False, variants=["effective"]
        )["effective"].efficient
        began = time.perf_counter()
        matrices = intervention_matrices(
            Intervention("efficient", "effective"),
            shard.attention,
            shard.value,
            w_out,
            length,
            False,
            efficient=efficient,
        )
        build_seconds += time.perf_counter() - began
        prepared.append((tokens, length, matrices))
    began = time.perf_counter()
    for tokens, length, _matrices in prepared[:2]:
        shard = capture_examples(loaded, tokens, length, arguments.batch_size)
        efficient = efficient_attention(
            shard.attention, shard.value, w_out, length, causal=False, variants=["stochastic"]
        )["stochastic"].efficient
        intervention_matrices(
            Intervention("efficient+null-noise", "stochastic"),
            shard.attention,
            shard.value,
            w_out,
            length,
            False,
            efficient=efficient,
        )
    noise_seconds = (time.perf_counter() - began) / min(2, len(prepared))

    runs = {
        "eager": lambda: [plain_logits(eager, t, n) for t, n, _ in prepared],
        "backend": lambda: [plain_logits(loaded, t, n) for t, n, _ in prepared],
        "intervened (all)": lambda: [intervened_logits(loaded, t, n, m, everything) for t, n, m in prepared],
        "intervened (4 heads, per copy)": lambda: [
            intervened_logits(loaded, t, n, m, single_heads) for t, n, m in prepared
        ],
    }
    best = {name: float("inf") for name in runs}
    for _ in range(arguments.rounds):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    best["intervened (4 heads, per copy)"] /= len(single_heads)
    mean_length = float(plan.length.mean())
    print(
        f"MiniLM, {len(plan.length)} rt-sentiment examples (mean length {mean_length:.1f}), batch "
        f"{arguments.batch_size}, {arguments.threads} torch threads, best of {arguments.rounds} rounds"
    )
    for name, seconds in best.items():
        print(
            f"  {name:<32} {seconds:7.3f} s   {len(plan.length) / seconds:7.1f} examples/s   "
            f"ratio to eager {seconds / best['eager']:.2f}"
        )
    print(f"  building efficient matrices      {build_seconds:7.3f} s (once per batch and intervention)")
    print(f"  building null-noise matrices     {noise_seconds:7.3f} s per batch of {arguments.batch_size}")


if __name__ == "__main__":
    main()
