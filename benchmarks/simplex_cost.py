"""Cost of the simplex variant against the closed-form variants (effective + stochastic), on the same examples.

Real inputs, the bundled MiniLM, two kinds of shard (--corpus, both by default, in one run):

  rt-sentiment  the --rt-examples (64) longest snippets of the corpus (natural lengths, about 60-80 tokens): the
                examples of a store's longest shard (extraction sorts examples by length)
  bbc-topic     --examples (2) articles captured at each L in --lengths (articles are long, so every example is
                truncated to exactly L tokens)

One example = every layer x head of its L x L attention. For each shard it times, on the same captured tensors, in
one process (single-threaded torch unless --threads):

  closed   efficient_attention(..., variants=("effective", "stochastic"))       s / example
  simplex  efficient_attention(..., variants=("simplex",)) with this checkout's solver
  before   the same with the solver of --before-commit (default: the solver before issue 29's active-set start,
           analysis/simplex_solver.py or, for commits before it existed, analysis/efficient_attention.py, loaded
           from git into a separate module), and the largest entry difference between the two solutions

and prints L, closed s/example, simplex s/example, ratio simplex/closed, the 'before' figures, the most Newton
iterations of a row (iters) and the mean over heads of each head's most (h-mean).
Target (issue 29): simplex within 5x of the closed forms on both.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/simplex_cost.py [--corpus rt-sentiment bbc-topic] [--examples 2]
        [--rt-examples 64] [--lengths 64 128 256 512] [--before-commit REV | --no-before] [--cpu-time]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from analysis.corpora import load_corpus  # noqa: E402
from analysis.efficient_attention import efficient_attention  # noqa: E402
from analysis.extraction import capture_examples, plan_extraction  # noqa: E402
from analysis.models import load_model, output_projection_slices  # noqa: E402
from analysis.variants import registered_variant, variant_record  # noqa: E402

# The solver in its own module before the tracked Jacobians (earlier: 90e9b18, main when issue 29's simplex work
# began; issue 17's solver: 83b7cf9).
DEFAULT_BEFORE = "d63b453"


def load_engine_at(commit: str):
    """The simplex solver as it was at `commit`, imported as a separate module (the 'before' solver):
    analysis/simplex_solver.py, or analysis/efficient_attention.py for commits before the solver had its module."""
    for module_path in ("analysis/simplex_solver.py", "analysis/efficient_attention.py"):
        shown = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{module_path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"commit {commit} has neither analysis/simplex_solver.py nor analysis/efficient_attention.py")
    path = os.path.join(tempfile.mkdtemp(prefix="effattn-before-"), "efficient_attention_before.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("efficient_attention_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def before_simplex(before, attention, value, w_out, lengths):
    """The simplex variant computed by the 'before' module's own solver. (Variants are computed by their record's
    function, which imports this checkout's module: the 'before' solver is registered as a variant of its own. A
    module from before the variant records computes the simplex variant itself.)"""
    if not hasattr(before, "simplex_projection"):
        return before.efficient_attention(attention, value, w_out, lengths, causal=False, variants=("simplex",))[
            "simplex"
        ]
    record = dataclasses.replace(variant_record("simplex"), name="simplex-before", compute=before.simplex_projection)
    # An old driver module computes with its own kernels; the solver's own module runs under this checkout's driver.
    driver = before.efficient_attention if hasattr(before, "efficient_attention") else efficient_attention
    with registered_variant(record):
        return driver(attention, value, w_out, lengths, causal=False, variants=(record.name,))[record.name]


def capture(loaded, texts, length: int, examples: int):
    """Examples of exactly `length` tokens: attention [n, layer, head, L, L], value, lengths (float32 capture)."""
    plan = plan_extraction(texts, loaded.tokenizer, length, limit=None)
    full = np.nonzero(plan.length == length)[0][:examples]
    if len(full) < examples:
        raise SystemExit(f"only {len(full)} bbc-topic articles reach {length} tokens; pass fewer --examples")
    captured = capture_examples(loaded, plan.tokens[full], plan.length[full], examples)
    return captured.attention, captured.value, plan.length[full].astype(np.int64)


def capture_longest(loaded, texts, examples: int, max_length: int = 128):
    """The `examples` longest texts (at most `max_length` tokens), padded to the longest: attention, value, lengths."""
    plan = plan_extraction(texts, loaded.tokenizer, max_length, limit=None)
    longest = np.arange(len(plan.length) - examples, len(plan.length))  # the plan is sorted by length
    captured = capture_examples(loaded, plan.tokens[longest], plan.length[longest], examples)
    return captured.attention, captured.value, plan.length[longest].astype(np.int64)


def timed(function, *arguments, **keywords):
    """(seconds, result): wall seconds, or with --cpu-time this process's CPU seconds (fairer on a shared machine)."""
    clock = time.process_time if CPU_TIME else time.perf_counter
    start = clock()
    result = function(*arguments, **keywords)
    return clock() - start, result


