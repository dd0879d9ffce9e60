"""Extraction throughput against the physical limit, memory growth with corpus size, bytes per example.

In one run, on the same batches of real rt-sentiment examples through MiniLM:
  * bare: the eager forward pass with output_attentions=True, nothing kept or written (the physical limit);
  * extract: capture + pad + write whole shards to a Zarr attention store, pipelined as the extract flow does it
    (shard k is written in a second thread while shard k+1 is computed).
The two alternate over --rounds rounds (each extraction into a fresh store) so that machine noise hits both
alike; the best round of each is reported, the usual estimator on a shared, noisy machine. Then the peak RSS of a
fresh process extracting N and 4N examples, and the bytes on disk per example.

With --end-to-end N1,N2: `effattn extract` as a user runs it (a subprocess, default settings, the head cached by a
first call), at --limit N1 and N2; the marginal cost per example (t2 - t1) / (N2 - N1) excludes the start-up
(imports, Prefect server, model load) and keeps the per-shard orchestration. The bare forward pass runs on the
very tokens each store holds, and its marginal cost per example is taken the same way.

    .venv/bin/python benchmarks/extraction_throughput.py [--examples 256] [--batch-size 16] [--max-length 128]
    .venv/bin/python benchmarks/extraction_throughput.py --end-to-end 64,320
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
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.corpora import load_corpus
from analysis.extraction import capture_examples, plan_extraction, real_token_mask
from analysis.models import load_model, output_projection_slices
from storage_schemas.attention_store import (
    AttentionStoreLayout,
    create_attention_store,
    default_shard_size,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    use_fast_codec_pipeline,
    write_example_metadata,
    write_shard,
)
from storage_schemas.inspection import size_on_disk


def build_store(url, loaded, plan, dtype, corpus):
    shape = loaded.shape
    layout = AttentionStoreLayout(
        n_examples=len(plan.length),
        max_length=plan.max_length,
        n_classes=2,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden=shape.hidden,
        shard_size=default_shard_size(plan.max_length, shape.layers, shape.heads, dtype),
        dtype=dtype,
    )
    group = create_attention_store(url, layout, {"benchmark": True})
    write_example_metadata(
        group,
        plan.tokens,
        plan.length,
        plan.untruncated_length,
        plan.source_index,
        corpus.labels[plan.source_index],
        np.array([corpus.texts[i] for i in plan.source_index]),
    )
    group["w_out"][:], group["out_bias"][:] = output_projection_slices(loaded.model, loaded.adapter)
    mark_prepared(group)
    return group, layout


@torch.inference_mode()
def bare_forward(model, tokens, length, batch_size):
    for start in range(0, len(length), batch_size):
        batch_length = int(length[start : start + batch_size].max())
        ids = torch.as_tensor(tokens[start : start + batch_size, :batch_length], dtype=torch.long)
        mask = torch.as_tensor(real_token_mask(length[start : start + batch_size], batch_length)).long()
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def extract_pipelined(loaded, plan, group, layout, batch_size: int, dtype: str) -> None:
    """Capture shard k+1 while shard k is written in a second thread, as the extract stage does in process
    (tasks.stages.run_shards_in_process)."""
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for shard in range(layout.n_shards):
            region = layout.shard_slice(shard)
            captured = capture_examples(loaded, plan.tokens[region], plan.length[region], batch_size, dtype)
            if pending is not None:
                mark_shard_completed(group, pending.result())
            pending = writer.submit(write_and_return, group, shard, captured)
        mark_shard_completed(group, pending.result())


def write_and_return(group, shard: int, captured) -> int:
    write_shard(group, shard, captured.attention, captured.value, captured.logits)
    return shard


def extract_all(examples: int, batch_size: int, max_length: int, dtype: str, url: str) -> None:
    """Extraction alone (for the memory measurement in a fresh process)."""
    corpus = load_corpus("rt-sentiment")
    loaded = load_model("minilm", num_labels=2)
    plan = plan_extraction(corpus.texts, loaded.tokenizer, max_length, limit=examples)
    group, layout = build_store(url, loaded, plan, dtype, corpus)
    extract_pipelined(loaded, plan, group, layout, batch_size, dtype)


def peak_rss_mib(examples, batch_size, max_length, dtype, folder) -> float:
    url = os.path.join(folder, f"rss-{examples}.zarr")
    code = (
        f"import resource, sys; sys.path.insert(0, {os.getcwd()!r}); import torch; "
        f"torch.set_num_threads({torch.get_num_threads()});"
        "from benchmarks.extraction_throughput import extract_all;"
        f"extract_all({examples}, {batch_size}, {max_length}, {dtype!r}, {url!r});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(output.strip().splitlines()[-1]) / 1024


def effattn_extract_seconds(limit: int, folder: str) -> tuple[float, str]:
    """Wall seconds of `effattn extract --corpus rt-sentiment --model minilm --limit LIMIT` (default settings) in a
    fresh process, and its store."""
    store = os.path.join(folder, f"end-to-end-{limit}.zarr")
    command = [
        os.path.join(os.path.dirname(sys.executable), "effattn"),
        "extract",
        "--corpus",
        "rt-sentiment",
        "--model",
        "minilm",
        "--limit",
        str(limit),
        "--store",
        store,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, store


def end_to_end(limits: tuple[int, int], batch_size: int, folder: str) -> dict[str, float]:
    """Marginal seconds per example of `effattn extract` between two corpus sizes, against the bare forward pass
    on the same tokens (each store's own `tokens` and `length`)."""
    print("end to end: a first `effattn extract` call caches the fine-tuned head (minutes if it is not cached yet)")
    effattn_extract_seconds(4, folder)
    bare_model = load_model("minilm", num_labels=2).model
    bare_model.set_attn_implementation("eager")
    extract_seconds, bare_seconds, examples = [], [], []
    for limit in limits:
        seconds, store = effattn_extract_seconds(limit, folder)
        group = open_attention_store(store)
        tokens, length = group["tokens"][:], group["length"][:]
        examples.append(len(length))  # the split may hold fewer than `limit`
        bare_forward(bare_model, tokens[:32], length[:32], batch_size)  # warm-up
        start = time.perf_counter()
        bare_forward(bare_model, tokens, length, batch_size)
        bare_seconds.append(time.perf_counter() - start)
        extract_seconds.append(seconds)
        print(
            f"  --limit {limit}: {examples[-1]} examples, effattn extract {seconds:.1f} s, bare forward on its "
            f"tokens {bare_seconds[-1]:.1f} s"
        )
    extract_ms = 1000 * (extract_seconds[1] - extract_seconds[0]) / (examples[1] - examples[0])
    bare_ms = 1000 * (bare_seconds[1] - bare_seconds[0]) / (examples[1] - examples[0])
    print(
        f"end to end, marginal cost per example between --limit {limits[0]} and {limits[1]}: effattn extract "
        f"{extract_ms:.1f} ms, bare forward {bare_ms:.1f} ms; ratio bare/extract {bare_ms / extract_ms:.2f} "
        f"(target >= 0.8); start-up of effattn extract (its time at --limit {limits[0]} minus the marginal cost "
        f"of those examples) {extract_seconds[0] - extract_ms * examples[0] / 1000:.1f} s"
    )
    return {
        "end_to_end_extract_ms_per_example": extract_ms,
        "end_to_end_bare_ms_per_example": bare_ms,
        "end_to_end_ratio": bare_ms / extract_ms,
    }


def main() -> None:
    use_fast_codec_pipeline()  # as the stages do
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--end-to-end", metavar="N1,N2", help="only the end-to-end measurement, at these limits")
    arguments = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if arguments.end_to_end:
        limits = tuple(int(item) for item in arguments.end_to_end.split(","))
        if len(limits) != 2 or not 0 < limits[0] < limits[1]:
            parser.error(f"--end-to-end {arguments.end_to_end}: give two corpus sizes, smaller first, e.g. 64,320")
        folder = tempfile.mkdtemp(prefix="effattn-bench-")
        try:
            print(json.dumps(end_to_end(limits, arguments.batch_size, folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return

    corpus = load_corpus("rt-sentiment")
    loaded = load_model("minilm", num_labels=2)
    plan = plan_extraction(corpus.texts, loaded.tokenizer, arguments.max_length, limit=arguments.examples)
    folder = tempfile.mkdtemp(prefix="effattn-bench-")
    try:
        bare_model = load_model("minilm", num_labels=2).model
        bare_model.set_attn_implementation("eager")
        bare_forward(bare_model, plan.tokens[:32], plan.length[:32], arguments.batch_size)  # warm-up
        bare_rounds, extract_rounds = [], []
        for round_index in range(arguments.rounds):
            url = os.path.join(folder, f"throughput-{round_index}.zarr")
            group, layout = build_store(url, loaded, plan, arguments.dtype, corpus)
            start = time.perf_counter()
            bare_forward(bare_model, plan.tokens, plan.length, arguments.batch_size)
            bare_seconds = time.perf_counter() - start
            start = time.perf_counter()
            extract_pipelined(loaded, plan, group, layout, arguments.batch_size, arguments.dtype)
            extract_seconds = time.perf_counter() - start
            bare_rounds.append(bare_seconds)
            extract_rounds.append(extract_seconds)
            print(f"round {round_index}: bare {bare_seconds:.2f} s, extraction {extract_seconds:.2f} s")
        bare_seconds, extract_seconds = min(bare_rounds), min(extract_rounds)
        n = len(plan.length)
        disk = size_on_disk(url)
        results = {
            "examples": n,
            "max_length": plan.max_length,
            "mean_length": float(plan.length.mean()),
            "shard_size": layout.shard_size,
            "threads": torch.get_num_threads(),
            "bare_forward_examples_per_s": n / bare_seconds,
            "extract_examples_per_s": n / extract_seconds,
            "throughput_ratio": bare_seconds / extract_seconds,
            "bytes_on_disk_per_example": disk / n,
        }
        print(
            f"examples {n}, stored max length {plan.max_length}, mean length {plan.length.mean():.1f}, "
            f"shard size {layout.shard_size}, torch threads {torch.get_num_threads()}"
        )
        print(f"bare eager forward (output_attentions=True): {results['bare_forward_examples_per_s']:.1f} examples/s")
        print(f"extraction (capture + write):               {results['extract_examples_per_s']:.1f} examples/s")
        print(f"throughput ratio extraction/bare:            {results['throughput_ratio']:.2f}  (target >= 0.8)")
        print(f"bytes on disk per example:                  {disk / n / 1024:.1f} KiB")
        if not arguments.skip_memory:
            small = peak_rss_mib(n, arguments.batch_size, arguments.max_length, arguments.dtype, folder)
            large = peak_rss_mib(4 * n, arguments.batch_size, arguments.max_length, arguments.dtype, folder)
            results.update(peak_rss_mib_n=small, peak_rss_mib_4n=large, rss_ratio=large / small)
            print(
                f"peak RSS, {n} examples: {small:.0f} MiB; {4 * n} examples: {large:.0f} MiB; "
                f"ratio {large / small:.2f}  (target <= 1.1)"
            )
        print(json.dumps(results))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
