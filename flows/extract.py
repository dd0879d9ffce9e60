"""The extraction stage as a Prefect flow: corpus + model -> attention store (resumable, whole shards)."""

from __future__ import annotations

from prefect import flow
from tqdm.auto import tqdm

from analysis.corpora import load_corpus
from analysis.models import has_trained_head
from analysis.training import TrainingSettings, head_to_train
from flows.preflight import check_device
from flows.settings import ExtractSettings
from storage_schemas.attention_store import mark_shard_completed, open_attention_store, use_fast_codec_pipeline
from storage_schemas.store_lock import hold_store_lock
from tasks.dask_cluster import dask_client, run_shard_tasks, task_resources, use_stage_cluster
from tasks.extraction import capture_shard, extract_shard_on_worker, prepare_store, write_captured_shard
from tasks.training import train_head


@flow(name="effattn-extract")
def extract(settings: ExtractSettings) -> str:
    """Capture attention, values and logits of `model` over `corpus` into the attention store at `store` (the
    fields of `settings`, flows.settings.ExtractSettings).

    task "classification" stores the classifier's logits per example; "next-token" (decoders) stores the `top_k`
    largest next-token logits at every position. For classification of a labelled corpus with a model that has
    no trained head (e.g. `minilm`), a head is first fine-tuned on the corpus's train split (`epochs`, `seed`,
    `max_length`; cached under `cache_root`, see flows.train) unless `train` is False (then the head is random,
    drawn from `seed`: for smoke tests only). `split` ("all", "train", "held_out") chooses the corpus rows;
    its default is "held_out" when this run trained the head and "all" otherwise. `layers` / `heads` (text such
    as "0,3,5" or "0-2"; None: all) choose the model layers and heads stored (storage_schemas.selection). A rerun
    of the same call resumes: completed shards are skipped. Returns the store's URL.
    """
    use_fast_codec_pipeline()
    corpus, model, store, text_column, label_column = (
        settings.corpus,
        settings.model,
        settings.store,
        settings.text_column,
        settings.label_column,
    )
    task, split, seed, device = settings.task, settings.split, settings.seed, settings.device
    loaded_corpus = load_corpus(corpus, text_column=text_column, label_column=label_column)
    # One writer per store: a second run into it is refused, naming this one, until this one ends.
    check_device(device)  # before the lock or any results folder exists
    with hold_store_lock(store, "extract"):
        if head_to_train(loaded_corpus, task, settings.train, has_trained_head(model)):
            training = TrainingSettings(epochs=settings.epochs, max_length=settings.max_length, seed=seed)
            model = train_head(model, corpus, text_column, label_column, training.as_dict(), settings.cache_root)
            split = split or "held_out"
        split = split or "all"
        todo, num_labels = prepare_store(
            store,
            corpus,
            model,
            settings.max_length,
            settings.limit,
            settings.dtype,
            device,
            text_column,
            label_column,
            settings.shard_size,
            seed,
            task,
            settings.top_k,
            split,
            layers=settings.layers,
            heads=settings.heads,
        )
        group = open_attention_store(store, mode="r+")
        if use_stage_cluster(settings.dask_address, settings.workers):
            _extract_on_cluster(settings, todo, model, num_labels, group)
            return store
        # Pipelined: shard k is written (a submitted task, in a thread) while shard k+1 is computed; a shard is
        # recorded as completed only once its write has returned.
        pending_write = None
        try:
            for shard_index in tqdm(todo, desc="extract shards", unit="shard", disable=not todo):
                captured = capture_shard(store, shard_index, model, num_labels, device, seed, settings.batch_size, task)
                if pending_write is not None:
                    mark_shard_completed(group, pending_write.result())
                pending_write = write_captured_shard.submit(store, shard_index, captured)
            if pending_write is not None:
                mark_shard_completed(group, pending_write.result())
                pending_write = None
        finally:
            if pending_write is not None:  # a failure elsewhere: let the write end before the lock is released
                pending_write.wait()
        return store


def _extract_on_cluster(settings: ExtractSettings, todo: list[int], model: str, num_labels: int, group) -> None:
    """One Dask task per pending shard (`extract_shard_on_worker`: the worker captures the shard and writes it
    whole to the store's URL); this process records each shard as its task returns, so a rerun resumes. With
    --device cuda each task asks for one GPU (a Dask resource)."""
    if not todo:
        return
    arguments = (model, num_labels, settings.device, settings.seed, settings.batch_size, settings.task)
    with dask_client(settings.dask_address, settings.workers) as client:
        run_shard_tasks(
            client,
            [(shard, extract_shard_on_worker, (settings.store, shard, *arguments)) for shard in todo],
            lambda shard, _: mark_shard_completed(group, shard),
            "extract shards",
            resources=task_resources(settings.device),
        )
