"""The efficient stage (flows/efficient.py, tasks/efficient.py): Dask over store shards, resumable, and the stored
results satisfy the invariants when T is recomputed from the stored values and output projections."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil

import numpy as np
import pytest

from analysis.efficient_attention import VARIANTS
from flows.extract import extract
from flows.settings import EfficientSettings, ExtractSettings
from storage_schemas.attention_store import AttentionStoreError, open_attention_store, store_layout
from storage_schemas.efficient_store import (
    efficient_completed_shards,
    mark_efficient_shard_completed,
    prepare_efficient_arrays,
)
from tasks.efficient import compute_efficient_shard, pending_work, prepare_variants
from tests.loopback_cluster import loopback_cluster

SETTINGS = {"simplex_max_iterations": 200, "simplex_tolerance": 1e-10}


def check_invariants(url: str, variants=VARIANTS, output_tolerance: float = 1e-5) -> None:
    """Recompute T = V W_O^h from the stored arrays and check every stored efficient matrix against it."""
    group = open_attention_store(url)
    layout = store_layout(group)
    causal = group.attrs["model"]["causal"]
    attention, value = group["attention"][:].astype(np.float64), group["value"][:].astype(np.float64)
    w_out, lengths = group["w_out"][:].astype(np.float64), group["length"][:]
    group_size = layout.heads // layout.kv_heads
    for variant in variants:
        efficient = group[f"efficient/{variant}"][:].astype(np.float64)
        residual = group[f"diagnostics/{variant}/output_residual"][:]
        assert residual.max() <= 1e-8, f"{variant}: float64 output residual {residual.max()}"
        for example, length in enumerate(lengths):
            assert not efficient[example, :, :, length:, :].any() and not efficient[example, :, :, :, length:].any()
            for layer in range(layout.layers):
                for head in range(layout.heads):
                    A = attention[example, layer, head, :length, :length]
                    B = efficient[example, layer, head, :length, :length]
                    T = value[example, layer, head // group_size, :length] @ w_out[layer, head]
                    relative = np.linalg.norm(B @ T - A @ T) / np.linalg.norm(A @ T)
                    assert relative <= output_tolerance, (variant, example, layer, head, relative)
                    if variant in ("stochastic", "simplex"):
                        np.testing.assert_allclose(B.sum(-1), 1.0, atol=1e-5)
                    if variant == "simplex":
                        assert B.min() >= 0.0
                    if causal:
                        assert not np.triu(B, k=1).any()


@pytest.fixture(scope="module")
def bert_store(tmp_path_factory, tiny_bert_folder) -> str:
    """A small store of the tiny BERT (head dim 8) over texts longer than 8 tokens, 3 shards."""
    from tests.conftest import write_reviews_csv

    folder = tmp_path_factory.mktemp("efficient")
    url = str(folder / "store.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(folder / "reviews.csv")),
            model=str(tiny_bert_folder),
            store=url,
            shard_size=4,
            batch_size=4,
        )
    )
    return url


def test_local_cluster_run_writes_every_variant_and_resumes(bert_store, tmp_path):
    from flows.efficient import efficient

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(bert_store, url)
    efficient(EfficientSettings(store=url, workers=2))
    group = open_attention_store(url, mode="r+")
    n_shards = store_layout(group).n_shards
    for variant in VARIANTS:
        assert efficient_completed_shards(group, variant) == list(range(n_shards))
    check_invariants(url)
    null_ratio = group["diagnostics/effective/null_norm_ratio"][:]
    assert null_ratio.max() > 0.01  # sequences longer than the head dim: a real null part was removed

    # a crash: shard 1 of `simplex` is not recorded and holds garbage; the rerun recomputes exactly that
    simplex = group["efficient/simplex"]
    expected = simplex[:]
    simplex.attrs["completed_shards"] = [0, 2]
    region = store_layout(group).shard_slice(1)
    simplex[region] = np.full(simplex[region].shape, 7.0, dtype=np.float32)
    assert pending_work(group, VARIANTS) == {1: ["simplex"]}
    efficient(EfficientSettings(store=url, workers=1))
    np.testing.assert_array_equal(open_attention_store(url)["efficient/simplex"][:], expected)


def test_by_default_a_variant_is_left_out_of_stores_longer_than_its_default_length(bert_store, tmp_path, monkeypatch):
    from analysis import variants
    from flows.efficient import efficient

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(bert_store, url)
    positions = store_layout(open_attention_store(url)).max_length
    shorter = dataclasses.replace(variants.variant_record("simplex"), default_max_length=positions - 1)
    monkeypatch.setitem(variants.REGISTRY._records, "simplex", shorter)
    efficient(EfficientSettings(store=url, workers=1))
    group = open_attention_store(url)
    n_shards = store_layout(group).n_shards
    assert "efficient/simplex" not in group
    assert all(
        efficient_completed_shards(group, variant) == list(range(n_shards)) for variant in ("effective", "stochastic")
    )
    efficient(EfficientSettings(store=url, workers=1, variants=["simplex"]))  # named: computed at any length
    assert efficient_completed_shards(open_attention_store(url), "simplex") == list(range(n_shards))


def test_unknown_variant_and_changed_settings_are_refused(bert_store, tmp_path):
    from flows.efficient import efficient

    with pytest.raises(
        ValueError,
        match=r"^--variants sparse: unknown efficient-attention variants \['sparse'\]: "
        "choose from effective,stochastic,simplex",
    ):
        efficient(EfficientSettings(store=bert_store, variants=["sparse"]))
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(bert_store, url)
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "simplex", SETTINGS)
    with pytest.raises(AttentionStoreError, match="efficient/simplex was computed with settings"):
        prepare_efficient_arrays(group, url, "simplex", {**SETTINGS, "simplex_tolerance": 1e-6})


def test_causal_grouped_query_store(tmp_path, tiny_llama_folder):
    """Decoder + GQA through the per-shard function (no Prefect, no Dask): lower-triangular, invariants hold."""
    from tests.conftest import write_reviews_csv

    url = str(tmp_path / "llama.zarr")
    extract(
        ExtractSettings(
            corpus=str(write_reviews_csv(tmp_path / "reviews.csv")),
            model=str(tiny_llama_folder),
            store=url,
            shard_size=8,
        )
    )
    group = open_attention_store(url, mode="r+")
    for variant in VARIANTS:
        prepare_efficient_arrays(group, url, variant, SETTINGS)
    for shard in range(store_layout(group).n_shards):
        compute_efficient_shard(url, shard, VARIANTS, SETTINGS)
    check_invariants(url)


def test_distributed_scheduler_and_two_workers_give_the_local_result(bert_store, tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on loopback, stopped by their process ids."""
    from flows.efficient import efficient

    local, remote = str(tmp_path / "local.zarr"), str(tmp_path / "remote.zarr")
    shutil.copytree(bert_store, local)
    shutil.copytree(bert_store, remote)
    with loopback_cluster(tmp_path) as (address, processes):
        assert address.startswith("tcp://127.0.0.1:")
        efficient(EfficientSettings(store=remote, dask_address=address))
        from distributed import Client

        with Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    assert all(process.poll() is not None for process in processes)
    efficient(EfficientSettings(store=local, workers=1))
    local_group, remote_group = open_attention_store(local), open_attention_store(remote)
    for variant in VARIANTS:
        np.testing.assert_array_equal(local_group[f"efficient/{variant}"][:], remote_group[f"efficient/{variant}"][:])


