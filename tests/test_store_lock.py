"""storage_schemas.store_lock: one writer per store, tested with real processes (a holder in a subprocess, a holder
killed with SIGKILL, racing takers of a stale lock), and the object-store variant on fsspec's memory filesystem."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zarr

from storage_schemas.attention_store import AttentionStoreError, attention_store_state
from storage_schemas.storage_faults import StoreNotWritableError
from storage_schemas.store_lock import (
    LOCK_SUFFIX,
    StoreLockedError,
    _ObjectStoreLock,
    break_store_lock,
    hold_store_lock,
    lock_location,
    read_store_lock,
)

REPOSITORY = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# Takes the lock, prints a JSON line (the holder, or the refusal), then holds it until stdin closes or `hold` seconds.
HOLDER = """
import json, sys, time
from storage_schemas.store_lock import StoreLockedError, hold_store_lock
url, stage, start_at, hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
while time.time() < start_at:
    time.sleep(0.001)
try:
    with hold_store_lock(url, stage) as lock:
        print(json.dumps({"won": True, "pid": lock.holder.pid, "started": lock.holder.started,
                          "taken_over": lock.taken_over and lock.taken_over.pid}), flush=True)
        if hold:
            time.sleep(hold)
        else:
            sys.stdin.read()
except StoreLockedError as error:
    print(json.dumps({"won": False, "message": str(error)}), flush=True)
