"""Real attention stores of the tiny conftest models, written without Prefect or Dask (fast): the extraction tasks'
plain functions (`.fn`) and the efficient stage's per-shard function, in this process."""

from __future__ import annotations

import csv
from pathlib import Path

from storage_schemas.attention_store import mark_shard_completed, open_attention_store
from storage_schemas.efficient_store import mark_efficient_shard_completed
from tasks.efficient import compute_efficient_shard, prepare_variants
from tasks.extraction import capture_shard, prepare_store, write_captured_shard
from tests.conftest import REVIEW_ROWS

SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}


def write_corpus(path: Path, copies: int = 1) -> Path:
    """The conftest reviews, `copies` times (each copy's texts marked so that no two rows are equal)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for copy in range(copies):
            writer.writerows((f"{text} (take {copy})" if copies > 1 else text, label) for text, label in REVIEW_ROWS)
    return path


def build_real_store(url: str, model_folder: Path, corpus: Path, shard_size: int = 4, max_length: int = 24,
                     variants: tuple[str, ...] = ("effective", "stochastic", "simplex")) -> str:
    """Extract every example of `corpus` with the model at `model_folder` into `url` (shards of `shard_size`), then
    compute `variants` of efficient attention for every shard; all recorded as done, as the stages do."""
    todo, num_labels = prepare_store.fn(str(url), str(corpus), str(model_folder), max_length, None, "float32", "cpu",
                                        None, None, shard_size, 0)
    group = open_attention_store(url, mode="r+")
    for shard in todo:
        captured = capture_shard.fn(url, shard, str(model_folder), num_labels, "cpu", 0, 4)
        mark_shard_completed(group, write_captured_shard.fn(url, shard, captured))
    if variants:
        work = prepare_variants(url, list(variants), SETTINGS)
        for shard, shard_variants in work.items():
            _, written = compute_efficient_shard(url, shard, shard_variants, SETTINGS)
            for variant in written:
                mark_efficient_shard_completed(group, variant, shard)
    return url