@pytest.mark.integration
def test_real_minilm_examples_longer_than_the_head_dim(tmp_path):
    """bbc-topic articles truncated to 48 tokens (> head dim 32) through real MiniLM, all three variants."""
    from flows.efficient import efficient

    url = str(tmp_path / "minilm.zarr")
    extract(
        ExtractSettings(
            corpus="bbc-topic", model="minilm", store=url, limit=6, max_length=48, shard_size=3, train=False
        )
    )
    assert (open_attention_store(url)["length"][:] > 32).all()
    efficient(EfficientSettings(store=url, workers=2))
    check_invariants(url)
    group = open_attention_store(url)
    rank = group["diagnostics/effective/rank"][:]
    assert (group["diagnostics/effective/null_dim"][:] == 48 - rank).all()
    assert group["diagnostics/effective/null_norm_ratio"][:].min() > 0  # a null part exists for every head
    assert group["diagnostics/simplex/negative_mass"][:].max() == 0
    assert group["diagnostics/effective/negative_mass"][:].max() > 0  # effective attention is not a distribution


def test_layer_pieces_on_workers_equal_the_whole_shard_in_one_process(bert_store, tmp_path):
    """With the simplex variant the stage spreads each shard's layers over the workers and joins them: the stored
    arrays and diagnostics must equal one process computing whole shards (`compute_efficient_shard`)."""
    from flows.efficient import efficient
    from storage_schemas.efficient_store import DIAGNOSTIC_ARRAYS

    variants = ["effective", "simplex"]
    pieces, whole = str(tmp_path / "pieces.zarr"), str(tmp_path / "whole.zarr")
    shutil.copytree(bert_store, pieces)
    shutil.copytree(bert_store, whole)
    efficient(EfficientSettings(store=pieces, variants=variants, workers=2))
    group = open_attention_store(whole, mode="r+")
    for variant in variants:
        prepare_efficient_arrays(group, whole, variant, SETTINGS)
    for shard in range(store_layout(group).n_shards):
        compute_efficient_shard(whole, shard, variants, SETTINGS)
    assert store_layout(group).layers > 1  # several pieces per shard
    piece_group = open_attention_store(pieces)
    for variant in variants:
        np.testing.assert_array_equal(piece_group[f"efficient/{variant}"][:], group[f"efficient/{variant}"][:])
        for name in DIAGNOSTIC_ARRAYS:
            np.testing.assert_array_equal(
                piece_group[f"diagnostics/{variant}/{name}"][:], group[f"diagnostics/{variant}/{name}"][:]
            )


