"""The extraction stage through the real Prefect flow (a temporary local Prefect server) and the CLI.

Flow runs are kept few: the first one in a session starts the temporary server (~10 s), later ones cost about a
second with the tiny models of conftest.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.models import load_model
from flows.cli import main
from flows.extract import extract
from flows.settings import ExtractSettings
from storage_schemas.attention_store import (
    AttentionStoreError,
    completed_shards,
    open_attention_store,
    read_texts,
    store_layout,
)
from tests.conftest import REVIEW_ROWS, write_reviews_csv

ARRAYS = (
    "tokens",
    "length",
    "untruncated_length",
    "source_index",
    "label",
    "text_bytes",
    "text_offsets",
    "logits",
    "attention",
    "value",
    "w_out",
    "out_bias",
)

# 9 of the 10 rows of small_corpus_csv, shards of 4 (the last holds 1), batches of 3 (not aligned with shards),
# truncated to 16 tokens (some texts are longer).
RUN = dict(limit=9, shard_size=4, batch_size=3, max_length=16, seed=0)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def snapshot(url: str) -> tuple[dict[str, np.ndarray], dict]:
    group = open_attention_store(url)
    return {name: group[name][:] for name in ARRAYS}, group.attrs.asdict()


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def assert_attention_and_value_are_zero_padded(attention: np.ndarray, value: np.ndarray, length: np.ndarray) -> None:
    """attention: [example, layer, head, L, L]; value: [example, layer, kv_head, L, head_dim]."""
    for i, n in enumerate(length):
        real = attention[i, :, :, :n, :n].astype(np.float64)
        np.testing.assert_allclose(real.sum(-1), 1.0, atol=1e-5, err_msg=f"example {i}")
        assert (real >= 0).all()
        assert not attention[i, :, :, n:, :].any(), f"example {i}: attention rows beyond length {n}"
        assert not attention[i, :, :, :, n:].any(), f"example {i}: attention columns beyond length {n}"
        assert not value[i, :, :, n:, :].any(), f"example {i}: values beyond length {n}"
        assert np.abs(value[i, :, :, :n, :]).sum(-1).all(), f"example {i}: a real token has an all-zero value"


def shard_file_mtimes(url: str) -> dict[tuple[str, str], int]:
    """(array, shard) -> modification time (ns) of the file holding that shard."""
    return {
        (name, shard): os.stat(Path(url) / name / "c" / shard).st_mtime_ns
        if (Path(url) / name / "c" / shard).is_file()
        else _first_file_mtime(Path(url) / name / "c" / shard)
        for name in ("attention", "value")
        for shard in os.listdir(Path(url) / name / "c")
    }


def _first_file_mtime(folder: Path) -> int:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert len(files) == 1, files
    return files[0].stat().st_mtime_ns


# ------------------------------------------------------------------------------------------


def test_extract_fills_the_store(tmp_path, tiny_bert_folder, small_corpus_csv):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    url = str(tmp_path / "store.zarr")
    assert extract(ExtractSettings(corpus=str(small_corpus_csv), model=str(tiny_bert_folder), store=url, **RUN)) == url

    group = open_attention_store(url)
    layout = store_layout(group)
    assert (layout.n_examples, layout.shard_size, layout.n_shards) == (9, 4, 3)
    assert completed_shards(group) == [0, 1, 2]
    assert (layout.layers, layout.heads, layout.kv_heads, layout.head_dim, layout.hidden) == (2, 4, 4, 8, 32)

    tokens, length = group["tokens"][:], group["length"][:]
    untruncated, source_index = group["untruncated_length"][:], group["source_index"][:]
    assert (np.diff(length) >= 0).all(), length
    # a user file's store grows: it keeps --max-length positions (every later example fits), and --limit takes the
    # first rows in corpus order (rows only append, so the same ones stay selected)
    assert length.max() <= layout.max_length == 16
    assert sorted(source_index.tolist()) == list(range(9))
    assert len(set(source_index.tolist())) == 9

    # Texts, labels and tokens are the CSV rows named by source_index.
    rows = read_csv(small_corpus_csv)
    class_names = sorted({row["label"] for row in rows})
    assert group.attrs["corpus"]["class_names"] == class_names == ["bad", "good"]
    assert read_texts(group) == [rows[i]["text"] for i in source_index]
    assert group["label"][:].tolist() == [class_names.index(rows[i]["label"]) for i in source_index]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_folder)
    for k, row in enumerate(source_index):
        ids = tokenizer(rows[row]["text"])["input_ids"]
        assert untruncated[k] == len(ids)
        expected = ids if len(ids) <= 16 else ids[:15] + ids[-1:]  # truncated with [SEP] kept last
        assert tokens[k, : length[k]].tolist() == expected
        assert (tokens[k, length[k] :] == tokenizer.pad_token_id).all()
    assert (untruncated > length).sum() == group.attrs["extraction"]["truncated_examples"] >= 1

    attention, value, logits = group["attention"][:], group["value"][:], group["logits"][:]
    assert attention.shape == (9, 2, 4, layout.max_length, layout.max_length)
    assert value.shape == (9, 2, 4, layout.max_length, 8)
    assert_attention_and_value_are_zero_padded(attention, value, length)

    # Logits: the loaded model run on each example alone (no padding at all) gives the stored ones.
    loaded = load_model(str(tiny_bert_folder), num_labels=2, seed=0)
    assert group.attrs["model"]["weights_digest"] == loaded.weights_digest
    # Attention and values: a plain eager model with hooks, independent of the effattn backend.
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_bert_folder, attn_implementation="eager").eval()
    values: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(eager.bert.encoder.layer):
        layer.attention.self.value.register_forward_hook(
            lambda module, args, output, index=index: values.__setitem__(index, output)
        )
    with torch.inference_mode():
        for k in range(9):
            n = int(length[k])
            input_ids = torch.as_tensor(tokens[k : k + 1, :n], dtype=torch.long)
            alone = loaded.model(input_ids=input_ids).logits[0].numpy()
            np.testing.assert_allclose(logits[k], alone, rtol=1e-5, atol=1e-5, err_msg=f"example {k}")
            reference = eager(input_ids=input_ids, output_attentions=True)
            np.testing.assert_allclose(logits[k], reference.logits[0].numpy(), rtol=1e-5, atol=1e-5)
            for layer_index, layer_attention in enumerate(reference.attentions):
                np.testing.assert_allclose(attention[k, layer_index, :, :n, :n], layer_attention[0].numpy(), atol=1e-6)
                per_head = values[layer_index][0].reshape(n, 4, 8).transpose(0, 1).numpy()  # [head, position, dim]
                np.testing.assert_allclose(value[k, layer_index, :, :n], per_head, atol=1e-6)

    # Each head's slice of the output projection, and its bias.
    for layer_index, layer in enumerate(eager.bert.encoder.layer):
        dense = layer.attention.output.dense
        np.testing.assert_array_equal(group["w_out"][layer_index], dense.weight.detach().numpy().T.reshape(4, 8, 32))
        np.testing.assert_array_equal(group["out_bias"][layer_index], dense.bias.detach().numpy())


def test_resume_recomputes_only_the_missing_shard(tmp_path, tiny_bert_folder, tiny_llama_folder, small_corpus_csv):
    url = str(tmp_path / "store.zarr")
    arguments = dict(corpus=str(small_corpus_csv), model=str(tiny_bert_folder), store=url, **RUN)
    extract(ExtractSettings(**arguments))
    first_arrays, first_attributes = snapshot(url)

    # A crash in shard 1: its data half written (garbage), never marked completed.
    group = open_attention_store(url, mode="r+")
    group.attrs["completed_shards"] = [0, 2]
    group["attention"][4:8] = 7.0
    group["logits"][4:8] = 7.0
    assert open_attention_store(url)["attention"][5, 0, 0, 0, 0] == 7.0
    mtimes = shard_file_mtimes(url)

    extract(ExtractSettings(**arguments))
    arrays, attributes = snapshot(url)
    assert attributes["completed_shards"] == [0, 1, 2]
    assert_same_arrays(arrays, first_arrays)
    identities, first_identities = attributes.pop("shard_identities"), first_attributes.pop("shard_identities")
    assert attributes == first_attributes  # nothing was recreated: same creation time and provenance
    # only the shard written again has a new identity (what was computed from the old one is stale)
    assert identities["0"] == first_identities["0"] and identities["2"] == first_identities["2"]
    assert identities["1"] != first_identities["1"]
    after = shard_file_mtimes(url)
    for name in ("attention", "value"):
        assert after[(name, "0")] == mtimes[(name, "0")], f"{name}: completed shard 0 was rewritten"
        assert after[(name, "2")] == mtimes[(name, "2")], f"{name}: completed shard 2 was rewritten"
    assert after[("attention", "1")] != mtimes[("attention", "1")]

    # Another model into the same store: refused, naming the difference, and nothing changes.
    bert_digest = first_attributes["model"]["weights_digest"]
    llama_digest = load_model(str(tiny_llama_folder), num_labels=2, seed=0).weights_digest
    assert bert_digest != llama_digest
    message = (
        f"{url} was written by a different run (model.weights_digest: store has {bert_digest!r}, "
        f"this run has {llama_digest!r}): use another --store, or delete {url} to start over"
    )
    with pytest.raises(AttentionStoreError, match=re.escape(message)):
        extract(ExtractSettings(**{**arguments, "model": str(tiny_llama_folder)}))
    arrays, attributes = snapshot(url)
    assert_same_arrays(arrays, first_arrays)
    assert attributes == {**first_attributes, "shard_identities": identities}
    assert shard_file_mtimes(url) == after


# ------------------------------------------------------------------------------------------
# the command line


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_cli_unknown_model(tmp_path, small_corpus_csv, capsys):
    store = tmp_path / "store.zarr"
    code = main(["extract", "--corpus", str(small_corpus_csv), "--model", "no-such-model", "--store", str(store)])
    assert code == 2
    assert (
        "effattn extract: error: unknown model 'no-such-model': use one of ['minilm', 'smollm2'] or the path of a "
        "local Hugging Face model folder (nothing is downloaded)"
    ) in error_lines(capsys)
    assert not store.exists()


@pytest.mark.parametrize("corpus", ["no-such-corpus", "missing.csv"])
def test_cli_unknown_corpus(tmp_path, tiny_bert_folder, capsys, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store.zarr"
    code = main(["extract", "--corpus", corpus, "--model", str(tiny_bert_folder), "--store", str(store)])
    assert code == 2
    lines = [line for line in error_lines(capsys) if line.startswith("effattn extract: error: ")]
    assert len(lines) == 1, lines
    if corpus == "no-such-corpus":
        assert lines[0].startswith(
            "effattn extract: error: unknown corpus 'no-such-corpus': not a bundled corpus name and not an "
            "existing file or folder. Known corpora: rt-sentiment, bbc-topic"
        )
    else:
        assert lines[0].startswith("effattn extract: error: corpus file not found: 'missing.csv'.")
    assert not store.exists()


def test_cli_refuses_a_folder_of_files_as_store(tmp_path, tiny_bert_folder, small_corpus_csv, capsys):
    folder = tmp_path / "my-documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    code = main(
        [
            "extract",
            "--corpus",
            str(small_corpus_csv),
            "--model",
            str(tiny_bert_folder),
            "--store",
            str(folder),
            "--limit",
            "2",
        ]
    )
    assert code == 2
    assert (
        f"effattn extract: error: {folder} exists and is not an effattn attention store: choose another --store "
        "(nothing was changed)"
    ) in error_lines(capsys)
    assert os.listdir(folder) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "precious"


def test_cli_extract_then_inspect(tmp_path, tiny_bert_folder, small_corpus_csv, capsys):
    store = str(tmp_path / "store.zarr")
    code = main(
        [
            "extract",
            "--corpus",
            str(small_corpus_csv),
            "--model",
            str(tiny_bert_folder),
            "--store",
            store,
            "--limit",
            "5",
            "--shard-size",
            "2",
            "--max-length",
            "16",
            "--dtype",
            "float16",
        ]
    )
    assert code == 0
    printed_by_extract = capsys.readouterr().out
    assert main(["inspect", store]) == 0
    summary = capsys.readouterr().out
    assert summary.strip() and summary.strip() in printed_by_extract  # extract ends by printing the summary
    lines = summary.splitlines()
    assert lines[0] == f"attention store {store}"
    assert any(
        line.startswith(f"  model: {tiny_bert_folder} (BertForSequenceClassification, 2 layers x 4 heads")
        for line in lines
    ), summary
    assert any(
        line.startswith(f"  corpus: {small_corpus_csv} (") and "5 of 10 examples stored" in line for line in lines
    ), summary
    assert "  shards: 3 of 3 completed (2 examples each)" in lines
    assert any(
        line.startswith("  attention ") and "float16" in line and "shards=(2, 2, 4, " in line for line in lines
    ), summary
    assert open_attention_store(store)["attention"].dtype == np.float16


def test_cli_inspect_of_nothing(tmp_path, capsys):
    store = str(tmp_path / "nothing.zarr")
    assert main(["inspect", store]) == 2
    assert (
        f"effattn inspect: error: there is no attention store at {store}: create one with "
        f"`effattn extract --store {store} ...`"
    ) in error_lines(capsys)


# ------------------------------------------------------------------------------------------
# a real model on a real corpus


@pytest.mark.integration
def test_minilm_on_rt_sentiment(tmp_path):
    url = str(tmp_path / "minilm.zarr")
    extract(
        ExtractSettings(corpus="rt-sentiment", model="minilm", store=url, limit=16, batch_size=8, seed=0, train=False)
    )
    group = open_attention_store(url)
    layout = store_layout(group)
    assert (layout.layers, layout.heads, layout.kv_heads, layout.head_dim, layout.hidden) == (6, 12, 12, 32, 384)
    assert layout.n_examples == 16
    assert completed_shards(group) == list(range(layout.n_shards))
    L = layout.max_length
    attention, value, length = group["attention"][:], group["value"][:], group["length"][:]
    tokens, logits = group["tokens"][:], group["logits"][:]
    assert attention.shape == (16, 6, 12, L, L)
    assert value.shape == (16, 6, 12, L, 32)
    assert logits.shape == (16, 2)
    assert group["w_out"].shape == (6, 12, 32, 384)
    assert (np.diff(length) >= 0).all()
    assert length.max() == L
    assert_attention_and_value_are_zero_padded(attention, value, length)

    loaded = load_model("minilm", num_labels=2, seed=0)
    assert group.attrs["model"]["weights_digest"] == loaded.weights_digest
    with torch.inference_mode():
        for k in (0, 7, 15):  # shortest, middle, longest
            input_ids = torch.as_tensor(tokens[k : k + 1, : length[k]], dtype=torch.long)
            alone = loaded.model(input_ids=input_ids).logits[0].numpy()
            np.testing.assert_allclose(logits[k], alone, rtol=1e-4, atol=1e-5, err_msg=f"example {k}")


@pytest.mark.integration
def test_smollm2_next_token_logits_per_position(tmp_path):
    """The LM task: smollm2's top-k next-token logits stored at every real position of a few short texts."""
    url = str(tmp_path / "lm.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(tmp_path / "reviews.csv")),
            model="smollm2",
            store=url,
            limit=3,
            task="next-token",
            top_k=5,
            max_length=24,
        )
    )
    group = open_attention_store(url)
    assert group.attrs["extraction"]["task"] == "next-token"
    length = group["length"][:]
    logits, ids, lse = group["logits"][:], group["logit_ids"][:], group["logsumexp"][:]
    assert logits.shape == (3, group["tokens"].shape[1], 5) and ids.shape == logits.shape
    for example, n in enumerate(length):
        assert (np.diff(logits[example, :n], axis=-1) <= 0).all()  # largest first
        assert (logits[example, :n, 0] <= lse[example, :n]).all()  # a logit is below the log-sum-exp
        assert not logits[example, n:].any()
    assert group["attention"].shape[1:3] == (30, 9) and group["value"].shape[2] == 3


