"""flows/cli.py: bad input is refused in one `effattn CMD: error: ...` line with exit status 2 and nothing written,
before Prefect starts; the project's own errors raised inside a flow end it without Prefect's traceback; an
unknown option is reported by its sub-command. (The stages' own CLI behaviour is tested with each stage.)"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from flows.cli import _HideTracebacksOfReportedErrors, build_parser, main
from storage_schemas.durable_writes import shard_file_paths
from tasks import dask_cluster
from tests.conftest import write_reviews_csv
from tests.store_builders import build_real_store
from tests.test_preflight import free_loopback_address

REPOSITORY = Path(__file__).resolve().parents[1]


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sorted: to show that a refused command wrote nothing."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def extracted_store(tmp_path_factory, tiny_bert_folder) -> str:
    """A store of the 10 reviews by the tiny BERT, extracted, no efficient attention (built without Prefect)."""
    folder = tmp_path_factory.mktemp("cli-store")
    return build_real_store(
        str(folder / "store.zarr"), tiny_bert_folder, write_reviews_csv(folder / "reviews.csv"), variants=()
    )


@pytest.fixture()
def store_copy(extracted_store, tmp_path) -> str:
    url = str(tmp_path / "store.zarr")
    shutil.copytree(extracted_store, url)
    return url


# ------------------------------------------------------------------------------------------
# argument handling


def test_an_unknown_option_is_reported_by_its_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["extract", "--corpus", "c.csv", "--model", "minilm", "--store", "s.zarr", "--bogus", "1"])
    assert exited.value.code == 2
    lines = error_lines(capsys)
    assert lines[0].startswith("usage: effattn extract ")
    assert lines[-1] == "effattn extract: error: unrecognized arguments: --bogus 1"
    with pytest.raises(SystemExit):
        main(["efficient", "--store", "s.zarr", "--no-such-thing"])
    assert error_lines(capsys)[-1] == "effattn efficient: error: unrecognized arguments: --no-such-thing"


def test_parsing_is_unchanged_for_good_arguments():
    arguments = build_parser().parse_args(["verify", "s.zarr", "--repair"])
    assert (arguments.command, arguments.store, arguments.repair) == ("verify", "s.zarr", True)


# ------------------------------------------------------------------------------------------
# stores, devices, clusters and outputs refused before anything is written


def test_a_store_under_a_regular_file_is_refused(tmp_path, small_corpus_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("mine")
    before = listing(tmp_path)
    code = main(["extract", "--corpus", str(small_corpus_csv), "--model", "minilm", "--store", "afile/s.zarr"])
    assert code == 2
    assert error_lines(capsys) == [
        f"effattn extract: error: cannot create --store afile/s.zarr: {tmp_path / 'afile'} is a file, not a folder: "
        "choose a --store whose parent folders are folders. Nothing was written"
    ]
    assert listing(tmp_path) == before and Path("afile").read_text() == "mine"


def test_a_store_where_no_file_can_be_created_is_refused(small_corpus_csv, capsys):
    code = main(["extract", "--corpus", str(small_corpus_csv), "--model", "minilm", "--store", "/proc/s.zarr"])
    assert code == 2
    assert error_lines(capsys) == [
        "effattn extract: error: cannot create --store /proc/s.zarr: the folder /proc does not accept new files (No "
        "such file or directory): choose a --store in a folder this user may write to, or fix that folder's "
        "permissions. Nothing was written"
    ]


def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    return (
        f"--device cuda: this torch ({torch.__version__}) was built without CUDA: run with --device cpu, or on a "
        "machine with a GPU and a CUDA build of torch. Nothing was written"
    )


def test_extract_on_cuda_without_cuda_writes_nothing(tmp_path, tiny_bert_folder, small_corpus_csv, capsys, monkeypatch):
    message = no_cuda(monkeypatch)
    before = listing(tmp_path)
    code = main(
        [
            "extract",
            "--corpus",
            str(small_corpus_csv),
            "--model",
            str(tiny_bert_folder),
            "--store",
            str(tmp_path / "s.zarr"),
            "--device",
            "cuda",
            "--no-train",
        ]
    )
    assert code == 2
    assert error_lines(capsys) == [f"effattn extract: error: {message}"]
    assert listing(tmp_path) == before


def test_causal_on_cuda_without_cuda_leaves_no_results_folder(store_copy, tmp_path, capsys, monkeypatch):
    message = no_cuda(monkeypatch)
    before = listing(tmp_path)
    code = main(
        [
            "causal",
            "--store",
            store_copy,
            "--results",
            str(tmp_path / "r.zarr"),
            "--interventions",
            "replay",
            "--device",
            "cuda",
        ]
    )
    assert code == 2
    assert error_lines(capsys) == [f"effattn causal: error: {message}"]
    assert listing(tmp_path) == before  # no results folder, no lock file


def test_explain_on_cuda_without_cuda_leaves_no_results_folder(store_copy, tmp_path, capsys, monkeypatch):
    message = no_cuda(monkeypatch)
    before = listing(tmp_path)
    # methods that need no efficient attention (this store has none, which is refused before the device is checked)
    code = main(
        [
            "explain",
            "--store",
            store_copy,
            "--results",
            str(tmp_path / "x.zarr"),
            "--device",
            "cuda",
            "--methods",
            "attention:rollout,leave-one-out",
        ]
    )
    assert code == 2
    assert error_lines(capsys) == [f"effattn explain: error: {message}"]
    assert listing(tmp_path) == before


def test_no_dask_scheduler_at_the_address_is_refused(store_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, "1")
    address = free_loopback_address()
    before = listing(tmp_path)
    code = main(["efficient", "--store", store_copy, "--dask-address", address])
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"effattn efficient: error: no Dask scheduler answers at {address} (waited 1 s; ")
    assert line.endswith("or leave it out to run on a local cluster; set EFFATTN_DASK_TIMEOUT=SECONDS to wait longer")
    assert listing(tmp_path) == before


def test_a_report_into_a_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("rep.html").write_text("<html>")
    code = main(["report", "--results", "r.zarr", "--out", "rep.html"])
    assert code == 2
    assert error_lines(capsys) == [
        "effattn report: error: --out rep.html is a file, not a folder: --out names a folder (created if needed); "
        "choose another path or move that file away. Nothing was written"
    ]
    assert listing(tmp_path) == ["rep.html"] and Path("rep.html").read_text() == "<html>"


# ------------------------------------------------------------------------------------------
# corpora: messages that name flags


def extract_arguments(corpus: Path, store: Path, *more: str) -> list[str]:
    return ["extract", "--corpus", str(corpus), "--model", "minilm", "--store", str(store), *more]


def test_a_missing_text_column_names_the_flag(tmp_path, capsys):
    corpus = tmp_path / "c.csv"
    corpus.write_text("body,label\nsome words here,a\nmore words there,b\n")
    assert main(extract_arguments(corpus, tmp_path / "s.zarr")) == 2
    assert error_lines(capsys) == [
        f"effattn extract: error: {corpus}: no text column 'text'; available columns: ['body', 'label']. Choose one "
        "with --text-column COLUMN (text_column= in Python)."
    ]
    assert listing(tmp_path) == ["c.csv"]


def test_a_missing_label_column_says_how_to_proceed_with_a_flag(tmp_path, capsys):
    corpus = tmp_path / "c.csv"
    corpus.write_text("text,y\nsome words here,a\nmore words there,b\n")
    assert main(extract_arguments(corpus, tmp_path / "s.zarr", "--label-column", "label")) == 2
    assert error_lines(capsys) == [
        f"effattn extract: error: {corpus}: no label column 'label'; available columns: ['text', 'y']. Choose one "
        "with --label-column COLUMN, or pass --label-column none for an unlabelled corpus (label_column= in Python)."
    ]
    assert listing(tmp_path) == ["c.csv"]


def test_a_single_class_corpus_is_not_trained_on(tmp_path, capsys):
    corpus = tmp_path / "c.csv"
    corpus.write_text("text,label\nsome words here,good\nmore words there,good\n")
    assert main(extract_arguments(corpus, tmp_path / "s.zarr")) == 2
    assert error_lines(capsys) == [
        f"effattn extract: error: cannot train a classifier on corpus {str(corpus)!r}: it has a single class 'good'; a "
        "classifier needs at least two. Add examples of another class, pass --label-column none to use the corpus "
        "unlabelled, or --no-train to keep a random head (smoke tests only)"
    ]
    assert listing(tmp_path) == ["c.csv"]


def test_a_tab_separated_csv_says_what_was_expected(tmp_path, capsys):
    corpus = tmp_path / "c.csv"
    corpus.write_text("text\tlabel\nsome words here\ta\nmore words, there\tb\n")
    assert main(extract_arguments(corpus, tmp_path / "s.zarr")) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"effattn extract: error: {corpus}: cannot parse as CSV (Error tokenizing data. ")
    assert "a .csv corpus must be comma-separated with a header row" in line
    assert "The header 'text\\tlabel' is tab-separated: save the file comma-separated" in line
    assert listing(tmp_path) == ["c.csv"]


# ------------------------------------------------------------------------------------------
# before Prefect, and without its traceback


def run_cli(
    arguments: list[str], prefect_home: Path, cwd: Path, prefix: tuple[str, ...] = (), **environment_variables: str
) -> subprocess.CompletedProcess:
    """`effattn ARGUMENTS` in a fresh interpreter with its own Prefect home and no Prefect server configured (unless
    `environment_variables` set one); its last stdout line says whether the command imported Prefect. `prefix`: a
    command that runs the interpreter (e.g. in a private mount namespace)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    environment.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(REPOSITORY), **environment_variables)
    code = (
        "import sys; from flows.cli import main; status = main(sys.argv[1:]); "
        "print('prefect imported:', 'prefect' in sys.modules); sys.exit(status)"
    )
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_bad_corpus_path_is_reported_without_starting_prefect(tmp_path):
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    finished = run_cli(
        ["extract", "--corpus", "missing.csv", "--model", "minilm", "--store", "s.zarr"], prefect_home, tmp_path
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines() == [
        f"effattn extract: error: corpus file not found: 'missing.csv'. Check the path (relative paths are resolved "
        f"from {str(tmp_path)!r}), or use a bundled corpus: rt-sentiment, bbc-topic, political-party."
    ]
    assert finished.stdout.splitlines()[-1] == "prefect imported: False"
    # a temporary Prefect server would have created its database in the Prefect home
    assert list(prefect_home.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prefect-home"]


def test_a_project_error_inside_a_flow_ends_it_in_one_line_without_a_traceback(store_copy, tmp_path):
    group = zarr.open_group(store_copy, mode="r")
    (path,) = shard_file_paths(group, ["attention"], 1)
    with open(path, "r+b") as handle:  # flip 4 bytes inside a chunk: its checksum no longer matches
        handle.seek(path.stat().st_size // 3)
        data = handle.read(4)
        handle.seek(path.stat().st_size // 3)
        handle.write(bytes(byte ^ 0xFF for byte in data))
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    finished = run_cli(
        ["efficient", "--store", store_copy, "--variants", "effective", "--workers", "1"], prefect_home, tmp_path
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stdout.splitlines()[-1] == "prefect imported: True"  # the flow did start
    errors = [line for line in finished.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"effattn efficient: error: {store_copy}: array attention, shard 1 (examples 4 to 7) is damaged (a chunk "
        f"fails its checksum): run `effattn verify {store_copy}` to find every damaged shard, then `effattn verify "
        f"--repair {store_copy}` and the stage that wrote it again"
    ], finished.stderr
    assert "Traceback" not in finished.stderr
    assert "Encountered exception" not in finished.stderr and "Finished in state Failed" not in finished.stderr


def record_with(error: BaseException, message: str = "Encountered exception during execution: %r") -> logging.LogRecord:
    try:
        raise error
    except BaseException:  # noqa: BLE001 - only to get exc_info
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, (error,), sys.exc_info())


def test_prefect_records_of_reported_errors_are_dropped_and_others_kept():
    arguments = build_parser().parse_args(["efficient", "--store", "s.zarr"])
    hide = _HideTracebacksOfReportedErrors(arguments)
    assert not hide.filter(record_with(ValueError("s.zarr: array attention, shard 1 is damaged")))
    finished = logging.LogRecord(
        "prefect.flow_runs",
        logging.ERROR,
        __file__,
        1,
        "Finished in state Failed('Flow run encountered an exception: ValueError: s.zarr: "
        "array attention, shard 1 is damaged')",
        (),
        None,
    )
    assert not hide.filter(finished)
    assert hide.filter(record_with(RuntimeError("a bug")))  # unexpected: Prefect's traceback stays
    assert hide.filter(record_with(KeyError("column")))
    assert hide.filter(
        logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "Beginning flow run", (), None)
    )


# ------------------------------------------------------------------------------------------
# refusals that need only the arguments, the store's attributes, its lock, the corpus file or a server's answer:
# one line, exit status 2, no traceback, before Prefect is imported (timed in benchmarks/refusal_times.py)


def refusal(arguments: list[str], tmp_path: Path, prefix: tuple[str, ...] = (), **environment: str) -> str:
    """Run `effattn ARGUMENTS` as a subprocess and check that it was refused as a pre-flight refusal is: status 2,
    one stderr line and no traceback, Prefect neither imported nor its temporary server started. Returns the line
    without its `effattn CMD: error: ` prefix."""
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir(exist_ok=True)
    finished = run_cli(arguments, prefect_home, tmp_path, prefix, **environment)
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert finished.stdout.splitlines() == ["prefect imported: False"]
    assert list(prefect_home.iterdir()) == []  # no temporary server database
    prefix_text = f"effattn {arguments[0]}: error: "
    assert lines[0].startswith(prefix_text)
    return lines[0][len(prefix_text) :]


@pytest.fixture(scope="module")
def efficient_store(extracted_store, tmp_path_factory) -> str:
    """The module's store with efficient attention of variant `effective` in every shard."""
    from tests.store_builders import compute_variants

    url = str(tmp_path_factory.mktemp("cli-efficient") / "store.zarr")
    shutil.copytree(extracted_store, url)
    compute_variants(url, ("effective",))
    return url


@pytest.fixture()
def unfinished_store(store_copy) -> str:
    """A copy of the module's store whose extraction shard 1 is not done (an interrupted extraction)."""
    from storage_schemas.attention_store import open_attention_store, unmark_shards

    unmark_shards(open_attention_store(store_copy, mode="r+"), [1])
    return store_copy


def test_an_unknown_variant_names_the_flag_and_the_variants(store_copy, tmp_path):
    expected = (
        "--variants nosuch: unknown efficient-attention variants ['nosuch']: choose from "
        "effective,stochastic,simplex (comma-separated)"
    )
    assert refusal(["efficient", "--store", store_copy, "--variants", "nosuch"], tmp_path) == expected
    # the pipeline's --variants too: not an intervention 'efficient' the user never typed
    assert (
        refusal(["run", "--corpus", write_reviews_csv(tmp_path / "c.csv").name, "--variants", "nosuch"], tmp_path)
        == expected
    )
    two = expected.replace("--variants nosuch", "--variants effective,nosuch")
    assert (
        refusal(
            ["causal", "--store", store_copy, "--results", str(tmp_path / "r.zarr"), "--variants", "effective,nosuch"],
            tmp_path,
        )
        == two
    )


def test_an_unknown_intervention_names_its_flag(efficient_store, tmp_path):
    line = refusal(
        [
            "causal",
            "--store",
            efficient_store,
            "--results",
            str(tmp_path / "r.zarr"),
            "--interventions",
            "replay,nosuch",
        ],
        tmp_path,
    )
    assert line.startswith("--interventions: unknown intervention kind 'nosuch': choose from ['replay', 'efficient',")
    line = refusal(
        [
            "causal",
            "--store",
            efficient_store,
            "--results",
            str(tmp_path / "r.zarr"),
            "--head-interventions",
            "efficient",
        ],
        tmp_path,
    )
    assert line.startswith("--head-interventions: intervention 'efficient' needs a variant from ['effective', ")
    assert not (tmp_path / "r.zarr").exists()


def test_causal_and_explain_on_an_unfinished_store_are_refused(unfinished_store, tmp_path):
    for command in ("causal", "explain"):
        line = refusal([command, "--store", unfinished_store, "--results", str(tmp_path / "r.zarr")], tmp_path)
        assert "extraction shard [1] (examples 4 to 7) is not complete" in line, line
        assert f"--store {unfinished_store} ...` command that created the store again" in line
        assert not (tmp_path / "r.zarr").exists()


def test_causal_before_efficient_is_refused(store_copy, tmp_path):
    assert refusal(["causal", "--store", store_copy, "--results", str(tmp_path / "r.zarr")], tmp_path) == (
        f"{store_copy} has no finished efficient attention: run `effattn efficient --store {store_copy}` first (or "
        "name --interventions that need none, e.g. replay,uniform,ablate)"
    )
    assert refusal(
        [
            "causal",
            "--store",
            store_copy,
            "--results",
            str(tmp_path / "r.zarr"),
            "--interventions",
            "replay,null:stochastic",
        ],
        tmp_path,
    ) == (
        f"{store_copy} lacks finished efficient attention for the variants ['stochastic']: run `effattn efficient "
        f"--store {store_copy} --variants stochastic` first"
    )


def test_another_corpus_or_other_settings_into_an_existing_store_are_refused(store_copy, tiny_bert_folder, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text(write_reviews_csv(tmp_path / "reviews.csv").read_text().replace("film", "movie"))
    line = refusal(
        [
            "extract",
            "--corpus",
            str(other),
            "--model",
            str(tiny_bert_folder),
            "--store",
            store_copy,
            "--max-length",
            "24",
            "--no-train",
        ],
        tmp_path,
    )
    # the store grows (a user file): it takes what its own file adds, not another file's rows
    assert line.startswith(f"{store_copy} was written by a different run (corpus.file_name: store has '")
    assert line.endswith(f"): use another --store, or delete {store_copy} to start over")
    line = refusal(
        [
            "extract",
            "--corpus",
            str(tmp_path / "reviews.csv"),
            "--model",
            str(tiny_bert_folder),
            "--store",
            store_copy,
            "--max-length",
            "32",
            "--dtype",
            "float16",
            "--no-train",
        ],
        tmp_path,
    )
    assert line == (
        f"{store_copy} was written by a different run (extraction.requested_max_length: store has 24, "
        f"this run has 32; dtype: store has 'float32', this run has 'float16'): use another --store, or "
        f"delete {store_copy} to start over"
    )


def test_a_max_length_below_two_is_refused(tmp_path):
    corpus = write_reviews_csv(tmp_path / "c.csv")
    expected = (
        "--max-length must be at least 2 tokens, got 1: give a larger --max-length (default 128). Nothing was written"
    )
    assert (
        refusal(
            ["extract", "--corpus", str(corpus), "--model", "minilm", "--store", "s.zarr", "--max-length", "1"],
            tmp_path,
        )
        == expected
    )
    assert refusal(["run", "--corpus", str(corpus), "--max-length", "1"], tmp_path) == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.csv", "prefect-home"]


def read_only(folder: str) -> tuple[str, ...]:
    """A command prefix under which `folder` cannot be written: as root (whom permissions do not stop), a private
    mount namespace where it is bind-mounted read-only; else no prefix, the folder made read-only by its mode."""
    if os.geteuid() != 0:
        for path in [Path(folder), *Path(folder).rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        return ()
    return (
        "unshare",
        "-m",
        "sh",
        "-c",
        f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" "{folder}" && exec "$@"',
        "sh",
    )


def test_a_read_only_store_is_refused_by_efficient(store_copy, tmp_path):
    line = refusal(["efficient", "--store", store_copy, "--variants", "effective"], tmp_path, read_only(store_copy))
    assert line.startswith(f"cannot write into --store {store_copy}: the store's folder does not accept new files (")
    assert line.endswith(
        "copy the store to a place this user may write to and pass that as --store, or fix the "
        "permissions. Nothing was written"
    )


def test_a_store_locked_by_a_running_writer_is_refused(store_copy, tmp_path):
    from storage_schemas.store_lock import hold_store_lock

    with hold_store_lock(store_copy, "efficient") as lock:  # this test's process: alive
        line = refusal(["efficient", "--store", store_copy, "--variants", "effective"], tmp_path)
        assert line == (
            f"{store_copy} is locked by {lock.holder.describe()}, which is still running and writing "
            f"into it: wait for it to finish, or stop it (kill {os.getpid()}); two runs writing into one "
            "store would lose data. Nothing was changed"
        )


def test_serve_against_a_server_that_never_answers_is_refused(tmp_path):
    from tests.silent_server import silent_server

    with silent_server() as port:
        line = refusal(
            ["serve", "--interval", "60", "--corpus", "rt-sentiment"],
            tmp_path,
            PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        )
    assert line.startswith(f"no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:{port}/api (ReadTimeout")
    assert "start a Prefect server with `prefect server start" in line


def test_an_unknown_model_is_refused_before_torch_is_imported(tmp_path):
    corpus = write_reviews_csv(tmp_path / "c.csv")
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    code = (
        "import sys; from flows.cli import main; status = main(sys.argv[1:]); "
        "print('heavy imports:', sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules)); "
        "sys.exit(status)"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code, "extract", "--corpus", str(corpus), "--model", "nosuch", "--store", "s.zarr"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(REPOSITORY)},
    )
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        "effattn extract: error: unknown model 'nosuch': use one of ['minilm', 'smollm2'] or the path of a local "
        "Hugging Face model folder (nothing is downloaded)"
    ]
    assert finished.stdout.splitlines() == ["heavy imports: []"]


def test_a_csv_of_nul_bytes_gets_one_short_line(tmp_path):
    corpus = tmp_path / "nul.csv"
    corpus.write_bytes(b"\0" * 16384)
    line = refusal(["extract", "--corpus", str(corpus), "--model", "minilm", "--store", "s.zarr"], tmp_path)
    assert line == (
        f"{corpus} holds 16384 NUL bytes (the first at byte offset 0): it is not a text file (a binary "
        "file, or one saved as UTF-16). Save the corpus as a UTF-8 CSV or JSONL file."
    )


def test_verify_tells_an_unfinished_store_from_a_sound_one(unfinished_store, efficient_store, tmp_path):
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    finished = run_cli(["verify", unfinished_store], prefect_home, tmp_path)
    assert finished.returncode == 3, finished.stderr
    assert finished.stderr == ""
    lines = finished.stdout.splitlines()
    assert lines[0].startswith(f"{unfinished_store}: INCOMPLETE: ")
    assert lines[0].endswith("the finished shards are sound, but a stage has not finished:")
    assert lines[1:] == [
        "  extraction shards [1] are not completed: run the `effattn extract` command that created "
        "the store again to finish them",
        "prefect imported: False",
    ]
    finished = run_cli(["verify", efficient_store], prefect_home, tmp_path)
    assert finished.returncode == 0, finished.stdout
    assert finished.stdout.splitlines()[0].startswith(f"{efficient_store}: OK: ")
    finished = run_cli(["verify", str(tmp_path / "absent.zarr")], prefect_home, tmp_path)
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        f"effattn verify: error: there is no store at {tmp_path / 'absent.zarr'}: nothing to verify"
    ]
