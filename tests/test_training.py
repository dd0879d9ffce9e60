"""analysis.training, tasks.training and flows.train: reproducible fine-tuning of a tiny random BERT on a
synthetic, obviously separable corpus, the on-disk cache of trained heads, and one run through Prefect.

The tiny model trains in about a second on one thread; tests pin torch to one thread while training (tiny
matrices gain nothing from two, and two threads on a busy 2-core machine make every op wait for a time slice).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.corpora import example_identities, load_corpus
from analysis.models import load_model
from analysis.splits import STABLE_SPLIT_METHOD, select_split, split_indices, stable_split_indices
from analysis.training import (
    MODEL_CARD_FILE,
    PERMUTATION_SPLIT_METHOD,
    TrainingSettings,
    cached_model_card,
    check_trainable,
    default_cache_root,
    head_cache_key,
    head_to_train,
    train_classifier,
    trained_head_folder,
    training_split,
)
from tests.conftest import save_model_folder, tiny_bert

# Learnable in ~1 s: 40 rows (28 train, 12 held out by the keyed split of a user file), 10 epochs of batches of 8
# at a high learning rate.
SETTINGS = TrainingSettings(epochs=10, batch_size=8, learning_rate=1e-2, max_length=32, seed=0)
FILLER = "the a film movie story plot actor scene music long short time people night city".split()


def write_cue_csv(path: Path, n_rows: int = 40, seed: int = 0) -> Path:
    """Two classes told apart by one cue word ("excellent" / "terrible") among random filler words."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for row in range(n_rows):
            label = "pos" if row % 2 else "neg"
            words = [rng.choice(FILLER) for _ in range(8)]
            words.insert(rng.randrange(len(words) + 1), "excellent" if label == "pos" else "terrible")
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture()
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny random BERT encoder without a classification head (like a bundled base model)."""
    return save_model_folder(tiny_bert().bert, tmp_path_factory.mktemp("base") / "tiny-bert-base")


@pytest.fixture(scope="module")
def cue_csv(tmp_path_factory) -> Path:
    return write_cue_csv(tmp_path_factory.mktemp("cue") / "cue.csv")


@pytest.fixture(scope="module")
def first_run(base_folder, cue_csv, tmp_path_factory) -> tuple[Path, dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("trained") / "run1"
        card = train_classifier(str(base_folder), load_corpus(str(cue_csv)), SETTINGS, folder, progress=False)
    finally:
        torch.set_num_threads(previous)
    return folder, card


# --------------------------------------------------------------------------------------
# settings, keys, cache folders (no training)


def test_cache_key_is_canonical_and_covers_every_input():
    key = head_cache_key("sha256:base", "sha256:corpus", TrainingSettings())
    assert key == head_cache_key("sha256:base", "sha256:corpus", TrainingSettings())
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        head_cache_key("sha256:other", "sha256:corpus", TrainingSettings()),
        head_cache_key("sha256:base", "sha256:other", TrainingSettings()),
        head_cache_key("sha256:base", "sha256:corpus", TrainingSettings(), growable=True),
        *(
            head_cache_key("sha256:base", "sha256:corpus", TrainingSettings(**{name: value}))
            for name, value in dict(
                epochs=3,
                batch_size=16,
                learning_rate=1e-4,
                max_length=256,
                weight_decay=0.0,
                warmup_fraction=0.0,
                held_out_fraction=0.1,
                seed=1,
                max_train_examples=100,
            ).items()
        ),
    }
    assert key not in others and len(others) == 12
    assert key == head_cache_key("sha256:base", "sha256:corpus", TrainingSettings(), growable=False)


def test_cache_root_and_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFATTN_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("EFFATTN_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "effattn"
    assert trained_head_folder(tmp_path, "abc") == tmp_path / "heads" / "abc"
    with pytest.raises(ValueError, match="not a cache key"):
        trained_head_folder(tmp_path, "../x")


def test_unlabelled_or_single_class_corpus_is_an_error(tmp_path):
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text\none text\nanother text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot train a classifier on an unlabelled corpus"):
        check_trainable(load_corpus(str(unlabelled)))
    single = tmp_path / "single.csv"
    single.write_text("text,label\none text,a\nanother text,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="it has a single class 'a'"):
        check_trainable(load_corpus(str(single)))


def test_head_to_train_refuses_a_single_class_corpus(tmp_path):
    single = tmp_path / "single.csv"
    single.write_text("text,label\none text,a\nanother text,a\n", encoding="utf-8")
    with pytest.raises(ValueError) as raised:
        head_to_train(load_corpus(str(single)), "classification", train=True, model_has_trained_head=False)
    assert str(raised.value) == (
        f"cannot train a classifier on corpus {str(single)!r}: it has a single class 'a'; a classifier needs at least "
        "two. Add examples of another class, pass --label-column none to use the corpus unlabelled, or --no-train "
        "to keep a random head (smoke tests only)"
    )
    # no training asked for, or none needed: no refusal
    assert not head_to_train(load_corpus(str(single)), "classification", train=False, model_has_trained_head=False)
    assert not head_to_train(load_corpus(str(single)), "classification", train=True, model_has_trained_head=True)
    assert not head_to_train(load_corpus(str(single)), "next-token", train=True, model_has_trained_head=False)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text\none text\nanother text\n", encoding="utf-8")
    assert not head_to_train(load_corpus(str(unlabelled)), "classification", train=True, model_has_trained_head=False)
    two = tmp_path / "two.csv"
    two.write_text("text,label\none text,a\nanother text,b\n", encoding="utf-8")
    assert head_to_train(load_corpus(str(two)), "classification", train=True, model_has_trained_head=False)


# --------------------------------------------------------------------------------------
# training


def test_training_learns_an_obvious_cue_and_writes_a_complete_card(first_run, base_folder, cue_csv):
    folder, card = first_run
    corpus = load_corpus(str(cue_csv))
    assert cached_model_card(folder) == card
    assert json.loads((folder / MODEL_CARD_FILE).read_text()) == card
    assert card["held_out_accuracy"] >= 0.875 > card["majority_baseline"]["held_out_accuracy"] == 0.5
    assert card["train_loss_per_epoch"][-1] < 0.5 * card["train_loss_per_epoch"][0]
    assert card["corpus"]["digest"] == corpus.digest and card["corpus"]["class_names"] == ["neg", "pos"]
    assert card["base_model"]["name"] == str(base_folder)
    assert card["settings"] == SETTINGS.as_dict()
    assert card["split"]["sizes"] == {"train": 28, "held_out": 12}  # the keyed split of a user file
    assert card["split"]["label_distribution"]["held_out"] == {"neg": 6, "pos": 6}
    assert card["torch_threads"] == 1 and card["train_seconds"] > 0
    assert card["cache_key"] == head_cache_key(
        card["base_model"]["weights_digest"], corpus.digest, SETTINGS, growable=True
    )
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # never pickle

    # The folder is a normal model folder: load_model reloads exactly the trained weights with named labels.
    loaded = load_model(str(folder), num_labels=2)
    assert loaded.weights_digest == card["weights_digest"]
    assert loaded.model.config.id2label == {0: "neg", 1: "pos"}
    encoded = loaded.tokenizer(["a film excellent", "a film terrible"], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = loaded.model(**encoded).logits.argmax(-1).tolist()
    assert predicted == [1, 0]


def test_training_is_deterministic(first_run, base_folder, cue_csv, tmp_path, one_thread):
    _, first = first_run
    torch.manual_seed(1234)  # the caller's RNG state must not matter ...
    state = torch.get_rng_state()
    second = train_classifier(str(base_folder), load_corpus(str(cue_csv)), SETTINGS, tmp_path / "run2", progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be changed
    assert second["weights_digest"] == first["weights_digest"]
    assert second["held_out_accuracy"] == first["held_out_accuracy"]
    assert second["train_loss_per_epoch"] == first["train_loss_per_epoch"]


def test_max_train_examples_samples_the_train_split(base_folder, cue_csv, tmp_path, one_thread):
    settings = TrainingSettings(epochs=1, batch_size=8, max_length=8, max_train_examples=10)
    card = train_classifier(str(base_folder), load_corpus(str(cue_csv)), settings, tmp_path / "m", progress=False)
    assert card["split"]["trained_on"] == 10 and card["split"]["scored_held_out"] == 12
    assert sum(card["split"]["label_distribution"]["trained_on"].values()) == 10
    assert card["truncation"]["train_truncated"] == 10  # every cue text is 11 tokens long


def test_a_growable_corpus_never_trains_on_an_example_extraction_holds_out(first_run, cue_csv, tmp_path):
    _, card = first_run
    corpus = load_corpus(str(cue_csv))
    assert corpus.growable
    identities = example_identities(corpus)
    split = training_split(corpus, SETTINGS)
    expected = stable_split_indices(identities, SETTINGS.held_out_fraction, SETTINGS.seed)
    for name in ("train", "held_out"):
        np.testing.assert_array_equal(split[name], expected[name])
    extraction_held_out = select_split(
        len(corpus), corpus.labels, "held_out", SETTINGS.seed, SETTINGS.held_out_fraction, identities=identities
    )
    np.testing.assert_array_equal(extraction_held_out, split["held_out"])
    assert not set(split["train"].tolist()) & set(extraction_held_out.tolist())
    # The card records the keyed split and trained on exactly its train rows.
    assert card["split"]["method"] == STABLE_SPLIT_METHOD
    assert card["split"]["sizes"] == {"train": len(split["train"]), "held_out": len(split["held_out"])}
    assert card["split"]["trained_on"] == len(split["train"])
    # The permutation split would have held out other examples: the card's sizes tell them apart.
    permutation = split_indices(len(corpus), corpus.labels, SETTINGS.held_out_fraction, SETTINGS.seed)
    assert len(permutation["held_out"]) != len(split["held_out"])

    # The corpus grows: every example held out before is still held out, so never trained on.
    grown_path = tmp_path / "grown.csv"
    grown_path.write_text(cue_csv.read_text(encoding="utf-8") + "".join(f"new text {i},pos\n" for i in range(30)))
    grown = load_corpus(str(grown_path))
    grown_split = training_split(grown, SETTINGS)
    assert set(split["held_out"].tolist()) <= set(grown_split["held_out"].tolist())
    assert set(split["train"].tolist()) <= set(grown_split["train"].tolist())


def test_a_bundled_corpus_keeps_the_permutation_split(cue_csv):
    import dataclasses

    # A corpus that is not growable (as every bundled corpus), built from the cue file to stay offline.
    fixed = dataclasses.replace(load_corpus(str(cue_csv)), growable=False)
    split = training_split(fixed, SETTINGS)
    expected = split_indices(len(fixed), fixed.labels, SETTINGS.held_out_fraction, SETTINGS.seed)
    for name in ("train", "held_out"):
        np.testing.assert_array_equal(split[name], expected[name])
    assert len(split["held_out"]) == 8
    assert "split_indices" in PERMUTATION_SPLIT_METHOD and "stable_split_indices" in STABLE_SPLIT_METHOD


# --------------------------------------------------------------------------------------
# the task: cache hits, half-written folders


def test_task_trains_once_then_hits_the_cache(base_folder, cue_csv, tmp_path, monkeypatch, one_thread):
    import tasks.training as training_task

    calls = []
    real_train = training_task.train_classifier

    def counting_train(*args, **kwargs):
        calls.append(args[3])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training_task, "train_classifier", counting_train)
    arguments = (str(base_folder), str(cue_csv), None, None, SETTINGS.as_dict(), str(tmp_path))
    folder = Path(training_task.train_head.fn(*arguments))
    assert len(calls) == 1 and calls[0].parent == folder.parent and calls[0] != folder  # trained beside, renamed
    card = cached_model_card(folder)
    assert folder == trained_head_folder(tmp_path, card["cache_key"])
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(training_task, "train_classifier", must_not_train)
    assert Path(training_task.train_head.fn(*arguments)) == folder


def test_half_written_folder_is_not_a_cache_hit(base_folder, cue_csv, tmp_path, monkeypatch, one_thread):
    import tasks.training as training_task

    corpus = load_corpus(str(cue_csv))
    base = load_model(str(base_folder), num_labels=2, seed=SETTINGS.seed)
    key = head_cache_key(base.weights_digest, corpus.digest, SETTINGS, growable=corpus.growable)
    target = trained_head_folder(tmp_path, key)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"truncated")
    assert cached_model_card(target) is None
    (target / MODEL_CARD_FILE).write_text('{"schema": "effattn-trained-head", "vers')  # torn write
    assert cached_model_card(target) is None

    folder = training_task.train_head.fn(str(base_folder), str(cue_csv), None, None, SETTINGS.as_dict(), str(tmp_path))
    assert Path(folder) == target
    card = cached_model_card(target)
    assert card is not None and card["cache_key"] == key
    assert load_model(folder, num_labels=2).weights_digest == card["weights_digest"]


def test_task_rejects_an_unlabelled_corpus_before_loading_a_model(tmp_path):
    from tasks.training import train_head

    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text\none text\nanother text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot train a classifier on an unlabelled corpus"):
        train_head.fn("no-such-model", str(unlabelled), None, None, TrainingSettings().as_dict(), str(tmp_path))


# --------------------------------------------------------------------------------------
# the flow (one Prefect run: the temporary server costs ~10-15 s)


@pytest.mark.end_to_end
def test_train_flow_through_prefect(base_folder, cue_csv, tmp_path, monkeypatch, one_thread):
    from flows.settings import TrainSettings
    from flows.train import train

    monkeypatch.setenv("EFFATTN_CACHE", str(tmp_path / "cache"))
    folder = train(
        TrainSettings(
            corpus=str(cue_csv),
            model=str(base_folder),
            epochs=SETTINGS.epochs,
            seed=SETTINGS.seed,
            batch_size=SETTINGS.batch_size,
            learning_rate=SETTINGS.learning_rate,
            max_length=SETTINGS.max_length,
        )
    )
    folder = Path(folder)
    assert folder.parent == tmp_path / "cache" / "heads"
    card = cached_model_card(folder)
    assert card["settings"] == SETTINGS.as_dict()
    assert card["held_out_accuracy"] > card["majority_baseline"]["held_out_accuracy"]
