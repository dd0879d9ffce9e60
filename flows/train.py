"""The training stage as a Prefect flow: fine-tune a classifier (encoder + head) on a labelled corpus, cached."""

from __future__ import annotations

from prefect import flow

from flows.settings import TrainSettings
from tasks.training import train_head


@flow(name="effattn-train")
def train(settings: TrainSettings) -> str:
    """Fine-tune `settings.model` on the train split of `settings.corpus` and return the folder of the trained
    model.

    The folder (``<cache_root>/heads/<key>``, cache root default ``$EFFATTN_CACHE`` or ``~/.cache/effattn``) is
    a Hugging Face model folder that ``load_model`` and ``effattn extract --model`` accept, with a
    ``model_card.json``. A second call with the same model, corpus and settings returns the cached folder.

    Raises:
        ValueError: an unlabelled or single-class corpus ("cannot train a classifier on an unlabelled corpus ..."),
            invalid settings, an unknown corpus or model.
    """
    return train_head(
        settings.model,
        settings.corpus,
        settings.text_column,
        settings.label_column,
        settings.training().as_dict(),
        settings.cache_root,
    )
