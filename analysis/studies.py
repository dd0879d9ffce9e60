"""The four study datasets: for each, the task, corpus, model, split, max length and how its head is trained.

A study is what the claims of SEED.md are measured on. Classification studies extract the held-out split of
their corpus through a head fine-tuned on the train split (analysis.training); the next-token study needs no
training: the prediction is the decoder's argmax next token at every position of held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.training import TrainingSettings


@dataclass(frozen=True)
class Study:
    name: str
    task: str  # "classification" or "next-token"
    corpus: str
    model: str
    split: str  # the split that is extracted and tested ("held_out": never seen in training)
    max_length: int
    training: TrainingSettings | None  # None: no head to train
    target: str  # what the model must reach for the study to be meaningful, and why

    def description(self) -> str:
        return (
            f"{self.name}: {self.task} of {self.corpus} with {self.model}, {self.split} split, "
            f"max {self.max_length} tokens"
        )


STUDIES: dict[str, Study] = {
    "rt-sentiment": Study(
        name="rt-sentiment",
        task="classification",
        corpus="rt-sentiment",
        model="minilm",
        split="held_out",
        max_length=128,
        training=TrainingSettings(epochs=1, max_length=128),
        target="held-out accuracy >= 0.75 (majority class: 0.578)",
    ),
    "bbc-topic": Study(
        name="bbc-topic",
        task="classification",
        corpus="bbc-topic",
        model="minilm",
        split="held_out",
        max_length=128,
        training=TrainingSettings(epochs=2, max_length=128),
        target="held-out accuracy >= 0.90 (majority class: 0.229); 128 tokens keep the headline and lead",
    ),
    "political-party": Study(
        name="political-party",
        task="classification",
        corpus="political-party",
        model="minilm",
        split="held_out",
        max_length=160,
        training=TrainingSettings(epochs=3, max_length=160),
        target="held-out accuracy >= 0.72 (majority class democrat: 0.664 on the held-out speeches); party from a "
        "100-word passage of an unseen speech is hard, so a clear margin over the majority class is the bar",
    ),
    "next-token": Study(
        name="next-token",
        task="next-token",
        corpus="bbc-topic",
        model="smollm2",
        split="held_out",
        max_length=128,  # must exceed smollm2's head dim (64): only then can efficient attention differ
        training=None,
        target="no training: the prediction is smollm2's argmax next token at every position",
    ),
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}: choose from {sorted(STUDIES)}")
    return STUDIES[name]
