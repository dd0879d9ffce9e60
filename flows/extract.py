"""The extraction stage as a Prefect flow: corpus + model -> attention store (resumable, whole shards)."""

from __future__ import annotations

from prefect import flow
from tqdm.auto import tqdm

from storage_schemas.attention_store import mark_shard_completed, open_attention_store
from tasks.extraction import extract_shard, prepare_store


@flow(name="effattn-extract")
def extract(
    corpus: str,
    model: str,
    store: str,
    max_length: int = 128,
    limit: int | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "cpu",
    text_column: str | None = None,
    label_column: str | None = None,
    shard_size: int | None = None,
    seed: int = 0,
    task: str = "classification",
    top_k: int = 10,
) -> str:
    """Capture attention, values and logits of `model` over `corpus` into the attention store at `store`.

    task "classification" stores the classifier's logits per example; "next-token" (decoders) stores the `top_k`
    largest next-token logits at every position. A rerun of the same call resumes: completed shards are
    skipped. Returns the store's URL.
    """
    todo, num_labels = prepare_store(
        store, corpus, model, max_length, limit, dtype, device, text_column, label_column, shard_size, seed,
        task, top_k,
    )
    group = open_attention_store(store, mode="r+")
    for shard_index in tqdm(todo, desc="extract shards", unit="shard", disable=not todo):
        extract_shard(store, shard_index, model, num_labels, device, seed, batch_size, task)
        mark_shard_completed(group, shard_index)
    return store
