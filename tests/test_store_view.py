"""storage_schemas/store_view.py: what `effattn view` reads, checked against the stores themselves, and how little it
reads (chunk reads counted through a wrapping zarr store)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from storage_schemas.attention_store import open_attention_store, read_texts, unmark_shards
from storage_schemas.causal_results import CausalResultsError
from storage_schemas.efficient_store import diagnostic_array_path, efficient_array_path, unmark_efficient_shards
from storage_schemas.store_view import StoreView, TableQuery, ViewRequestError, parse_bool, parse_int
from tests.store_builders import build_causal_results, build_real_store, build_text_store, write_corpus

WORDS = ["alpha", "beta", "gamma", "delta", "omega"]


class CountingStore(WrapperStore):
    """A zarr store that records the key of every read."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def chunks_of(self, array: str) -> set[str]:
        return {key for key in self.keys if key.startswith(f"{array}/c/")}


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> str:
    """5,000 tiny examples in shards of 64; example i's text names WORDS[i % 5], its label is i % 3 == 0."""
    url = str(tmp_path_factory.mktemp("view") / "big.zarr")
    texts = [f"example {i} says {WORDS[i % 5]}" for i in range(5000)]
    return build_text_store(url, texts, [int(i % 3 == 0) for i in range(5000)], shard_size=64)


def counted_view(url: str) -> tuple[StoreView, CountingStore]:
    store = CountingStore(LocalStore(url, read_only=True))
    view = StoreView(url, group=zarr.open_group(store, mode="r"))
    store.keys.clear()
    return view, store


def test_first_page_of_5000_examples_reads_one_shard_of_texts(big_store):
    view, store = counted_view(big_store)
    page = view.table(TableQuery(limit=25))
    assert [row["index"] for row in page.rows] == list(range(25))
    assert page.total == 5000 and page.more
    assert page.rows[7]["text"] == "example 7 says gamma"
    assert store.chunks_of("text_offsets") == {"text_offsets/c/0"}  # one shard of 64 offsets
    assert len(store.chunks_of("text_bytes")) == 1
    for array in ("length", "label", "logits"):
        assert store.chunks_of(array) <= {f"{array}/c/0", f"{array}/c/0/0"}, store.chunks_of(array)
    assert not store.chunks_of("attention") and not store.chunks_of("tokens")


def test_a_later_page_reads_only_its_shard(big_store):
    view, store = counted_view(big_store)
    page = view.table(TableQuery(offset=4000, limit=20))
    assert [row["index"] for row in page.rows] == list(range(4000, 4020))
    assert store.chunks_of("text_offsets") == {"text_offsets/c/62"}  # 4000..4020 // 64


def test_sorting_reads_one_column_over_the_corpus_and_the_page_texts(big_store):
    view, store = counted_view(big_store)
    page = view.table(TableQuery(sort="label", descending=True, limit=10))
    assert [row["index"] for row in page.rows] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]  # label 1, ties by index
    assert len(store.chunks_of("label")) == 79  # every shard of the sorted column
    assert store.chunks_of("text_offsets") == {"text_offsets/c/0"}
    assert not store.chunks_of("logits") - {"logits/c/0/0"}


def test_filters_and_search_match_a_brute_force_answer(big_store):
    view = StoreView(big_store)
    texts = read_texts(view.group)
    labels = view.group["label"][:]
    page = view.table(TableQuery(search="OMEGA", label=1, limit=50))
    expected = [i for i in range(5000) if "omega" in texts[i].lower() and labels[i] == 1][:50]
    assert [row["index"] for row in page.rows] == expected and page.more and page.total is None
    # correct: the prediction (index mod 2) equals the label
    page = view.table(TableQuery(correct=True, sort="index", descending=True, limit=5))
    expected = [i for i in range(4999, -1, -1) if i % 2 == labels[i]][:5]
    assert [row["index"] for row in page.rows] == expected
    assert all(row["correct"] is True and row["prediction"] == row["label"] for row in page.rows)
    last = view.table(TableQuery(search="example 4999 ", limit=5))
    assert [row["index"] for row in last.rows] == [4999] and last.total == 1 and not last.more


def test_a_store_being_written_shows_its_completed_shards_only(tmp_path):
    url = build_text_store(
        str(tmp_path / "partial.zarr"), [f"text {i}" for i in range(10)], [0] * 10, shard_size=4, completed=[0, 2]
    )
    view = StoreView(url)
    assert view.visible_examples().tolist() == [0, 1, 2, 3, 8, 9]
    page = view.table(TableQuery(limit=10))
    assert [row["index"] for row in page.rows] == [0, 1, 2, 3, 8, 9] and page.total == 6
    with pytest.raises(ViewRequestError, match="example 5 is not extracted yet") as error:
        view.example(5, 0, 0)
    assert error.value.status == 404