def test_one_process_reads_a_shard_once_for_every_layer_piece(bert_store, tmp_path, monkeypatch):
    """An inner chunk holds every layer of an example (schema v2): the one-process path reads the shard's layers in
    one read instead of one read per layer piece, and stores the same as computing the pieces separately."""
    import tasks.efficient
    from tasks.efficient import compute_efficient_piece, shard_pieces, write_efficient_pieces

    url, separately = str(tmp_path / "once.zarr"), str(tmp_path / "separately.zarr")
    shutil.copytree(bert_store, url)
    shutil.copytree(bert_store, separately)
    layers = store_layout(open_attention_store(url)).layers
    assert len(shard_pieces(["simplex"], layers)) == layers > 1
    for target in (url, separately):
        prepare_variants(target, ["simplex"], SETTINGS)
    reads = []
    real_read = tasks.efficient._read_piece_inputs
    monkeypatch.setattr(tasks.efficient, "_read_piece_inputs", lambda *args: reads.append(args[4]) or real_read(*args))
    compute_efficient_shard(url, 1, ["simplex"], SETTINGS)
    assert reads == [slice(0, layers)]
    pieces = [
        compute_efficient_piece(separately, 1, cut, ["simplex"], SETTINGS) for cut in shard_pieces(["simplex"], layers)
    ]
    assert len(reads) == 1 + layers  # each piece on its own reads its layer
    write_efficient_pieces(separately, 1, pieces)
    once, apart = open_attention_store(url), open_attention_store(separately)
    region = store_layout(once).shard_slice(1)
    np.testing.assert_array_equal(once["efficient/simplex"][region], apart["efficient/simplex"][region])
    assert once["efficient/simplex"][region].any()


def test_shards_with_the_longest_examples_are_started_first(bert_store):
    from tasks.efficient import shards_by_cost

    group = open_attention_store(bert_store)
    layout = store_layout(group)
    length = group["length"][:]
    assert layout.n_shards >= 3
    order = shards_by_cost(group, {shard: ["effective"] for shard in range(layout.n_shards)})
    costs = [float((length[layout.shard_slice(shard)].astype(float) ** 3).sum()) for shard in order]
    assert costs == sorted(costs, reverse=True) and sorted(order) == list(range(layout.n_shards))
    assert shards_by_cost(group, {0: ["simplex"]}) == [0]


def test_a_shard_is_written_only_from_pieces_covering_every_layer(bert_store, tmp_path):
    from tasks.efficient import compute_efficient_piece, write_efficient_pieces

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(bert_store, url)
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    layers = store_layout(group).layers
    first = compute_efficient_piece(url, 0, (0, 1), ["effective"], SETTINGS)
    with pytest.raises(ValueError, match=f"the pieces cover 1 layers, the store has {layers}"):
        write_efficient_pieces(url, 0, [first])
    with pytest.raises(ValueError, match=rf"layers \(1, {layers + 3}\) must satisfy 0 <= start < stop <= {layers}"):
        compute_efficient_piece(url, 0, (1, layers + 3), ["effective"], SETTINGS)
    assert efficient_completed_shards(group, "effective") == []
    rest = compute_efficient_piece(url, 0, (1, layers), ["effective"], SETTINGS)
    assert write_efficient_pieces(url, 0, [first, rest]) == (0, ["effective"])