def test_base_model_gets_a_fine_tuned_head_and_the_held_out_split(tmp_path):
    """A labelled corpus with a model that has no head: the flow trains one (cached) and extracts held-out rows."""
    from analysis.corpora import example_identities, load_corpus
    from analysis.splits import select_split
    from tests.conftest import save_model_folder, tiny_bert

    base = save_model_folder(tiny_bert().bert, tmp_path / "base")
    corpus = str(write_reviews_csv(tmp_path / "reviews.csv"))
    url = str(tmp_path / "trained.zarr")
    extract(
        ExtractSettings(corpus=corpus, model=str(base), store=url, cache_root=str(tmp_path / "cache"), shard_size=4)
    )
    group = open_attention_store(url)
    head = group.attrs["model"]["head"]
    assert head["trained"] is True and head["base_model"] == str(base)
    assert group.attrs["model"]["name"].startswith(str(tmp_path / "cache" / "heads"))
    assert group.attrs["corpus"]["selection"]["split"] == "held_out"
    loaded = load_corpus(corpus)
    held_out = select_split(len(loaded), loaded.labels, "held_out", 0, identities=example_identities(loaded))
    assert sorted(group["source_index"][:].tolist()) == held_out.tolist()
    # the same call again: the cached head is found (no second training folder) and nothing is recomputed
    extract(
        ExtractSettings(corpus=corpus, model=str(base), store=url, cache_root=str(tmp_path / "cache"), shard_size=4)
    )
    assert len([p for p in (tmp_path / "cache" / "heads").iterdir() if not p.name.startswith(".")]) == 1