"""


def start_holder(url: str, stage: str = "extract", start_at: float = 0.0, hold: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, stage, str(start_at), str(hold)],
        cwd=REPOSITORY,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def report_of(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, f"the holder process printed nothing (exit status {process.wait()})"
    return json.loads(line)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture()
def url(tmp_path) -> str:
    return str(tmp_path / "store.zarr")


def lock_file(url: str) -> Path:
    return Path(os.path.realpath(url) + LOCK_SUFFIX)


def write_record(url: str, **fields) -> None:
    record = {
        "schema": "effattn.store_lock",
        "store": url,
        "stage": "extract",
        "host": HOST,
        "pid": os.getpid(),
        "process_started": psutil.Process().create_time(),
        "started": "2026-01-02T03:04:05+00:00",
        "token": "t",
        **fields,
    }
    lock_file(url).write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------
# two real processes


def test_a_second_writer_is_refused_naming_the_holder_until_it_ends(url):
    holder = start_holder(url, "efficient")
    try:
        held = report_of(holder)
        assert held["won"]
        message = (
            f"{url} is locked by effattn efficient (host {HOST}, pid {holder.pid}, started {held['started']}), "
            f"which is still running and writing into it: wait for it to finish, or stop it (kill {holder.pid}); "
            "two runs writing into one store would lose data. Nothing was changed"
        )
        with pytest.raises(StoreLockedError, match=re.escape(message)) as refused:
            with hold_store_lock(url, "extract"):
                pytest.fail("the lock was granted twice")
        assert isinstance(refused.value, AttentionStoreError)
        assert read_store_lock(url).pid == holder.pid
        holder.stdin.close()  # the holder leaves its block: the lock is released and its file removed
        assert holder.wait(timeout=30) == 0
    finally:
        stop(holder)
    assert not lock_file(url).exists()
    with hold_store_lock(url, "extract") as lock:
        assert lock.taken_over is None and lock.holder.pid == os.getpid()
        assert read_store_lock(url) == lock.holder
    assert not lock_file(url).exists()


def test_the_lock_of_a_killed_process_is_taken_over(url):
    holder = start_holder(url)
    try:
        assert report_of(holder)["won"]
    finally:
        stop(holder)  # SIGKILL: no cleanup runs, the lock file stays behind
    assert read_store_lock(url).pid == holder.pid
    with hold_store_lock(url, "efficient") as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == holder.pid
        assert read_store_lock(url).pid == os.getpid()
    assert not lock_file(url).exists()


def test_racing_takers_of_a_stale_lock_never_both_win(url):
    dead = start_holder(url)
    try:
        assert report_of(dead)["won"]
    finally:
        stop(dead)
    start_at = time.time() + 4.0  # after every process has imported: they all try within a millisecond or so
    racers = [start_holder(url, start_at=start_at, hold=3.0) for _ in range(4)]
    try:
        reports = [report_of(racer) for racer in racers]
    finally:
        for racer in racers:
            stop(racer)
    winners = [report for report in reports if report["won"]]
    assert len(winners) == 1, reports
    assert winners[0]["taken_over"] == dead.pid
    for report in reports:
        if not report["won"]:
            assert f"pid {winners[0]['pid']}" in report["message"], report


# ------------------------------------------------------------------------------------------
# records left behind


def test_a_reused_pid_is_not_mistaken_for_the_holder(url):
    write_record(url, process_started=psutil.Process().create_time() - 3600)  # "our" pid, an hour older process
    with hold_store_lock(url, "extract") as lock:
        assert lock.taken_over.started == "2026-01-02T03:04:05+00:00"


def test_a_live_record_without_flock_is_still_refused(url):
    write_record(url)  # this very process, as if it had written the record through another path
    with pytest.raises(StoreLockedError, match=re.escape(f"pid {os.getpid()}, started 2026-01-02T03:04:05+00:00")):
        with hold_store_lock(url, "extract"):
            pass


def test_a_holder_on_another_host_is_refused_until_unlocked(url, capsys):
    from flows.cli import main

    write_record(url, host="gpu-node-7", pid=4242, stage="causal")
    message = (
        f"{url} is locked by effattn causal (host gpu-node-7, pid 4242, started 2026-01-02T03:04:05+00:00), on "
        f"another host, so whether it is still running cannot be checked from {HOST}. If it is, wait for it to "
        f"finish; if it died, remove its lock with `effattn unlock {url}` and run this again. Nothing was changed"
    )
    with pytest.raises(StoreLockedError, match=re.escape(message)):
        with hold_store_lock(url, "extract"):
            pass
    assert lock_file(url).exists()
    assert main(["unlock", url]) == 0
    assert capsys.readouterr().out.strip() == (
        f"removed the lock of effattn causal (host gpu-node-7, pid 4242, started 2026-01-02T03:04:05+00:00) from {url}"
    )
    assert not lock_file(url).exists()
    assert main(["unlock", url]) == 0
    assert capsys.readouterr().out.strip() == f"{url} is not locked"
    with hold_store_lock(url, "extract") as lock:
        assert lock.taken_over is None


def test_unlock_refuses_while_the_holder_runs(url):
    with hold_store_lock(url, "extract") as lock:
        with pytest.raises(
            StoreLockedError,
            match=re.escape(
                f"{url} is locked by effattn extract (host {HOST}, pid {os.getpid()}, started {lock.holder.started}), "
                f"which is still running: stop that run first (kill {os.getpid()} on that host)"
            ),
        ):
            break_store_lock(url)
        assert read_store_lock(url) == lock.holder


# ------------------------------------------------------------------------------------------
# where the lock lives


def test_readers_never_see_the_lock_and_every_spelling_finds_it(url, tmp_path, monkeypatch):
    zarr.open_group(url, mode="w-", zarr_format=3).create_array("x", shape=(2,), dtype="int8")
    before = sorted(name for name, _ in zarr.open_group(url, mode="r").members())
    with hold_store_lock(url, "extract"):
        assert sorted(os.listdir(url)) == ["x", "zarr.json"]  # beside the store, not in it
        assert sorted(name for name, _ in zarr.open_group(url, mode="r").members()) == before
        monkeypatch.chdir(tmp_path)
        with pytest.raises(StoreLockedError):
            with hold_store_lock("./store.zarr/", "extract"):
                pass
    assert lock_location("./store.zarr/")[1] == os.path.realpath(url) + LOCK_SUFFIX


def test_a_new_store_is_still_absent_while_its_lock_is_held(url):
    with hold_store_lock(url, "extract"):
        assert attention_store_state(url) == "absent"


def test_a_lock_where_nothing_may_be_written_says_so(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
        folder = Path("/sys/effattn-test")  # running as root: permissions do not stop us, sysfs does
    except PermissionError:
        pass
    finally:
        (tmp_path / "read-only").chmod(0o755)
    url = str(folder / "store.zarr")
    with pytest.raises(StoreNotWritableError, match=re.escape(f"cannot write to {url} (")) as refused:
        with hold_store_lock(url, "extract"):
            pass
    assert str(refused.value).endswith(
        "choose a store location this user may write to, or fix the permissions of that folder. "
        "Nothing already stored was changed"
    )


# ------------------------------------------------------------------------------------------
# object stores (fsspec's memory filesystem stands in for s3://)


@pytest.fixture()
def memory_url(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setattr(_ObjectStoreLock, "settle_seconds", 0.01)
    url = f"memory://effattn-lock-{tmp_path.name}/store.zarr"
    yield url
    memory = fsspec.filesystem("memory")
    if memory.exists(f"/effattn-lock-{tmp_path.name}"):
        memory.rm(f"/effattn-lock-{tmp_path.name}", recursive=True)


def test_object_store_lock_refuses_a_second_writer_and_is_released(memory_url):
    import fsspec

    memory = fsspec.filesystem("memory")
    path = lock_location(memory_url)[1]
    with hold_store_lock(memory_url, "extract") as lock:
        assert path.endswith(f"/store.zarr{LOCK_SUFFIX}") and memory.exists(path)
        assert read_store_lock(memory_url) == lock.holder
        with pytest.raises(StoreLockedError, match=re.escape(f"pid {os.getpid()}, started {lock.holder.started}")):
            with hold_store_lock(memory_url, "efficient"):
                pass
        assert read_store_lock(memory_url) == lock.holder  # the refused run left the holder's record alone
    assert not memory.exists(path)


def test_object_store_stale_and_remote_records(memory_url):
    import fsspec

    memory = fsspec.filesystem("memory")
    path = lock_location(memory_url)[1]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    assert not psutil.pid_exists(dead_pid)
    record = {
        "schema": "effattn.store_lock",
        "store": memory_url,
        "stage": "extract",
        "host": HOST,
        "pid": dead_pid,
        "process_started": None,
        "started": "2026-01-02T03:04:05+00:00",
        "token": "t",
    }
    memory.pipe(path, json.dumps(record).encode())
    with hold_store_lock(memory_url, "efficient") as lock:
        assert lock.taken_over.pid == dead_pid
    memory.pipe(path, json.dumps({**record, "host": "gpu-node-7"}).encode())
    with pytest.raises(StoreLockedError, match=re.escape(f"`effattn unlock {memory_url}`")):
        with hold_store_lock(memory_url, "efficient"):
            pass
    removed, holder = break_store_lock(memory_url)
    assert removed and holder.host == "gpu-node-7"
    assert not memory.exists(path)


def test_checking_for_a_lock_takes_none_and_refuses_a_live_or_remote_holder(url):
    from storage_schemas.store_lock import check_store_unlocked

    check_store_unlocked(url)  # no lock file: nothing written either
    assert not lock_file(url).exists()
    write_record(url, pid=os.getpid())  # alive, on this host
    with pytest.raises(
        StoreLockedError,
        match=re.escape(
            f"{url} is locked by effattn extract (host {HOST}, pid "
            f"{os.getpid()}, started 2026-01-02T03:04:05+00:00), which "
            "is still running and writing into it"
        ),
    ):
        check_store_unlocked(url)
    write_record(url, host="gpu-node-7", pid=4242)
    with pytest.raises(StoreLockedError, match="on another host, so whether it is still running cannot be checked"):
        check_store_unlocked(url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(url, pid=dead.pid)  # a holder that is gone: the stage takes such a lock over
    check_store_unlocked(url)
    assert lock_file(url).exists()  # left for the stage to take over
