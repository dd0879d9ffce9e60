"""Prefect task of the training stage: a cached, reproducibly fine-tuned classifier for (base model, corpus)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from analysis.corpora import load_corpus
from analysis.training import (
    TrainingSettings,
    cached_model_card,
    check_trainable,
    default_cache_root,
    head_cache_key,
    train_classifier,
    trained_head_folder,
)
from tasks.models import cached_model
from tasks.stages import run_logger


@task(name="train-classifier-head", cache_policy=NO_CACHE)
def train_head(
    base: str,
    corpus_name: str,
    text_column: str | None,
    label_column: str | None,
    settings_dict: dict,
    cache_root: str | None,
) -> str:
    """The folder of a classifier fine-tuned from `base` on `corpus_name` with these settings.

    The folder is ``<cache_root>/heads/<key>`` (see analysis.training.head_cache_key; `cache_root` None means
    analysis.training.default_cache_root()). A folder with a complete
    model card is a cache hit and is returned at once; otherwise the model is trained into a temporary folder
    beside the target and renamed into place (a folder without a card, left by a crash, is replaced).
    """
    logger = run_logger("effattn.training")
    settings = TrainingSettings.from_dict(settings_dict)
    corpus = load_corpus(corpus_name, text_column=text_column, label_column=label_column)
    check_trainable(corpus)
    base_model = cached_model(base, len(corpus.class_names), "cpu", settings.seed)
    key = head_cache_key(base_model.weights_digest, corpus.digest, settings, growable=corpus.growable)
    target = trained_head_folder(Path(cache_root) if cache_root is not None else default_cache_root(), key)
    card = cached_model_card(target)
    if card is not None:
        logger.info(
            "trained head found in the cache: %s (held-out accuracy %s, majority baseline %s)",
            target,
            card["held_out_accuracy"],
            card["majority_baseline"]["held_out_accuracy"],
        )
        return str(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cached folder should be as readable as the cache
    try:
        card = train_classifier(base, corpus, settings, scratch)
        if card["base_model"]["weights_digest"] != base_model.weights_digest:
            raise RuntimeError(
                f"the base model {base!r} loaded with two different digests ({base_model.weights_digest} and "
                f"{card['base_model']['weights_digest']}): its weights changed during training; nothing was cached"
            )
        if target.exists():
            if cached_model_card(target) is not None:  # another run finished first: keep its folder
                return str(target)
            shutil.rmtree(target)  # a half-written folder (no complete card)
        os.replace(scratch, target)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "trained %s on %s in %.0f s: held-out accuracy %.4f (majority baseline %.4f) -> %s",
        base,
        corpus.name,
        card["train_seconds"],
        card["held_out_accuracy"],
        card["majority_baseline"]["held_out_accuracy"],
        target,
    )
    return str(target)