def test_write_retries_only_io_errors():
    from prefect.states import Failed

    from tasks.stages import retry_on_io_error

    assert retry_on_io_error(None, None, Failed(data=OSError("disk hiccup"))) is True
    assert retry_on_io_error(None, None, Failed(data=ValueError("shard 1: 'value' has shape ..."))) is False


def test_a_selection_is_stored_resumed_and_a_different_one_refused(tmp_path, tiny_bert_folder, small_corpus_csv):
    url = str(tmp_path / "store.zarr")
    arguments = dict(corpus=str(small_corpus_csv), model=str(tiny_bert_folder), store=url, **RUN)
    extract(ExtractSettings(**arguments, layers="1", heads="1-2"))
    group = open_attention_store(url)
    assert group.attrs["selection"]["layers"] == [1] and group.attrs["selection"]["heads"] == [1, 2]
    assert group["attention"].shape[1:3] == (1, 2) and group["w_out"].shape[:2] == (1, 2)
    first_arrays, _ = snapshot(url)
    open_attention_store(url, mode="r+").attrs["completed_shards"] = [0, 2]
    extract(ExtractSettings(**arguments, layers="1", heads="1,2"))  # the same selection, spelt otherwise: resumed
    assert_same_arrays(snapshot(url)[0], first_arrays)
    with pytest.raises(
        AttentionStoreError,
        match=re.escape(
            "was written by a different run (selection.layers: store has [1], this run has [0, 1]; selection.heads: "
            "store has [1, 2], this run has [0, 1, 2, 3])"
        ),
    ):
        extract(ExtractSettings(**arguments))  # everything, into a store of one layer


