"""The extraction stage as a Prefect flow: corpus + model -> attention store (resumable, whole shards)."""

from __future__ import annotations

from prefect import flow

from flows.preflight import check_device
from flows.settings import ExtractSettings
from storage_schemas.attention_store import use_fast_codec_pipeline
from tasks.extraction import EXTRACT_STAGE
from tasks.stages import StageRun, run_stage


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
    of the same call resumes: completed shards are skipped. In this process, shard k is written while shard k+1
    is computed; with `dask_address` / `workers`, each shard is one Dask task. Returns the store's URL.
    """
    use_fast_codec_pipeline()
    check_device(settings.device)  # before the lock or any results folder exists
    # One writer per store (the head's training included): tasks.extraction.EXTRACT_STAGE, tasks.stages.run_stage.
    return run_stage(
        EXTRACT_STAGE,
        StageRun(
            store=settings.store,
            results=settings.store,
            plan=settings,
            device=settings.device,
            batch_size=settings.batch_size,
            dask_address=settings.dask_address,
            workers=settings.workers,
        ),
    )
