"""The training stage as a Prefect flow: fine-tune a classifier (encoder + head) on a labelled corpus, cached."""

from __future__ import annotations

from prefect import flow

from analysis.training import TrainingSettings
from tasks.training import train_head


@flow(name="effattn-train")
def train(
    corpus: str,
    model: str = "minilm",
    epochs: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    max_length: int = 128,
    max_train_examples: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    cache_root: str | None = None,
) -> str:
    """Fine-tune `model` on the train split of `corpus` and return the folder of the trained model.

    The folder (``<cache_root>/heads/<key>``, cache root default ``$EFFATTN_CACHE`` or ``~/.cache/effattn``) is
    a Hugging Face model folder that ``load_model`` and ``effattn extract --model`` accept, with a
    ``model_card.json``. A second call with the same model, corpus and settings returns the cached folder.

    Raises:
        ValueError: an unlabelled or single-class corpus ("cannot train a classifier on an unlabelled corpus ..."),
            invalid settings, an unknown corpus or model.
    """
    settings = TrainingSettings(
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_length=max_length,
        max_train_examples=max_train_examples,
    )
    return train_head(model, corpus, text_column, label_column, settings.as_dict(), cache_root)