def test_cli_a_bad_selection_ends_in_one_line(tmp_path, tiny_bert_folder, small_corpus_csv, capsys):
    store = tmp_path / "store.zarr"
    code = main(
        [
            "extract",
            "--corpus",
            str(small_corpus_csv),
            "--model",
            str(tiny_bert_folder),
            "--store",
            str(store),
            "--limit",
            "2",
            "--layers",
            "0,5",
        ]
    )
    assert code == 2
    lines = [line for line in error_lines(capsys) if line.startswith("effattn extract: error: ")]
    assert lines == ["effattn extract: error: --layers '0,5': index 5 is out of range; the model has 2 layers (0..1)"]
    assert not (store / "zarr.json").exists()  # no store was created


# --- a corpus that grows --------------------------------------------------------------------------------------------

GROW = dict(shard_size=4, batch_size=3, max_length=16, seed=0, train=False)


def write_rows(path: Path, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def by_identity(url: str) -> dict[bytes, dict[str, np.ndarray]]:
    """Each stored example's tokens, length, logits and real attention block, keyed by its identity."""
    group = open_attention_store(url)
    length = group["length"][:]
    examples = {}
    for index, identity in enumerate(group["example_identity"][:]):
        n = int(length[index])
        examples[identity.tobytes()] = {
            "tokens": group["tokens"][index, :n],
            "logits": group["logits"][index],
            "attention": group["attention"][index, :, :, :n, :n],
        }
    return examples


def test_a_grown_corpus_appends_only_its_new_examples(tmp_path, tiny_bert_folder):
    from storage_schemas.attention_store import begin_append, open_store_to_append

    corpus, url = tmp_path / "feed.csv", str(tmp_path / "feed.zarr")
    settings = ExtractSettings(corpus=str(corpus), model=str(tiny_bert_folder), store=url, **GROW)
    write_rows(corpus, REVIEW_ROWS[:6])
    extract(settings)
    first = open_attention_store(url)
    assert store_layout(first).n_examples == 6 and completed_shards(first) == [0, 1]  # shard 1 holds 2
    before = shard_file_mtimes(url)

    write_rows(corpus, REVIEW_ROWS)  # 4 rows appended
    # an append killed after it resized the arrays, before it recorded anything: the next run finishes it
    begin_append(open_store_to_append(url), 9)
    with pytest.raises(AttentionStoreError, match="an append of examples 6 to 8 was interrupted"):
        open_attention_store(url)
    extract(settings)
    grown = open_attention_store(url)
    assert store_layout(grown).n_examples == 10 and completed_shards(grown) == [0, 1, 2]
    after = shard_file_mtimes(url)
    assert all(after[key] == before[key] for key in before if key[1] == "0")  # shard 0 was not written again
    np.testing.assert_array_equal(grown["added_by_run"][:], [0] * 6 + [1] * 4)
    runs = grown.attrs["runs"]
    assert [(run["first_example"], run["examples_added"]) for run in runs] == [(0, 6), (6, 4)]
    assert sorted(read_texts(grown)) == sorted(text for text, _ in REVIEW_ROWS)

    # equal, example by example, to one extraction of the whole corpus
    scratch = str(tmp_path / "scratch.zarr")
    extract(settings.model_copy(update={"store": scratch}))
    grown_examples, scratch_examples = by_identity(url), by_identity(scratch)
    assert grown_examples.keys() == scratch_examples.keys()
    for identity, expected in scratch_examples.items():
        np.testing.assert_array_equal(grown_examples[identity]["tokens"], expected["tokens"])
        for name in ("logits", "attention"):
            np.testing.assert_allclose(grown_examples[identity][name], expected[name], rtol=1e-5, atol=1e-6)

    # a row edited in place is a new example, a deleted row stays in the store; both are reported
    rows = [("the film was a quiet triumph, edited", "good"), *REVIEW_ROWS[2:]]
    write_rows(corpus, rows)
    extract(settings)
    edited = open_attention_store(url)
    assert store_layout(edited).n_examples == 11 and read_texts(edited, [10]) == [rows[0][0]]
    assert edited.attrs["runs"][-1]["no_longer_in_corpus"] == 2
    # nothing new: nothing is written, no run is recorded
    extract(settings)
    assert len(open_attention_store(url).attrs["runs"]) == 3

    # a class the store's head does not know is refused
    write_rows(corpus, [*rows, ("a brand new kind of review", "neutral")])
    with pytest.raises(AttentionStoreError, match=r"the corpus now has the classes \['neutral'\].*--retrain"):
        extract(settings)


def test_a_store_made_with_the_permutation_split_is_refused_for_growth(tmp_path, tiny_bert_folder):
    import zarr

    corpus, url = tmp_path / "feed.csv", str(tmp_path / "feed.zarr")
    settings = ExtractSettings(corpus=str(corpus), model=str(tiny_bert_folder), store=url, **GROW)
    write_rows(corpus, REVIEW_ROWS[:6])
    extract(settings)
    group = zarr.open_group(url, mode="r+")  # as a store written before stores could grow records it
    group.attrs["corpus"] = {**group.attrs["corpus"], "selection": {"split": "all", "limit": None, "seed": 0}}
    extract(settings)  # the same corpus: resumed as it is
    write_rows(corpus, REVIEW_ROWS)
    with pytest.raises(AttentionStoreError, match="made before stores could grow.*start a store that grows"):
        extract(settings)
    assert store_layout(open_attention_store(url)).n_examples == 6


def test_a_growing_corpus_whose_columns_changed_is_refused(tmp_path, tiny_bert_folder):
    corpus, url = tmp_path / "feed.csv", str(tmp_path / "feed.zarr")
    settings = ExtractSettings(corpus=str(corpus), model=str(tiny_bert_folder), store=url, **GROW)
    write_rows(corpus, REVIEW_ROWS[:6])
    extract(settings)
    with corpus.open("w", newline="", encoding="utf-8") as handle:  # the label column is gone
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([text] for text, _ in REVIEW_ROWS)
    with pytest.raises(AttentionStoreError, match=re.escape("corpus.columns: store has ['text', 'label'], this run")):
        extract(settings)
    assert store_layout(open_attention_store(url)).n_examples == 6
