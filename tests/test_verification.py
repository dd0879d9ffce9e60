"""storage_schemas.verification (`effattn verify`) and analysis.store_checks on a real store of the tiny BERT:
a clean store verifies clean; flipped bytes, NaN, broken invariants, a missing shard file and a wrong schema are
each reported with exactly the array and shard; `--repair` plus a rerun restores the store bit for bit."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import zarr

from analysis import store_checks
from flows.cli import main
from flows.settings import CausalSettings
from storage_schemas.attention_store import completed_shards, open_attention_store
from storage_schemas.durable_writes import shard_file_paths
from storage_schemas.efficient_store import efficient_completed_shards
from storage_schemas.verification import Problem, content_digests, verify_store
from tests.store_builders import build_real_store, build_v1_store, write_corpus

VARIANTS = ("effective", "stochastic", "simplex")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_bert_folder) -> tuple[str, object, object]:
    """A store of the 10 reviews (3 shards of 4, 4 and 2 examples) with every variant; and its digests."""
    folder = tmp_path_factory.mktemp("verify")
    corpus = write_corpus(folder / "reviews.csv")
    url = build_real_store(str(folder / "store.zarr"), tiny_bert_folder, corpus)
    return url, corpus, content_digests(url)


@pytest.fixture()
def store(pristine, tmp_path) -> str:
    url = str(tmp_path / "store.zarr")
    shutil.copytree(pristine[0], url)
    return url


def flip_bytes(path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(byte ^ 0xFF for byte in data))


def set_entry(url: str, array: str, index: tuple, value: float) -> None:
    """Change one stored value through zarr (the checksums stay valid: only the numbers are wrong)."""
    group = zarr.open_group(url, mode="r+")
    group[array][index] = value


def test_a_clean_store_verifies_clean(store, capsys):
    report = verify_store(store)
    assert report.ok, report.text()
    assert report.problems == [] and report.notes == []
    n_arrays = 15 + len(VARIANTS) * 11  # schema v3 arrays + per variant: efficient and 10 diagnostics
    assert len(report.arrays_checked) == n_arrays
    assert report.shards_read == 4 + 3 * (n_arrays - 4)  # w_out, out_bias and the texts whole, the rest per shard
    assert main(["verify", store]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{store}: OK: {n_arrays} arrays, {report.shards_read} shards read; checksums, schema and invariants hold"
    ]


def test_a_clean_causal_grouped_query_store_verifies_clean(tmp_path, tiny_llama_folder):
    """Decoder attention (zero above the diagonal) and 4 query heads on 2 kv heads: the invariants hold as stored."""
    url = build_real_store(str(tmp_path / "llama.zarr"), tiny_llama_folder, write_corpus(tmp_path / "reviews.csv"))
    assert open_attention_store(url).attrs["model"]["causal"] is True
    report = verify_store(url)
    assert report.ok, report.text()
    set_entry(url, "efficient/simplex", (9, 1, 0, 2, 7), 0.25)  # weight on a future key
    problems = verify_store(url).problems
    assert ("efficient/simplex", 2, "invariant") in {(p.array, p.shard, p.kind) for p in problems}
    assert any(p.detail.startswith("|weight| on future keys is 0.25") for p in problems)


def test_flipped_bytes_in_a_shard_file_name_that_array_and_shard(store, capsys):
    group = zarr.open_group(store, mode="r")
    (path,) = shard_file_paths(group, ["attention"], 1)
    flip_bytes(path, path.stat().st_size // 3)
    report = verify_store(store)
    assert [(p.array, p.shard, p.kind) for p in report.problems] == [("attention", 1, "checksum")]
    chunks = re.findall(r"example (\d+)", report.problems[0].detail)  # a chunk holds an example's every layer
    assert chunks and all(4 <= int(example) < 8 for example in chunks), report.problems[0].detail
    assert " layer" not in report.problems[0].detail.split("(")[0]
    # the whole-shard read's error, as zarrs (the default) or zarr-python words it
    assert re.search("the checksum is invalid|Stored and computed checksum do not match", report.problems[0].detail)
    assert main(["verify", store]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{store}: DAMAGED: 1 problem in attention shards 1"
    assert lines[1].startswith("  attention, shard 1: checksum: chunks example ")
    assert lines[-1] == (
        f"  what to do: run `effattn verify --repair {store}` to mark the damaged shards as not done, then run the "
        "same `effattn extract` / `effattn efficient` commands again: they rewrite exactly those shards"
    )


def test_a_damaged_shard_index_is_named_too(store):
    group = zarr.open_group(store, mode="r")
    (path,) = shard_file_paths(group, ["efficient/simplex"], 2)
    flip_bytes(path, path.stat().st_size - 12)  # the shard index sits at the end of the file
    report = verify_store(store)
    assert [(p.array, p.shard, p.kind) for p in report.problems] == [("efficient/simplex", 2, "checksum")]
    # shard 2 holds 2 examples, one chunk each (every layer of an example in one chunk)
    assert report.problems[0].detail.startswith("none of its 2 chunks decodes: the shard's index or file is damaged")


def test_nan_in_a_stored_tensor_is_reported(store):
    set_entry(store, "value", (5, 1, 2, 3, 4), np.nan)
    report = verify_store(store)
    assert (
        Problem("value", 1, "non-finite", "1 NaN or infinite values, the first at index (5, 1, 2, 3, 4)")
        in report.problems
    )
    assert len(report.problems) == 1  # the efficient results are not blamed for their damaged input


def test_efficient_attention_that_changes_the_output_is_reported(store):
    group = open_attention_store(store)
    n = int(group["length"][9])
    assert n > 8  # longer than the head dim: a null space exists
    entry = (9, 0, 3, 2, 1)
    set_entry(store, "efficient/stochastic", entry, float(group["efficient/stochastic"][entry]) + 0.05)
    report = verify_store(store)
    assert {(p.array, p.shard, p.kind) for p in report.problems} == {("efficient/stochastic", 2, "invariant")}
    details = sorted(p.detail for p in report.problems)
    assert len(details) == 2
    assert details[0].startswith(
        "|row sum - row sum of the attention| is 0.05 (tolerance 0.0001) at "
        "(example, layer, head) (9, 0, 3), 1 such places in the shard"
    )
    assert re.match(
        r"\|\|\(A_eff - A\) T\|\| / \|\|A T\|\| is [0-9.e-]+ \(tolerance 0.0001\) at "
        r"\(example, layer, head\) \(9, 0, 3\), 1 such places in the shard",
        details[1],
    )


def test_attention_rows_that_do_not_sum_to_one_and_padding_are_reported(store):
    group = open_attention_store(store)
    n = int(group["length"][1])
    assert n < group["attention"].shape[3]  # example 1 is padded
    set_entry(store, "attention", (0, 1, 2, 0, 0), float(group["attention"][0, 1, 2, 0, 0]) + 0.01)
    set_entry(store, "attention", (1, 0, 3, n, 0), 0.5)
    report = verify_store(store)
    found = {
        (p.array, p.shard, p.kind, p.detail.split(" (tolerance")[0]) for p in report.problems if p.array == "attention"
    }
    assert found == {
        ("attention", 0, "invariant", "|row sum - 1| over the real tokens is 0.01"),
        ("attention", 0, "invariant", "|entry| outside the real block is 0.5"),
    }
    assert all(p.shard == 0 for p in report.problems)  # efficient results of shard 0 no longer match it either


def test_a_missing_shard_file_of_a_completed_shard_is_reported(store):
    group = zarr.open_group(store, mode="r")
    (path,) = shard_file_paths(group, ["value"], 2)
    path.unlink()  # zarr would read the shard as zeros, silently
    report = verify_store(store)
    assert Problem("value", 2, "missing", "the shard is recorded as done but its file is missing") in report.problems


def test_a_wrong_schema_version_is_a_schema_problem(store, capsys):
    group = zarr.open_group(store, mode="r+")
    group.attrs["schema_version"] = 99
    report = verify_store(store)
    assert report.problems[0] == Problem(
        "",
        None,
        "schema",
        (
            f"{store} has attention store schema version 99, but this effattn reads versions [1, 2, 3]: extract again "
            "into "
            "a new store, or use the effattn release that wrote it"
        ),
    )
    assert main(["verify", store]) == 1
    out = capsys.readouterr().out
    assert "what to do: store cannot be rewritten shard by shard: extract again into a new store" in out


def test_verify_of_nothing(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing.zarr")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"effattn verify: error: there is no store at {tmp_path / 'nothing.zarr'}: nothing to verify"
    )


def test_repair_then_rerun_restores_the_store_exactly(store, pristine, tiny_bert_folder, capsys):
    _, corpus, digests = pristine
    group = zarr.open_group(store, mode="r")
    (attention_file,) = shard_file_paths(group, ["attention"], 0)
    flip_bytes(attention_file, attention_file.stat().st_size // 2)
    (simplex_file,) = shard_file_paths(group, ["efficient/simplex"], 2)
    flip_bytes(simplex_file, simplex_file.stat().st_size // 2)

    assert main(["verify", "--repair", store]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "marked as not done: extraction shards [0]" in out
    assert "marked as not done: efficient/simplex shards [0, 2]" in out
    assert "marked as not done: efficient/effective shards [0]" in out
    group = open_attention_store(store)
    assert completed_shards(group) == [1, 2]
    assert efficient_completed_shards(group, "simplex") == [1]

    build_real_store(store, tiny_bert_folder, corpus)  # the stages' resume: only the unmarked shards
    assert verify_store(store).ok
    assert content_digests(store) == digests


def test_store_checks_name_the_worst_place():
    length = np.array([2, 3])
    attention = np.zeros((2, 1, 1, 3, 3))
    attention[0, 0, 0, :2, :2] = [[0.5, 0.5], [0.25, 0.75]]
    attention[1, 0, 0] = [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.4]]  # the last row sums to 0.9
    errors = store_checks.row_sum_error(attention, length)
    np.testing.assert_allclose(errors[:, 0, 0], [0.0, 0.1])
    assert store_checks.worst(errors) == (pytest.approx(0.1), (1, 0, 0))
    attention[0, 0, 0, 2, 0] = 0.3  # padding row of example 0
    assert store_checks.outside_block_magnitude(attention, length)[:, 0, 0].tolist() == [0.3, 0.0]
    value = np.ones((2, 1, 1, 3, 2))
    assert store_checks.value_padding_magnitude(value, length)[:, 0, 0].tolist() == [1.0, 0.0]
    assert store_checks.future_magnitude(attention)[:, 0, 0].tolist() == [0.5, 0.0]


def test_output_residual_is_zero_for_a_null_space_change_and_not_otherwise_and_nan_stays_nan():
    rng = np.random.default_rng(0)
    L, d, D = 6, 2, 3
    value = rng.standard_normal((1, 1, 1, L, d))
    w_out = rng.standard_normal((1, 1, d, D))
    attention = rng.random((1, 1, 1, L, L))
    attention /= attention.sum(-1, keepdims=True)
    T = value[0, 0, 0] @ w_out[0, 0]
    null = np.linalg.svd(T)[0][:, d:]  # left null space of T (L - d columns)
    moved = attention + (rng.standard_normal((L, L - d)) @ null.T)[None, None, None]
    assert store_checks.output_residual(moved, attention, value, w_out)[0, 0, 0] < 1e-12
    changed = attention.copy()
    changed[0, 0, 0, 0, 0] += 0.1
    assert store_checks.output_residual(changed, attention, value, w_out)[0, 0, 0] > 1e-3
    value[0, 0, 0, 1, 0] = np.nan
    assert np.isnan(store_checks.output_residual(moved, attention, value, w_out)[0, 0, 0])


@pytest.mark.end_to_end
def test_repair_then_rerun_recomputes_every_efficient_and_causal_shard_computed_from_a_damaged_one(
    store, pristine, tiny_bert_folder, tmp_path, capsys
):
    """Damage an attention shard and a simplex shard under finished causal results; `verify --repair`; rerun the
    extraction, the efficient stage and the causal stage: the causal shards measured on the damaged shards (0 and 2)
    count as not done until measured again, and are; shard 1, whose inputs were untouched, is not measured again."""
    from flows.causal import causal
    from storage_schemas.causal_results import causal_completed_shards, open_causal_results

    _, corpus, digests = pristine
    results = str(tmp_path / "results.zarr")
    interventions = ["replay", "efficient:effective", "efficient:simplex"]
    causal(CausalSettings(store=store, results=results, interventions=interventions, scopes=["all"]))
    reference = {name: zarr.open_group(results)[name][:] for name in ("agreement", "stored_logit_difference")}
    group = zarr.open_group(store, mode="r")
    (attention_file,) = shard_file_paths(group, ["attention"], 0)
    flip_bytes(attention_file, attention_file.stat().st_size // 2)
    (simplex_file,) = shard_file_paths(group, ["efficient/simplex"], 2)
    flip_bytes(simplex_file, simplex_file.stat().st_size // 2)
    assert main(["verify", "--repair", store]) == 1
    capsys.readouterr()
    assert causal_completed_shards(open_causal_results(results), open_attention_store(store)) == [1]

    measured = zarr.open_group(results, mode="r+")
    for name in reference:  # a mark: a shard measured again loses it
        measured[name][...] = 7.0
    build_real_store(store, tiny_bert_folder, corpus)  # extract and efficient resume: the unmarked shards only
    assert content_digests(store) == digests
    # the causal shards' inputs were written again: new identities, so shards 0 and 2 are stale, not done
    assert causal_completed_shards(open_causal_results(results), open_attention_store(store)) == [1]
    causal(CausalSettings(store=store, results=results, interventions=interventions, scopes=["all"]))
    after = zarr.open_group(results)
    for name, values in reference.items():
        np.testing.assert_array_equal(after[name][:, :, :4], values[:, :, :4])  # shard 0: measured again
        np.testing.assert_array_equal(after[name][:, :, 8:], values[:, :, 8:])  # shard 2: measured again
        assert (after[name][:, :, 4:8] == 7.0).all()  # shard 1: kept
    assert causal_completed_shards(open_causal_results(results), open_attention_store(store)) == [0, 1, 2]
    assert after["agreement"][0, 0, :4].tolist() == [1.0] * 4  # replay of the rewritten shard holds


def test_repair_waits_for_no_stage_it_is_refused_while_one_holds_the_store(store, capsys):
    from storage_schemas.store_lock import hold_store_lock

    group = zarr.open_group(store, mode="r")
    (attention_file,) = shard_file_paths(group, ["attention"], 1)
    flip_bytes(attention_file, attention_file.stat().st_size // 2)
    with hold_store_lock(store, "efficient"):
        assert main(["verify", "--repair", store]) == 2
    assert f"effattn verify: error: {store} is locked by effattn efficient" in capsys.readouterr().err
    assert completed_shards(open_attention_store(store)) == [0, 1, 2]  # nothing unmarked under a running stage


def test_weight_outside_a_recorded_key_band_is_reported(tmp_path):
    """A store of a windowed decoder (mistral, window 4) records its bands; efficient attention the stage wrote
    verifies clean, a weight on a key outside a query's window does not (though it is below the diagonal)."""
    from tests.conftest import save_model_folder
    from tests.tiny_architectures import tiny_model

    folder = save_model_folder(tiny_model("mistral", vocab_size=30522, head_dim=2), tmp_path / "mistral")
    url = build_real_store(
        str(tmp_path / "mistral.zarr"), folder, write_corpus(tmp_path / "reviews.csv"), variants=("effective",)
    )
    assert open_attention_store(url).attrs["model"]["key_bands"] == [{"left": 3, "right": 0}] * 2
    assert verify_store(url).ok, verify_store(url).text()
    set_entry(url, "efficient/effective", (9, 1, 0, 12, 2), 0.25)  # query 12 sees keys 9..12 only
    problems = verify_store(url).problems
    assert {(p.array, p.shard, p.kind) for p in problems} == {("efficient/effective", 2, "invariant")}
    assert any(
        p.detail.startswith(
            "|weight| on keys outside the layer's key band is 0.25 (tolerance 1e-06) at "
            "(example, layer, head) (9, 1, 0)"
        )
        for p in problems
    ), problems