def test_a_damaged_shard_is_named_with_what_to_do(tmp_path, tiny_bert_folder):
    from storage_schemas.durable_writes import shard_file_paths
    from tests.store_builders import build_real_store, write_corpus

    url = build_real_store(
        str(tmp_path / "store.zarr"), tiny_bert_folder, write_corpus(tmp_path / "reviews.csv"), variants=()
    )
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    (path,) = shard_file_paths(group, ["value"], 1)
    with open(path, "r+b") as handle:  # 4 flipped bytes inside a chunk: its checksum no longer matches
        handle.seek(path.stat().st_size // 3)
        data = handle.read(4)
        handle.seek(path.stat().st_size // 3)
        handle.write(bytes(byte ^ 0xFF for byte in data))
    assert compute_efficient_shard(url, 0, ["effective"], SETTINGS) == (0, ["effective"])  # other shards are sound
    with pytest.raises(AttentionStoreError) as raised:
        compute_efficient_shard(url, 1, ["effective"], SETTINGS, retry_delays=())
    assert str(raised.value) == (
        f"{url}: array value, shard 1 (examples 4 to 7) is damaged (a chunk fails its checksum): run `effattn verify "
        f"{url}` to find every damaged shard, then `effattn verify --repair {url}` and the stage that wrote it again"
    )


def test_no_scheduler_at_the_dask_address_is_said_within_the_timeout(monkeypatch):
    from tasks.dask_cluster import DaskSchedulerUnreachableError, dask_client
    from tests.test_preflight import free_loopback_address

    monkeypatch.setenv("EFFATTN_DASK_TIMEOUT", "1")
    address = free_loopback_address()
    with pytest.raises(DaskSchedulerUnreachableError, match=rf"^no Dask scheduler answers at {address} \(waited 1 s; "):
        with dask_client(address, None):
            pass


def test_shards_are_cut_by_the_cost_class_of_their_variants():
    """Closed-form variants: whole shards; any iterative one (simplex, or one registered with that cost class):
    one piece per layer."""
    from analysis.variants import ITERATIVE, registered_variant, variant_record
    from tasks.efficient import shard_pieces

    assert shard_pieces(["effective", "stochastic"], 3) == [None]
    assert shard_pieces(["effective", "simplex"], 3) == [(0, 1), (1, 2), (2, 3)]
    slow = dataclasses.replace(variant_record("stochastic"), name="iterative-stochastic", cost=ITERATIVE)
    with registered_variant(slow):
        assert shard_pieces(["effective", "iterative-stochastic"], 2) == [(0, 1), (1, 2)]


def _extract_shards(url: str, model_folder, corpus, shards=None) -> list[int]:
    """Extract (plain task functions, in this process) the pending shards of `corpus` into `url`, or only `shards`
    of them; returns the shards written."""
    from tasks.extraction import prepare_store
    from tests.store_builders import extract_shards

    todo, num_labels = prepare_store.fn(
        url, str(corpus), str(model_folder), 24, None, "float32", "cpu", None, None, 4, 0
    )
    chosen = [shard for shard in todo if shards is None or shard in shards]
    extract_shards(url, chosen, model_folder, num_labels)
    return chosen


def _expected(url: str, variant: str) -> np.ndarray:
    from analysis.efficient_attention import efficient_attention

    group = open_attention_store(url)
    return efficient_attention(
        group["attention"][:],
        group["value"][:],
        group["w_out"][:],
        group["length"][:],
        causal=False,
        variants=[variant],
        output_dtype=np.float32,
    )[variant].efficient


def test_an_unfinished_extraction_is_refused_and_a_legacy_store_recomputes_what_was_computed_on_zeros(
    tmp_path, tiny_bert_folder, caplog
):
    """A store of this version: `efficient` refuses it while extraction shards are missing. A store of the earlier
    version, whose efficient stage computed shards 1 and 2 on the zeros of an interrupted extraction and recorded
    them as done (no identities anywhere): once extraction finishes, exactly those shards count as stale, are
    computed again, and every shard equals efficient attention of the real tensors."""
    from storage_schemas.attention_store import IncompleteInputError
    from storage_schemas.efficient_store import efficient_stale_shards
    from tests.conftest import write_reviews_csv

    corpus, url = write_reviews_csv(tmp_path / "reviews.csv"), str(tmp_path / "store.zarr")
    assert _extract_shards(url, tiny_bert_folder, corpus, shards=[0]) == [0]  # interrupted after shard 0
    with pytest.raises(
        IncompleteInputError,
        match=re.escape(
            f"{url}: extraction shards [1, 2] (examples 4 to 9) are not complete (unwritten shards read as zeros), "
            "so `effattn efficient` cannot run on this store yet: finish them by running the `effattn extract "
            f"--corpus {corpus} --model {tiny_bert_folder} --store {url} ...` command that created the store again, "
            "with the same options (it resumes and writes only the missing shards); then run `effattn efficient` "
            "again"
        ),
    ):
        prepare_variants(url, ["effective"], SETTINGS)
    assert "efficient" not in open_attention_store(url)

    # what the earlier version did: compute every shard, zeros included, and record them without identities
    group = open_attention_store(url, mode="r+")
    prepare_efficient_arrays(group, url, "effective", SETTINGS)
    for shard in range(3):
        compute_efficient_shard(url, shard, ["effective"], SETTINGS)
    group["efficient/effective"].attrs.update({"completed_shards": [0, 1, 2], "shard_identities": {}})
    group.attrs.update({"shard_identities": {}})
    legacy = open_attention_store(url)["efficient/effective"][:]
    assert not legacy[4:].any()  # computed on zeros
    # shard 0 (legacy, computed from a complete legacy shard) still counts; 1 and 2 have no complete input
    assert efficient_completed_shards(group, "effective") == [0]
    assert efficient_stale_shards(group, "effective") == [1, 2]

    assert _extract_shards(url, tiny_bert_folder, corpus) == [1, 2]  # the extraction finished: new identities
    assert pending_work(open_attention_store(url), ["effective"]) == {1: ["effective"], 2: ["effective"]}
    with caplog.at_level(logging.WARNING, logger="tasks.efficient"):
        work = prepare_variants(url, ["effective"], SETTINGS)
    assert work == {1: ["effective"], 2: ["effective"]}
    assert caplog.messages == [
        f"{url}: efficient/effective shards [1, 2] were computed from extraction shards that "
        "were unfinished then or written again since: computing them again"
    ]
    assert open_attention_store(url)["efficient/effective"].attrs["completed_shards"] == [0]  # stale ones forgotten
    for shard, variants in work.items():
        compute_efficient_shard(url, shard, variants, SETTINGS)
        mark_efficient_shard_completed(open_attention_store(url, mode="r+"), "effective", shard)
    group = open_attention_store(url)
    assert efficient_completed_shards(group, "effective") == [0, 1, 2]
    stored = group["efficient/effective"][:]
    assert all(stored[example].any() for example in range(stored.shape[0]))
    np.testing.assert_allclose(stored, _expected(url, "effective"), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(stored[:4], legacy[:4])  # the legacy shard computed on real tensors was kept


def test_a_grown_store_computes_only_its_new_and_redone_shards_and_equals_a_fresh_store(tmp_path, tiny_bert_folder):
    from storage_schemas.efficient_store import efficient_array_path
    from tasks.efficient import EfficientWork, efficient_stage
    from tasks.stages import StageRun, pending_shards
    from tests.conftest import REVIEW_ROWS
    from tests.store_builders import build_real_store, compute_variants, grow_real_store, write_corpus

    variants = ("effective",)
    corpus = write_corpus(tmp_path / "feed.csv")  # 10 rows: shards 0, 1 and a partial shard 2
    url = build_real_store(str(tmp_path / "store.zarr"), tiny_bert_folder, corpus, variants=variants)
    before = open_attention_store(url)[efficient_array_path("effective")][:]
    later = [(f"{text} (later)", label) for text, label in REVIEW_ROWS]
    assert grow_real_store(url, tiny_bert_folder, corpus, later, variants=())["extract"] == [2, 3, 4]

    # the efficient arrays were resized with the store and it validates; the stage's own runner finds shard 2
    # stale (extracted again with its new examples) and shards 3 and 4 new
    group = open_attention_store(url)
    assert group[efficient_array_path("effective")].shape[0] == store_layout(group).n_examples == 20
    assert efficient_completed_shards(group, "effective") == [0, 1]
    stage = efficient_stage(variants)
    run = StageRun(store=url, results=url, plan=EfficientWork(variants, SETTINGS))
    assert stage.shard_count(group, group) == 5
    assert pending_shards(stage, run) == [2, 3, 4]
    assert stage.completed_shards(open_attention_store(url), group) == [0, 1]

    compute_variants(url, variants)
    group = open_attention_store(url)
    assert efficient_completed_shards(group, "effective") == [0, 1, 2, 3, 4]
    grown = group[efficient_array_path("effective")][:]
    np.testing.assert_array_equal(grown[:10], before)  # the old examples: kept, or recomputed identically
    check_invariants(url, variants)

    # a store made from scratch over the grown corpus holds the same matrices for the same examples
    fresh = build_real_store(str(tmp_path / "fresh.zarr"), tiny_bert_folder, corpus, variants=variants)
    fresh_group = open_attention_store(fresh)
    order = {bytes(row): index for index, row in enumerate(fresh_group["example_identity"][:])}
    matched = [order[bytes(row)] for row in group["example_identity"][:]]
    np.testing.assert_array_equal(grown, fresh_group[efficient_array_path("effective")][:][matched])