def test_requests_out_of_range_or_malformed(big_store):
    view = StoreView(big_store)
    for call, status, message in [
        (lambda: view.example(5000, 0, 0), 404, "example 5000 does not exist"),
        (lambda: view.example(-1, 0, 0), 404, "example -1 does not exist"),
        (lambda: view.example(0, 1, 0), 404, r"layer 1 is not in the store: it holds layers \[0\]"),
        (lambda: view.example(0, 0, 3), 404, "head 3 is not in the store"),
        (lambda: view.table(TableQuery(limit=0)), 400, "limit must be"),
        (lambda: view.table(TableQuery(sort="../../etc/passwd")), 400, "cannot sort by"),
        (lambda: view.table(TableQuery(outcome="flipped by uniform", outcome_value=True)), 400, "unknown outcome"),
        (lambda: parse_int("3x", "layer"), 400, "layer must be an integer, got '3x'"),
        (lambda: parse_bool("maybe", "correct"), 400, "correct must be yes or no"),
    ]:
        with pytest.raises(ViewRequestError, match=message) as error:
            call()
        assert error.value.status == status


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, tiny_bert_folder) -> str:
    folder = tmp_path_factory.mktemp("real")
    return build_real_store(str(folder / "store.zarr"), tiny_bert_folder, write_corpus(folder / "reviews.csv"))


def test_an_example_is_the_stored_blocks_of_its_layer_and_head(real_store):
    view = StoreView(real_store)
    group = open_attention_store(real_store)
    index = 6
    n = int(group["length"][index])
    data = view.example(index, 1, 2)
    np.testing.assert_array_equal(data.attention, group["attention"][index, 1, 2, :n, :n])
    assert set(data.efficient) == {"effective", "stochastic", "simplex"}
    for variant, matrix in data.efficient.items():
        np.testing.assert_array_equal(matrix, group[efficient_array_path(variant)][index, 1, 2, :n, :n])
        assert data.null_norm_ratio[variant] == group[diagnostic_array_path(variant, "null_norm_ratio")][index, 1, 2]
    assert data.tokens == [str(token) for token in group["tokens"][index, :n]]  # no tokenizer given: ids
    assert data.text == read_texts(group, [index])[0]


def test_overview_grid_is_the_mean_null_norm_ratio_of_completed_shards(real_store, tmp_path):
    import shutil

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(real_store, copy)
    group = open_attention_store(copy, mode="r+")
    ratio = group[diagnostic_array_path("simplex", "null_norm_ratio")][:]
    view = StoreView(copy)
    grid, count = view.null_norm_grid("simplex")
    np.testing.assert_allclose(grid, ratio.mean(axis=0))
    assert count == 10
    unmark_efficient_shards(group, "simplex", [1])  # shard 1 (examples 4..7) recomputed, say
    view.refresh()
    grid, count = view.null_norm_grid("simplex")
    np.testing.assert_allclose(grid, ratio[[0, 1, 2, 3, 8, 9]].mean(axis=0))
    assert count == 6
    assert "simplex" not in view.example(5, 0, 0).efficient  # its shard is not complete for simplex
    unmark_shards(group, [0])  # extraction shard 0 written again: its efficient shards are stale
    view.refresh()
    assert view.visible_examples().tolist() == [4, 5, 6, 7, 8, 9]
    assert view.null_norm_grid("effective")[1] == 6


def test_causal_outcomes_and_results_of_another_store(real_store, tmp_path):
    flipped = np.array([[i % 2 for i in range(10)], [i >= 5 for i in range(10)]])
    results = build_causal_results(
        str(tmp_path / "results.zarr"),
        real_store,
        [("null:simplex", "null", "simplex"), ("uniform", "uniform", "")],
        flipped,
        shards=[0, 1],
        claims=[{"claim": "c", "verdict": "holds", "measured": "m", "test": "t"}],
    )
    view = StoreView(real_store, results)
    assert view.columns[-2:] == ["flipped by null:simplex", "flipped by uniform"]
    page = view.table(TableQuery(limit=10))
    assert [row["flipped by null:simplex"] for row in page.rows] == [bool(i % 2) for i in range(8)] + [None, None]
    assert [row["flipped by uniform"] for row in page.rows] == [i >= 5 for i in range(8)] + [None, None]
    flips = view.table(TableQuery(outcome="flipped by uniform", outcome_value=True, limit=10))
    assert [row["index"] for row in flips.rows] == [5, 6, 7]  # 8, 9: their results shard is not complete
    assert view.claims()[0]["verdict"] == "holds"

    other = build_text_store(str(tmp_path / "other.zarr"), [f"t {i}" for i in range(10)], [0] * 10, shard_size=4)
    with pytest.raises(
        CausalResultsError,
        match=r"were not computed from the attention store .*other.zarr "
        r"\(weights_digest: results .*: give the store they came from",
    ):
        StoreView(other, results)


def test_a_schema_v1_store_is_viewed_the_same(real_store, tiny_bert_folder, tmp_path):
    from tests.store_builders import build_v1_store

    v1 = build_v1_store(str(tmp_path / "v1.zarr"), tiny_bert_folder, write_corpus(tmp_path / "reviews.csv"))
    old, new = StoreView(v1), StoreView(real_store)
    assert old.table(TableQuery(limit=10)).rows == new.table(TableQuery(limit=10)).rows
    before, after = old.example(4, 1, 3), new.example(4, 1, 3)
    np.testing.assert_array_equal(before.attention, after.attention)
    for variant in ("effective", "stochastic"):
        np.testing.assert_allclose(before.efficient[variant], after.efficient[variant], atol=1e-6)
