"""Ctrl-C and SIGTERM (flows/interrupts.py): the signal's one line, its exit status, a cleanup that a second signal
does not break, a stop that hangs ended after SHUTDOWN_SECONDS; and real `effattn extract` / `efficient` runs
interrupted mid-run by a signal to their whole process group (as a terminal's Ctrl-C sends it), each with its own
temporary Prefect server, as a new user's run has: they end in seconds (before this module existed: 67-154 s and ~200
lines of "Error logging to API"), with one line, no lock left, and the same command completes the store to the
content of an uninterrupted run.

The uninterrupted runs and the reruns share one Prefect server on loopback (faster; started and stopped here).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import interrupts
from flows.interrupts import Interruption, interruption_message, stops_cleanly_on_signals
from storage_schemas.store_lock import LOCK_SUFFIX
from storage_schemas.verification import content_digests, verify_store
from tests import crash_harness
from tests.store_builders import write_corpus

# Far below the 67-154 s of before, and generous for a loaded 2-core machine (measured: 2-9 s).
EXIT_BOUND_SECONDS = 20.0
REPOSITORY = Path(__file__).resolve().parents[1]


# --- the handler, in small subprocesses (a signal in pytest's own process would stop the session) ---


def test_the_line_and_the_exit_status_of_an_interruption():
    assert interruption_message(Interruption("extract", signal.SIGINT)) == (
        "effattn extract: interrupted by SIGINT: completed shards are kept; run the same command again to finish"
    )
    assert interruption_message(Interruption("report", signal.SIGTERM)) == (
        "effattn report: interrupted by SIGTERM: run the same command again to start over"
    )
    assert interruption_message(Interruption("", signal.SIGINT)).startswith("effattn: interrupted by SIGINT")
    assert Interruption("run", signal.SIGINT).exit_status == 130
    assert Interruption("run", signal.SIGTERM).exit_status == 143


def test_without_a_signal_exceptions_pass_and_the_handlers_are_restored():
    before = {number: signal.getsignal(number) for number in interrupts.HANDLED_SIGNALS}

    @stops_cleanly_on_signals
    def failing(error: BaseException) -> int:
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]  # ours while running
        raise error

    with pytest.raises(RuntimeError):
        failing(RuntimeError("boom"))
    with pytest.raises(KeyboardInterrupt):  # one raised by code, not by a signal, is not an interruption
        failing(KeyboardInterrupt())
    assert {number: signal.getsignal(number) for number in interrupts.HANDLED_SIGNALS} == before


CLEANUP_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from flows import interrupts
interrupts.SHUTDOWN_SECONDS = float(sys.argv[2])

@interrupts.stops_cleanly_on_signals
def main():
    interrupts.name_the_command("extract")
    try:
        try:  # "ready" inside the try: the signal, sent once it is read, always lands here
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
        except KeyboardInterrupt:
            while sys.argv[3] == "hang":  # a command that will not stop (the handler raises only once)
                time.sleep(0.05)
            raise
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while cleaning up
        time.sleep(0.5)
        Path(sys.argv[1]).write_text("cleaned up")

sys.exit(main())
"""


def run_script_until_signal(tmp_path: Path, signal_number: int, shutdown_seconds: float, behaviour: str):
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", CLEANUP_SCRIPT, str(marker), str(shutdown_seconds), behaviour],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n"
        sent = time.monotonic()
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=60)
        return process.returncode, stderr, time.monotonic() - sent, marker
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_unwinds_the_command_once_and_a_second_one_does_not_break_the_cleanup(tmp_path, signal_number):
    returncode, stderr, _, marker = run_script_until_signal(tmp_path, signal_number, 30, "stop")
    assert returncode == 128 + signal_number
    name = signal.Signals(signal_number).name
    assert stderr.splitlines() == [
        f"effattn extract: interrupted by {name}: completed shards are kept; run the same command again to finish"
    ]
    assert marker.read_text() == "cleaned up"


def test_a_stop_that_hangs_ends_after_the_shutdown_limit(tmp_path):
    returncode, stderr, seconds, marker = run_script_until_signal(tmp_path, signal.SIGINT, 1, "hang")
    assert returncode == 130
    assert stderr.splitlines() == ["effattn extract: did not stop within 1 s of SIGINT; exiting now"]
    assert seconds < EXIT_BOUND_SECONDS
    assert not marker.exists()  # ended without its cleanup: the kernel releases a store's flock


TURNED_INTERRUPT_SCRIPT = """
import sys, time
from flows import cli

def runner(*settings):
    try:
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise ValueError("Task run is not set")  # what Prefect's task engine made of one Ctrl-C

cli.RUNNERS["inspect"] = runner
sys.exit(cli.main(["inspect", "no-store.zarr"]))
"""


