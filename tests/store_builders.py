"""Real attention stores of the tiny conftest models, written without Prefect or Dask (fast): the extraction tasks'
plain functions (`.fn`) and the efficient stage's per-shard function, in this process."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from storage_schemas.attention_store import (
    create_attention_store,
    mark_prepared,
    mark_shard_completed,
    open_attention_store,
    read_texts,
    store_layout,
    write_example_metadata,
    write_shard,
)
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
    compute_variants(url, variants)
    return url


def compute_variants(url: str, variants: tuple[str, ...]) -> None:
    """Compute `variants` of efficient attention for every pending shard of the store at `url`, as the stage does."""
    if not variants:
        return
    group = open_attention_store(url, mode="r+")
    work = prepare_variants(url, list(variants), SETTINGS)
    for shard, shard_variants in work.items():
        _, written = compute_efficient_shard(url, shard, shard_variants, SETTINGS)
        for variant in written:
            mark_efficient_shard_completed(group, variant, shard)


def build_v1_store(url: str, model_folder: Path, corpus: Path, shard_size: int = 4, max_length: int = 24,
                   variants: tuple[str, ...] = ("effective", "stochastic", "simplex")) -> str:
    """`build_real_store`, but in the layout of attention store schema v1 (texts in a `string` array, chunks of one
    example x one layer), as an earlier effattn wrote it: the extraction's data, written through this version's
    writers in v1 mode (create_attention_store(schema_version=1), write_example_metadata, write_shard), with the
    same provenance attributes; then `variants` computed by the efficient stage."""
    source = f"{url}.v2-source"
    build_real_store(source, model_folder, corpus, shard_size, max_length, variants=())
    extracted = open_attention_store(source)
    layout = store_layout(extracted)
    provenance = {key: value for key, value in extracted.attrs.asdict().items()
                  if key not in ("schema", "schema_version", "layout", "completed_shards", "shard_identities",
                                 "prepared")}
    group = create_attention_store(url, layout, provenance, schema_version=1)
    write_example_metadata(group, extracted["tokens"][:], extracted["length"][:], extracted["untruncated_length"][:],
                           extracted["source_index"][:], extracted["label"][:], read_texts(extracted))
    group["w_out"][:] = extracted["w_out"][:]
    group["out_bias"][:] = extracted["out_bias"][:]
    mark_prepared(group)
    for shard in range(layout.n_shards):
        region = layout.shard_slice(shard)
        write_shard(group, shard, extracted["attention"][region], extracted["value"][region],
                    extracted["logits"][region])
        mark_shard_completed(group, shard)
    shutil.rmtree(source)
    compute_variants(url, variants)
    return url
