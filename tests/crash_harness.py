"""Running `effattn` as real subprocesses and hurting them: a Prefect server on loopback shared by the runs, SIGKILL
(or a Ctrl-C's SIGINT, or SIGTERM) of a whole process group at a chosen moment, a file-size limit that makes writes
fail like a full disk, and the progress of a run read from its store. Used by tests/test_crash_resume.py,
tests/test_interrupts.py, tests/test_prefect_server.py and benchmarks/fault_injection.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPOSITORY = Path(__file__).resolve().parents[1]
EFFATTN = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
# The same, with a file-size limit (bytes) set first: a write beyond it fails with EFBIG, as on a full disk
# (Python ignores SIGXFSZ, so the process is not killed by the signal).
EFFATTN_WITH_FILE_SIZE_LIMIT = [
    sys.executable,
    "-c",
    "import resource, sys; limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "from flows.cli import main; sys.exit(main())",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process group led by `process` (started with start_new_session=True)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def live_members(process_group: int) -> list[int]:
    """Processes still running in `process_group` (zombies excluded)."""
    alive = []
    for candidate in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(candidate.pid) == process_group and candidate.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(candidate.pid)
    return alive


@contextlib.contextmanager
def prefect_server(folder: Path, timeout: float = 120.0) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free loopback port (own home and database under `folder`); yields the
    environment for effattn subprocesses that use it. Stopped by its process group id on exit."""
    port = _free_port()
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPOSITORY),
    }
    log = (folder / "prefect-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start; see {folder / 'prefect-server.log'}")
            time.sleep(0.3)
        yield environment
    finally:
        stop_process_group(server)
        log.close()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def start(
    arguments: list[str], environment: dict[str, str], output: Path, file_size_limit: int | None = None
) -> subprocess.Popen:
    """Start `effattn <arguments>` in its own process group, its output in `output`.out/.err."""
    command = EFFATTN if file_size_limit is None else [*EFFATTN_WITH_FILE_SIZE_LIMIT, str(file_size_limit)]
    with output.with_suffix(".out").open("w") as stdout, output.with_suffix(".err").open("w") as stderr:
        return subprocess.Popen(
            [*command, *arguments],
            cwd=REPOSITORY,
            env=environment,
            start_new_session=True,
            stdout=stdout,
            stderr=stderr,
        )


def run(
    arguments: list[str],
    environment: dict[str, str],
    output: Path,
    timeout: float = 300.0,
    file_size_limit: int | None = None,
) -> Run:
    """Run `effattn <arguments>` to its end."""
    began = time.monotonic()
    process = start(arguments, environment, output, file_size_limit)
    try:
        process.wait(timeout=timeout)
    finally:
        stop_process_group(process)
    return Run(
        process.returncode,
        output.with_suffix(".out").read_text(),
        output.with_suffix(".err").read_text(),
        time.monotonic() - began,
    )


def extraction_progress(store: str) -> int:
    """Shards recorded as done by the extraction; -1 while the store is being created, -2 before."""
    try:
        attributes = json.loads((Path(store) / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return -2
    return len(attributes.get("completed_shards", [])) if attributes.get("prepared") else -1


def efficient_progress(store: str, variant: str = "simplex") -> int:
    """Shards of `variant` recorded as done; -1 before its arrays exist."""
    try:
        attributes = json.loads((Path(store) / "efficient" / variant / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return -1
    return len(attributes.get("completed_shards", []))


@dataclass
class Kill:
    progress_at_kill: int  # shards done when the signal was sent
    seconds: float  # from start to kill
    survivors: list[int]  # processes of the group still alive afterwards (must be none)
    finished_first: bool  # the run ended before the moment came (nothing was killed)


def kill_when(
    arguments: list[str],
    environment: dict[str, str],
    output: Path,
    progress: Callable[[], int],
    reached: int,
    delay: float,
    timeout: float = 300.0,
) -> Kill:
    """Start `effattn <arguments>`, wait until `progress()` >= `reached`, then `delay` seconds more, then SIGKILL its
    whole process group (Prefect's server client, Dask workers and all)."""
    began = time.monotonic()
    process = start(arguments, environment, output)
    try:
        while progress() < reached:
            if process.poll() is not None:
                return Kill(progress(), time.monotonic() - began, [], True)
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"effattn {' '.join(arguments)} did not reach progress {reached} in {timeout} s")
            time.sleep(0.005)
        time.sleep(delay)
        finished = process.poll() is not None
        at_kill, seconds = progress(), time.monotonic() - began
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while (survivors := live_members(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return Kill(at_kill, seconds, survivors, finished)
    finally:
        stop_process_group(process, grace=0)


@dataclass
class Interrupted:
    progress_at_signal: int  # shards done when the signal was sent
    exit_seconds: float  # from the signal to the end of the process
    returncode: int
    stderr: str
    survivors: list[int]  # processes of the group still alive 10 s after it ended (must be none)
    finished_first: bool  # the run ended before the moment came (nothing was interrupted)


def interrupt_when(
    arguments: list[str],
    environment: dict[str, str],
    output: Path,
    progress: Callable[[], int],
    reached: int,
    signal_number: int,
    timeout: float = 300.0,
) -> Interrupted:
    """Start `effattn <arguments>`, wait until `progress()` >= `reached`, then send `signal_number` to its whole
    process group, as a terminal's Ctrl-C does (SIGINT), and time how long it takes to end."""
    began = time.monotonic()
    process = start(arguments, environment, output)
    try:
        while progress() < reached:
            if process.poll() is not None:
                break
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"effattn {' '.join(arguments)} did not reach progress {reached} in {timeout} s")
            time.sleep(0.005)
        finished = process.poll() is not None
        at_signal, sent = progress(), time.monotonic()
        if not finished:
            os.killpg(process.pid, signal_number)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        exit_seconds = time.monotonic() - sent
        deadline = time.monotonic() + 10
        while (survivors := live_members(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return Interrupted(
            at_signal, exit_seconds, process.returncode, output.with_suffix(".err").read_text(), survivors, finished
        )
    finally:
        stop_process_group(process, grace=0)
