"""The Prefect API of a command (flows/prefect_server.py): the temporary server's startup limit (effattn's default,
the user's value, a bad value), the one line when it does not start in time or when nothing answers at
PREFECT_API_URL, and the temporary server's process: outside the run's process group (a Ctrl-C must not stop it
before the run has reported its end) and still gone when the run is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main
from flows.prefect_server import (
    DEFAULT_STARTUP_TIMEOUT_SECONDS,
    SERVER_LOG_NAME,
    STARTUP_TIMEOUT_VARIABLE,
    PrefectServerError,
    install_temporary_server,
    set_startup_timeout_default,
    start_server_hint,
)
from tests import crash_harness
from tests.store_builders import write_corpus

HINT = (
    "start a Prefect server with `prefect server start --host 127.0.0.1 --port 4200` and, in the shell that runs "
    "`effattn extract`, `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


def test_the_startup_limit_is_effattns_default_unless_the_user_set_one():
    environment: dict[str, str] = {}
    assert set_startup_timeout_default(environment) == DEFAULT_STARTUP_TIMEOUT_SECONDS == 120
    assert environment == {STARTUP_TIMEOUT_VARIABLE: "120"}  # what Prefect and its server process read
    assert set_startup_timeout_default({STARTUP_TIMEOUT_VARIABLE: "300"}) == 300
    for bad in ("0.5", "soon", "0", "-3"):
        with pytest.raises(PrefectServerError, match=f"{STARTUP_TIMEOUT_VARIABLE}='{bad}' is not a whole number"):
            set_startup_timeout_default({STARTUP_TIMEOUT_VARIABLE: bad})


@pytest.fixture()
def no_temporary_server(monkeypatch):
    """Prefect's registry of temporary servers, emptied for the test and restored after it."""
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})


@pytest.mark.parametrize("configured, expected", [(None, 120), ("45", 45)])
def test_the_server_prefect_starts_is_ours_and_gets_the_configured_limit(
    monkeypatch, no_temporary_server, configured, expected
):
    if configured is None:
        monkeypatch.delenv(STARTUP_TIMEOUT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(STARTUP_TIMEOUT_VARIABLE, configured)
    limits = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: limits.append(timeout))
    install_temporary_server("extract")
    server = SubprocessASGIServer()  # what Prefect's client does when no PREFECT_API_URL is set
    assert type(server).__name__ == "TemporaryServer" and server.command == "extract"
    server.start()  # Prefect calls it without a limit
    assert limits == [expected]


def test_a_server_that_does_not_start_in_time_is_one_line_that_says_what_to_do(
    tmp_path, small_corpus_csv, tiny_bert_folder
):
    environment = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "home"),
        STARTUP_TIMEOUT_VARIABLE: "1",
        "PYTHONPATH": str(crash_harness.REPOSITORY),
    }
    environment.pop("PREFECT_API_URL", None)
    store = tmp_path / "store.zarr"
    done = crash_harness.run(
        [
            "extract",
            "--corpus",
            str(small_corpus_csv),
            "--model",
            str(tiny_bert_folder),
            "--no-train",
            "--store",
            str(store),
        ],
        environment,
        tmp_path / "extract",
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("effattn")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors[0].startswith(
        "effattn extract: error: the temporary Prefect server did not answer within 1 s "
        "(Timed out while attempting to connect to ephemeral Prefect API server"
    )
    log = tmp_path / "home" / SERVER_LOG_NAME  # the server's output, kept out of the run's
    assert errors[0].endswith(
        f"a busy machine starts it slowly; its output: {log}): {HINT}, or allow it more time "
        f"with `export {STARTUP_TIMEOUT_VARIABLE}=300`"
    )
    assert log.exists()
    assert not store.exists()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nothing_answering_at_prefect_api_url_is_one_line_within_seconds(tmp_path, small_corpus_csv, capsys):
    url = f"http://127.0.0.1:{free_loopback_port()}/api"
    store = tmp_path / "store.zarr"
    began = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        status = main(["extract", "--corpus", str(small_corpus_csv), "--model", "minilm", "--store", str(store)])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"effattn extract: error: no Prefect server answers at PREFECT_API_URL={url} (ConnectError: [Errno 111] "
        f"Connection refused): {HINT}; or unset PREFECT_API_URL to let effattn start a temporary one"
    ]
    assert time.monotonic() - began < 30  # not Prefect's own retries (about 70 s measured)
    assert not store.exists()


def test_the_hint_names_the_command():
    assert start_server_hint("extract") == HINT


def test_the_temporary_server_runs_outside_the_group_and_ends_when_the_run_is_killed(tmp_path, tiny_bert_folder):
    corpus = write_corpus(tmp_path / "reviews.csv", copies=8)
    environment = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(crash_harness.REPOSITORY)}
    environment.pop("PREFECT_API_URL", None)
    environment.pop(STARTUP_TIMEOUT_VARIABLE, None)
    store = str(tmp_path / "store.zarr")
    process = crash_harness.start(
        [
            "extract",
            "--corpus",
            str(corpus),
            "--model",
            str(tiny_bert_folder),
            "--no-train",
            "--shard-size",
            "2",
            "--batch-size",
            "1",
            "--store",
            store,
        ],
        environment,
        tmp_path / "extract",
    )
    try:
        deadline = time.monotonic() + 300
        while crash_harness.extraction_progress(store) < 1 and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        servers = [child for child in psutil.Process(process.pid).children() if "uvicorn" in " ".join(child.cmdline())]
        assert len(servers) == 1, (tmp_path / "extract.err").read_text()
        server = servers[0]
        assert os.getpgid(server.pid) != process.pid  # a Ctrl-C to the run's group does not reach it
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        server.wait(timeout=30)  # SIGTERM from the kernel when its parent died
        assert not server.is_running()
    finally:
        crash_harness.stop_process_group(process, grace=0)
