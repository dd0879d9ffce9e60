"""Bytes on disk per example, and what float16 storage does to the study, float32 against float16 in one run:

1. bytes on disk per example (attention, value, and the whole store) of real MiniLM attention for rt-sentiment
   (--max-length 128, the default) and bbc-topic at 512 tokens, extracted in-process into a store of each dtype
   (a random head: the bytes do not depend on it);
2. `effattn run` (effective + stochastic, the causal stage, no explanations) on the same --examples held-out
   rt-sentiment examples in each dtype, as a user runs it (head cached by a first call): E·T = A·T (largest
   output residual of each variant), replay (largest |Δlogit| against the stored logits, and its tolerance),
   the sufficient claim (predictions kept when E is injected everywhere), and how far the float16 store's
   A and E are from the float32 one's.

  .venv/bin/python benchmarks/storage_dtype.py [--examples 64] [--size-examples 16]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.corpora import load_corpus
from analysis.extraction import capture_examples, plan_extraction
from analysis.models import load_model
from analysis.run_summary import summarize_variant
from benchmarks.extraction_throughput import build_store
from storage_schemas.attention_store import (
    mark_shard_completed,
    open_attention_store,
    store_layout,
    use_fast_codec_pipeline,
    write_shard,
)
from storage_schemas.causal_results import open_causal_results
from storage_schemas.inspection import size_on_disk
from storage_schemas.pipeline_runs import read_diagnostics

VARIANTS = ("effective", "stochastic")
CORPORA = (("rt-sentiment", 128), ("bbc-topic", 512))


def bytes_per_example(corpus_name: str, max_length: int, dtype: str, examples: int, folder: str) -> dict[str, float]:
    corpus = load_corpus(corpus_name)
    loaded = load_model("minilm", num_labels=2)
    plan = plan_extraction(corpus.texts, loaded.tokenizer, max_length, limit=examples)
    url = os.path.join(folder, f"{corpus_name}-{dtype}.zarr")
    group, layout = build_store(url, loaded, plan, dtype, corpus)
    for shard in range(layout.n_shards):
        region = layout.shard_slice(shard)
        captured = capture_examples(loaded, plan.tokens[region], plan.length[region], 8, dtype)
        write_shard(group, shard, captured.attention, captured.value, captured.logits)
        mark_shard_completed(group, shard)
    n = len(plan.length)
    sizes = {name: size_on_disk(os.path.join(url, name)) / n for name in ("attention", "value")}
    shutil.rmtree(url)
    return {**sizes, "mean_length": float(plan.length.mean()), "stored_length": plan.max_length}


def effattn_run(dtype: str, examples: int, folder: str) -> tuple[str, str]:
    store, results = os.path.join(folder, f"run-{dtype}.zarr"), os.path.join(folder, f"run-{dtype}.results.zarr")
    command = [
        os.path.join(os.path.dirname(sys.executable), "effattn"),
        "run",
        "--corpus",
        "rt-sentiment",
        "--model",
        "minilm",
        "--limit",
        str(examples),
        "--dtype",
        dtype,
        "--variants",
        ",".join(VARIANTS),
        "--explain-examples",
        "0",
        "--run-dir",
        folder,
        "--store",
        store,
        "--results",
        results,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return store, results


def claim(results: str, name: str) -> str:
    return next(row["measured"] for row in open_causal_results(results).attrs["claims"] if row["claim"] == name)


def main() -> None:
    use_fast_codec_pipeline()  # as the stages do
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="rt-sentiment examples of the two pipeline runs")
    parser.add_argument("--size-examples", type=int, default=16, help="examples of each bytes-on-disk store")
    arguments = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="effattn-bench-")
    results: dict[str, float] = {}
    try:
        print("1. bytes on disk per example (MiniLM: 6 layers x 12 heads)")
        for corpus_name, max_length in CORPORA:
            for dtype in ("float32", "float16"):
                sizes = bytes_per_example(corpus_name, max_length, dtype, arguments.size_examples, folder)
                key = f"{corpus_name}_{max_length}_{dtype}"
                results.update({f"{key}_attention_bytes": sizes["attention"], f"{key}_value_bytes": sizes["value"]})
                print(
                    f"   {corpus_name} at {max_length} tokens (stored length {sizes['stored_length']}, mean "
                    f"{sizes['mean_length']:.0f}), {dtype}: attention {sizes['attention'] / 2**20:.2f} MiB, value "
                    f"{sizes['value'] / 2**20:.2f} MiB per example"
                )

        print(f"2. effattn run on {arguments.examples} rt-sentiment examples, float32 against float16")
        runs = {dtype: effattn_run(dtype, arguments.examples, folder) for dtype in ("float32", "float16")}
        stores = {dtype: open_attention_store(store) for dtype, (store, _) in runs.items()}
        for dtype, (store, result_url) in runs.items():
            layout = store_layout(stores[dtype])
            residuals = {
                variant: summarize_variant(read_diagnostics(store, variant))["max_output_residual"]
                for variant in VARIANTS
            }
            results.update({f"{dtype}_{variant}_max_output_residual": value for variant, value in residuals.items()})
            results[f"{dtype}_store_bytes_per_example"] = size_on_disk(store) / layout.n_examples
            print(
                f"   {dtype}: store {results[f'{dtype}_store_bytes_per_example'] / 2**20:.2f} MiB per example with "
                f"both variants; largest ||E·T - A·T|| / ||A·T||: "
                + ", ".join(f"{variant} {value:.1e}" for variant, value in residuals.items())
            )
            print(f"      replay: {claim(result_url, 'replay reproduces the stored model')}")
            for variant in VARIANTS:
                print(f"      sufficient ({variant}): {claim(result_url, f'sufficient ({variant})')}")
        region = slice(None)
        attention = {dtype: group["attention"][region].astype(np.float64) for dtype, group in stores.items()}
        difference = float(np.abs(attention["float16"] - attention["float32"]).max())
        results["float16_max_attention_difference"] = difference
        print(f"   float16 against float32 on the same examples: largest |ΔA| {difference:.1e}", end="")
        for variant in VARIANTS:
            efficient = {
                dtype: group[f"efficient/{variant}"][region].astype(np.float64) for dtype, group in stores.items()
            }
            difference = float(np.abs(efficient["float16"] - efficient["float32"]).max())
            results[f"float16_max_{variant}_difference"] = difference
            print(f", largest |ΔE| ({variant}) {difference:.1e}", end="")
        print()
        print(json.dumps(results))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
