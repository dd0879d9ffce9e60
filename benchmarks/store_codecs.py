"""Codec levers of the attention store, side by side on the same real shard.

One run: a real rt-sentiment attention store through MiniLM (extracted as the extract flow does it), then its first
shard's `attention` and `value` rewritten and read back whole, and its layer 0 alone, under every combination of
  * codec pipeline: zarr-python's default (batches of CHUNK_CODEC_BATCH_SIZE chunks), `zarrs` (Rust, parallel), or
    `effattn` (FAST_CODEC_PIPELINE, what the stages use: zarrs, but part-of-shard reads such as one layer go through
    zarr-python's pipeline, which checks their checksums);
  * inner chunk: one example x one layer (schema 1) or one example x all layers;
  * compression: zstd level 1, zstd level 3, none (crc32c only, always kept).
Best of --rounds for each, in MiB/s of uncompressed array data and examples/s, plus bytes on disk.
`--bytes-per-example` instead prints the bytes on disk per example of whole default stores, float32 and float16,
rt-sentiment and bbc-topic, at --max-length (default 512).

    .venv/bin/python benchmarks/store_codecs.py [--examples 64] [--max-length 128] [--rounds 3]
    .venv/bin/python benchmarks/store_codecs.py --bytes-per-example [--examples 8] [--max-length 512]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import shutil
import sys
import tempfile
import time

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage_schemas.attention_store import (
    CHUNK_CODEC_BATCH_SIZE,
    FAST_CODEC_PIPELINE,
    open_attention_store,
)
from storage_schemas.inspection import size_on_disk

PIPELINES = {
    "default": {
        "codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline",
        "codec_pipeline.batch_size": CHUNK_CODEC_BATCH_SIZE,
    },
    "zarrs": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"},
    "effattn": {"codec_pipeline.path": FAST_CODEC_PIPELINE, "codec_pipeline.batch_size": CHUNK_CODEC_BATCH_SIZE},
}
COMPRESSIONS = {
    "zstd1": [ZstdCodec(level=1), Crc32cCodec()],
    "zstd3": [ZstdCodec(level=3), Crc32cCodec()],
    "none": [Crc32cCodec()],
}


def real_store(folder: str, corpus: str, examples: int, max_length: int, dtype: str) -> str:
    """Extract `examples` examples of `corpus` through MiniLM into a default store; returns its path."""
    import benchmarks.extraction_throughput as throughput
    from analysis.corpora import load_corpus
    from analysis.extraction import plan_extraction
    from analysis.models import load_model

    url = os.path.join(folder, f"{corpus}-{dtype}-{max_length}.zarr")
    texts = load_corpus(corpus)
    loaded = load_model("minilm", num_labels=len(set(texts.labels.tolist())))
    plan = plan_extraction(texts.texts, loaded.tokenizer, max_length, limit=examples)
    group, layout = throughput.build_store(url, loaded, plan, dtype, texts)
    throughput.extract_pipelined(loaded, plan, group, layout, 16, dtype)
    return url


def measure(
    data: np.ndarray, name: str, folder: str, pipeline: str, per_layer: bool, compression: str, rounds: int
) -> tuple[float, float, float, int]:
    """Best write and read seconds of one whole shard `data` [S, layers, ...], best read seconds of its layer 0,
    and its bytes on disk."""
    chunks = (1, 1 if per_layer else data.shape[1], *data.shape[2:])
    best_write = best_read = best_layer = float("inf")
    if pipeline == "effattn":
        import storage_schemas.zarrs_pipeline  # noqa: F401 - registers FAST_CODEC_PIPELINE with zarr
    with zarr.config.set(PIPELINES[pipeline]):
        for round_index in range(rounds):
            path = os.path.join(folder, f"{name}-{pipeline}-{per_layer}-{compression}-{round_index}.zarr")
            array = zarr.create_array(
                path,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks,
                shards=data.shape,
                compressors=COMPRESSIONS[compression],
                fill_value=0,
            )
            start = time.perf_counter()
            array[:] = data
            best_write = min(best_write, time.perf_counter() - start)
            reopened = zarr.open_array(path, mode="r")
            start = time.perf_counter()
            read = reopened[:]
            best_read = min(best_read, time.perf_counter() - start)
            start = time.perf_counter()
            layer = reopened[:, 0]
            best_layer = min(best_layer, time.perf_counter() - start)
            if not (np.array_equal(read, data) and np.array_equal(layer, data[:, 0])):
                raise AssertionError(f"{name} {pipeline} {compression}: read back differs from what was written")
            on_disk = size_on_disk(path)
            if round_index < rounds - 1:
                shutil.rmtree(path)
    # the same bytes must be readable by the other pipeline (zarrs writes spec-compliant shards)
    other = "zarrs" if pipeline == "default" else "default"
    with zarr.config.set(PIPELINES[other]):
        if not np.array_equal(zarr.open_array(path, mode="r")[:], data):
            raise AssertionError(f"{name} written by {pipeline} reads differently through {other}")
    shutil.rmtree(path)
    return best_write, best_read, best_layer, on_disk


def codec_table(examples: int, max_length: int, rounds: int) -> None:
    folder = tempfile.mkdtemp(prefix="effattn-codecs-")
    try:
        group = open_attention_store(real_store(folder, "rt-sentiment", examples, max_length, "float32"))
        shard = slice(0, min(examples, group["attention"].shards[0]))
        arrays = {name: group[name][shard] for name in ("attention", "value")}
        print(
            f"{shard.stop} real rt-sentiment examples through MiniLM, max_length {max_length}, float32; "
            f"best of {rounds}; MiB/s of uncompressed data"
        )
        print(
            f"{'array':9} {'pipeline':8} {'chunk':13} {'codec':6} {'write MiB/s':>11} {'read MiB/s':>10} "
            f"{'layer 0 MiB/s':>13} {'write ex/s':>10} {'read ex/s':>9} {'MiB on disk':>11}"
        )
        for name, data in arrays.items():
            mib = data.nbytes / 2**20
            for per_layer in (True, False):
                for compression in COMPRESSIONS:
                    for pipeline in PIPELINES:
                        write, read, layer, on_disk = measure(
                            data, name, folder, pipeline, per_layer, compression, rounds
                        )
                        chunk = "ex x layer" if per_layer else "ex x all"
                        print(
                            f"{name:9} {pipeline:8} {chunk:13} {compression:6} {mib / write:11.0f} "
                            f"{mib / read:10.0f} {mib / data.shape[1] / layer:13.0f} {len(data) / write:10.0f} "
                            f"{len(data) / read:9.0f} "
                            f"{on_disk / 2**20:11.1f}"
                        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bytes_per_example(examples: int, max_length: int) -> None:
    folder = tempfile.mkdtemp(prefix="effattn-bytes-")
    try:
        print(f"bytes on disk per example of a default store (MiniLM, {examples} examples, max_length {max_length})")
        for corpus in ("rt-sentiment", "bbc-topic"):
            for dtype in ("float32", "float16"):
                url = real_store(folder, corpus, examples, max_length, dtype)
                group = open_attention_store(url)
                stored = int(group["length"][:].shape[0])
                print(
                    f"{corpus:13} {dtype:8} {size_on_disk(url) / stored / 2**20:8.2f} MiB/example "
                    f"(mean length {float(np.mean(group['length'][:])):.0f} tokens)"
                )
                shutil.rmtree(url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=None, help="64 for the codec table, 8 for --bytes-per-example")
    parser.add_argument("--max-length", type=int, default=None, help="128 for the codec table, 512 for bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes-per-example", action="store_true")
    arguments = parser.parse_args()
    if arguments.bytes_per_example:
        bytes_per_example(arguments.examples or 8, arguments.max_length or 512)
    else:
        codec_table(arguments.examples or 64, arguments.max_length or 128, arguments.rounds)


if __name__ == "__main__":
    main()