CPU_TIME = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus", choices=("bbc-topic", "rt-sentiment"), nargs="+", default=["rt-sentiment", "bbc-topic"]
    )
    parser.add_argument("--examples", type=int, default=2, help="bbc-topic: articles per length")
    parser.add_argument("--rt-examples", type=int, default=64, help="rt-sentiment: the longest shard's examples")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="bbc-topic: the lengths L to capture at"
    )
    parser.add_argument("--before-commit", default=DEFAULT_BEFORE)
    parser.add_argument("--no-before", action="store_true", help="skip the (slow) 'before' solver")
    parser.add_argument(
        "--before-max-length",
        type=int,
        default=512,
        help="time the 'before' solver only up to this L (it is slow at 512)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU seconds instead of wall seconds (for a loaded machine)",
    )
    arguments = parser.parse_args()
    global CPU_TIME
    CPU_TIME = arguments.cpu_time
    torch.set_num_threads(arguments.threads)

    before = None if arguments.no_before else load_engine_at(arguments.before_commit)
    for corpus in arguments.corpus:
        report_corpus(corpus, arguments, before)


def report_corpus(corpus: str, arguments: argparse.Namespace, before) -> None:
    """Print one line per shard of `corpus`: closed forms, this checkout's simplex, the 'before' simplex."""
    loaded = load_model("minilm", num_labels=5 if corpus == "bbc-topic" else 2)
    w_out, _ = output_projection_slices(loaded.model, loaded.adapter)
    texts = load_corpus(corpus).texts
    examples = arguments.examples if corpus == "bbc-topic" else arguments.rt_examples
    print(
        f"minilm over {corpus}, {examples} example(s) per shard, torch threads "
        f"{arguments.threads}; 'before' = {arguments.before_commit}, {'CPU' if CPU_TIME else 'wall'} seconds"
    )
    header = (
        f"{'L':>7} {'closed s/ex':>12} {'simplex s/ex':>13} {'ratio':>7} {'before s/ex':>12} "
        f"{'before ratio':>13} {'speed-up':>9} {'max |diff|':>11} {'iters':>6} {'h-mean':>6}"
    )
    print(header)
    if corpus == "bbc-topic":
        shards = (
            (str(length), lambda length=length: capture(loaded, texts, length, examples))
            for length in arguments.lengths
        )
    else:
        shards = [("longest", lambda: capture_longest(loaded, texts, examples))]
    for label, captured in shards:
        attention, value, lengths = captured()
        if label == "longest":
            label = f"{lengths.min()}-{lengths.max()}"
        n = len(lengths)
        closed_time, _ = timed(
            efficient_attention, attention, value, w_out, lengths, causal=False, variants=("effective", "stochastic")
        )
        simplex_time, simplex = timed(
            efficient_attention, attention, value, w_out, lengths, causal=False, variants=("simplex",)
        )
        simplex = simplex["simplex"]
        row = f"{label:>7} {closed_time / n:>12.3f} {simplex_time / n:>13.3f} {simplex_time / closed_time:>7.1f}"
        if before is not None and lengths.max() <= arguments.before_max_length:
            before_time, reference = timed(before_simplex, before, attention, value, w_out, lengths)
            difference = np.abs(reference.efficient - simplex.efficient).max()
            row += (
                f" {before_time / n:>12.3f} {before_time / closed_time:>13.1f} "
                f"{before_time / simplex_time:>9.1f} {difference:>11.2e}"
            )
        else:
            row += f" {'-':>12} {'-':>13} {'-':>9} {'-':>11}"
        iterations = simplex.diagnostics["iterations"]
        row += f" {int(iterations.max()):>6} {float(iterations.mean()):>6.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