def test_a_v1_store_verifies_clean_and_its_damage_is_named_by_example_and_layer(tmp_path, tiny_bert_folder):
    """A store of schema v1 (texts in a `string` array, chunks of one example x one layer), efficient variants
    computed by this version: clean; flipped bytes are located to (example, layer) chunks."""
    url = build_v1_store(
        str(tmp_path / "v1.zarr"),
        tiny_bert_folder,
        write_corpus(tmp_path / "reviews.csv"),
        variants=("effective", "simplex"),
    )
    group = open_attention_store(url)
    assert group.attrs["schema_version"] == 1 and group["efficient/simplex"].chunks[1] == 1
    report = verify_store(url)
    assert report.ok, report.text()
    assert "text" in report.arrays_checked and "text_bytes" not in report.arrays_checked
    (path,) = shard_file_paths(zarr.open_group(url, mode="r"), ["attention"], 1)
    flip_bytes(path, path.stat().st_size // 3)
    problems = verify_store(url).problems
    assert [(p.array, p.shard, p.kind) for p in problems] == [("attention", 1, "checksum")]
    chunks = re.findall(r"example (\d+) layer (\d+)", problems[0].detail)
    assert chunks and all(4 <= int(example) < 8 for example, _ in chunks), problems[0].detail


def test_a_store_of_selected_layers_is_verified_on_them_and_a_wrong_selection_is_damage(store):
    group = zarr.open_group(store, mode="r+")
    # the 2 stored layers as model layers 1, 2 of 3 (every head): the same checks, and a note saying so
    group.attrs["selection"] = {
        "layers": [1, 2],
        "heads": [0, 1, 2, 3],
        "kv_heads": [0, 1, 2, 3],
        "model_layers": 3,
        "model_heads": 4,
        "model_kv_heads": 4,
    }
    group.attrs["model"] = {
        **group.attrs["model"],
        "layers": 3,
        "key_bands": [*group.attrs["model"]["key_bands"], {"left": None, "right": None}],
    }
    report = verify_store(store)
    assert report.ok, report.text()
    assert report.notes == [
        "the store holds 2 of 3 layers (1, 2), all 4 heads: the layer and head numbers above "
        "count the stored ones (the `selection` attribute maps them to the model's)"
    ]
    group.attrs["selection"] = {**group.attrs["selection"], "layers": [2]}  # one layer named, two stored
    problems = verify_store(store).problems
    assert [(p.array, p.kind) for p in problems][:1] == [("", "schema")]
    assert "does not match its arrays' counts" in problems[0].detail


def test_an_unfinished_store_is_incomplete_not_ok_and_not_damaged(store, capsys):
    from storage_schemas.attention_store import unmark_shards
    from storage_schemas.efficient_store import unmark_efficient_shards

    assert (verify_store(store).status, verify_store(store).exit_status) == ("ok", 0)
    unmark_efficient_shards(open_attention_store(store, mode="r+"), "simplex", [2])
    report = verify_store(store)
    assert (report.ok, report.status, report.exit_status) == (True, "incomplete", 3)
    assert report.unfinished == [
        f"efficient/simplex shards [2] are not completed: run `effattn efficient --store "
        f"{store} --variants simplex` to finish them"
    ]
    assert report.text().splitlines()[1:] == [f"  {report.unfinished[0]}"]
    unmark_shards(open_attention_store(store, mode="r+"), [1])
    assert main(["verify", store]) == 3
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{store}: INCOMPLETE: ")
    assert printed[1] == (
        "  extraction shards [1] are not completed: run the `effattn extract` command that "
        "created the store again to finish them"
    )
    set_entry(store, "attention", (0, 0, 0, 0, 0), float("nan"))  # damage wins over unfinished shards
    report = verify_store(store)
    assert (report.status, report.exit_status) == ("damaged", 1)
    assert report.text().splitlines()[0].startswith(f"{store}: DAMAGED: ")


def test_the_shards_checked_on_dask_workers_find_the_same_damage_as_in_one_process(store, capsys):
    """Damage of three kinds in three shards: the report of the shards checked on a LocalCluster of two workers,
    and of shards run in any order, is the report of one process, line for line."""
    from tasks.verification import verify_store_in_parallel

    group = zarr.open_group(store, mode="r")
    (path,) = shard_file_paths(group, ["attention"], 1)
    flip_bytes(path, path.stat().st_size // 3)
    set_entry(store, "value", (1, 1, 2, 3, 4), np.nan)
    set_entry(store, "efficient/stochastic", (9, 0, 3, 2, 1), 0.5)
    serial = verify_store(store)
    assert {(p.array, p.shard, p.kind) for p in serial.problems} == {
        ("attention", 1, "checksum"),
        ("value", 0, "non-finite"),
        ("efficient/stochastic", 2, "invariant"),
    }
    parallel = verify_store_in_parallel(store, workers=2)
    assert parallel.problems == serial.problems
    assert (parallel.text(), parallel.shards_read, parallel.exit_status) == (serial.text(), serial.shards_read, 1)

    def backwards(function, submissions):  # the shards finish in another order than they were given
        return {shard: function(*arguments) for shard, arguments in reversed(submissions)}

    assert verify_store(store, run_shards=backwards).text() == serial.text()
    assert main(["verify", store, "--workers", "2"]) == 1
    assert capsys.readouterr().out.rstrip("\n") == serial.text()


def test_output_residual_on_the_real_block_is_the_padded_one_and_damaged_padding_still_counts():
    generator = np.random.default_rng(3)
    length = np.array([4, 6])
    inside = store_checks.real_block_mask(length, 6)[:, None, None]  # [example, 1, 1, query, key]
    attention = np.where(inside, generator.random((2, 1, 2, 6, 6)), 0.0)
    efficient = np.where(inside, attention + 0.1 * generator.normal(size=attention.shape), 0.0)
    value = np.where(
        store_checks.real_row_mask(length, 6)[:, None, None, :, None], generator.normal(size=(2, 1, 1, 6, 3)), 0.0
    )
    w_out = generator.normal(size=(1, 2, 3, 5))
    factors = store_checks.output_factors(w_out)  # F·Fᵀ = W·Wᵀ
    assert np.allclose(factors @ np.swapaxes(factors, -1, -2), w_out @ np.swapaxes(w_out, -1, -2))
    padded = store_checks.output_residual(efficient, attention, value, w_out)
    assert padded.min() > 1e-3
    assert np.allclose(
        store_checks.output_residual(efficient, attention, value, w_out, factors, length), padded, rtol=1e-12, atol=0
    )
    efficient[0, 0, 1, 5, 0] = 0.5  # a padding row of example 0 with weight: it changes A_eff·T, and must count
    damaged = store_checks.output_residual(efficient, attention, value, w_out)
    assert damaged[0, 0, 1] > padded[0, 0, 1]
    assert np.allclose(
        store_checks.output_residual(efficient, attention, value, w_out, factors, length), damaged, rtol=1e-12, atol=0
    )