def test_an_error_raised_by_the_interruption_is_reported_as_the_interruption(tmp_path):
    """An interruption that the stage's machinery turns into another error (one the CLI would otherwise print as
    `error: ...` with status 2) still ends as the interruption: its one line and status 130."""
    process = subprocess.Popen(
        [sys.executable, "-c", TURNED_INTERRUPT_SCRIPT],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert stderr.splitlines() == ["effattn inspect: interrupted by SIGINT: run the same command again to start over"]


PREFECT_SIGTERM_SCRIPT = """
import os, signal, sys, time
from prefect.utilities.engine import capture_sigterm
from flows import interrupts

@interrupts.stops_cleanly_on_signals
def main():
    interrupts.name_the_command("extract")
    interrupts.record_signals_that_prefect_handles()
    with capture_sigterm():  # what a Prefect flow or task run does around its work
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except BaseException as error:
            print(type(error).__name__, flush=True)
            raise ValueError("Task run is not set")  # what a task engine between states made of it

sys.exit(main())
"""


def test_a_sigterm_that_prefects_handler_receives_and_a_task_engine_turns_into_an_error_is_the_interruption():
    """While Prefect's SIGTERM handler is installed ours does not see the signal; the one that replaces Prefect's
    records it, so the TerminationSignal turned into a ValueError ends as the interruption, status 143."""
    process = subprocess.run(
        [sys.executable, "-c", PREFECT_SIGTERM_SCRIPT],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.stdout.splitlines() == ["TerminationSignal"]  # Prefect's handler raised, not ours
    assert process.returncode == 143, process.stderr
    assert process.stderr.splitlines()[-1] == (
        "effattn extract: interrupted by SIGTERM: completed shards are kept; run the same command again to finish"
    )


# --- real runs ---


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupts")


@pytest.fixture(scope="module")
def shared_server(workspace):
    with crash_harness.prefect_server(workspace) as environment:
        yield environment


@pytest.fixture(scope="module")
def own_server(workspace, shared_server) -> dict[str, str]:
    """The environment of a new user's run: no PREFECT_API_URL, so each run starts its own temporary server."""
    environment = {**shared_server, "PREFECT_HOME": str(workspace / "own-prefect-home")}
    environment.pop("PREFECT_API_URL")
    environment.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # effattn's own default applies
    return environment


@pytest.fixture(scope="module")
def extract_arguments(workspace, tiny_bert_folder) -> list[str]:
    corpus = write_corpus(workspace / "reviews.csv", copies=8)  # 80 texts in 40 shards
    return [
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
        "--max-length",
        "32",
    ]


@pytest.fixture(scope="module")
def clean_extraction(workspace, shared_server, extract_arguments) -> tuple[str, dict]:
    store = str(workspace / "clean.zarr")
    done = crash_harness.run([*extract_arguments, "--store", store], shared_server, workspace / "clean")
    assert done.returncode == 0, done.stderr
    return store, content_digests(store)


@pytest.fixture(scope="module")
def clean_efficient(workspace, shared_server, clean_extraction) -> dict:
    store = str(workspace / "efficient-clean.zarr")
    shutil.copytree(clean_extraction[0], store)
    done = crash_harness.run(
        ["efficient", "--store", store, "--variants", "simplex", "--workers", "2"],
        shared_server,
        workspace / "efficient-clean",
    )
    assert done.returncode == 0, done.stderr
    return content_digests(store)


def lock_file(store: str) -> Path:
    return Path(os.path.realpath(store) + LOCK_SUFFIX)


def assert_stopped_cleanly(interrupted: crash_harness.Interrupted, command: str, signal_number: int) -> None:
    name = signal.Signals(signal_number).name
    assert not interrupted.finished_first, "the run ended before the signal: make it longer"
    assert interrupted.returncode == 128 + signal_number, interrupted.stderr
    assert interrupted.exit_seconds < EXIT_BOUND_SECONDS, interrupted.stderr
    assert interrupted.survivors == []  # Dask workers and the temporary server included
    lines = interrupted.stderr.splitlines()
    assert [line for line in lines if line.startswith("effattn")] == [
        f"effattn {command}: interrupted by {name}: completed shards are kept; run the same command again to finish"
    ]
    assert lines[-1].startswith(f"effattn {command}: interrupted by {name}")  # the last line: nothing after it
    for noise in ("Error logging to API", "Traceback", "Crash detected", "did not stop within"):
        assert noise not in interrupted.stderr


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_extraction_stops_in_seconds_and_the_same_command_completes_it(
    workspace, own_server, shared_server, extract_arguments, clean_extraction, signal_number
):
    store = str(workspace / f"extract-{signal_number}.zarr")
    arguments = [*extract_arguments, "--store", store]
    interrupted = crash_harness.interrupt_when(
        arguments,
        own_server,
        workspace / f"extract-{signal_number}",
        lambda: crash_harness.extraction_progress(store),
        1,
        signal_number,
    )
    assert_stopped_cleanly(interrupted, "extract", signal_number)
    assert not lock_file(store).exists()
    assert 1 <= crash_harness.extraction_progress(store) < 40

    rerun = crash_harness.run(arguments, shared_server, workspace / f"extract-{signal_number}-rerun")
    assert rerun.returncode == 0, rerun.stderr
    assert content_digests(store) == clean_extraction[1]
    assert verify_store(store).ok


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_efficient_stage_stops_in_seconds_and_the_same_command_completes_it(
    workspace, own_server, shared_server, clean_extraction, clean_efficient, signal_number
):
    store = str(workspace / f"efficient-{signal_number}.zarr")
    shutil.copytree(clean_extraction[0], store)
    arguments = ["efficient", "--store", store, "--variants", "simplex", "--workers", "2"]
    interrupted = crash_harness.interrupt_when(
        arguments,
        own_server,
        workspace / f"efficient-{signal_number}",
        lambda: crash_harness.efficient_progress(store),
        1,
        signal_number,
    )
    assert_stopped_cleanly(interrupted, "efficient", signal_number)
    assert not lock_file(store).exists()
    assert 1 <= crash_harness.efficient_progress(store) < 40

    rerun = crash_harness.run(arguments, shared_server, workspace / f"efficient-{signal_number}-rerun")
    assert rerun.returncode == 0, rerun.stderr
    assert content_digests(store) == clean_efficient
    assert verify_store(store).ok
