"""A writer lock on a store: one live run at a time writes into a store.

Two runs writing into one store would interleave whole-shard writes and completion markers and lose data silently,
so every stage that writes takes the store's lock first:

    with hold_store_lock(url, "extract"):
        ...  # write shards, mark them done

The lock is a small JSON file next to the store, `<store>.effattn-lock.json` (outside the Zarr group, so Zarr and
xarray readers never see it and a copied store carries no lock), naming its holder: stage, host, process id, the
process's start time and when the lock was taken. A second run is refused with `StoreLockedError`, whose message
names the holder and says what to do.

Local disk: the lock file is also held with `flock`, which the kernel releases when the holder dies, even by
SIGKILL; whoever obtains the flock owns the lock (two racing takers cannot both win), and a record left by a dead
process on this host is taken over (a `pid` that is gone, or reused by a process that started later). A record
written on another host (a network filesystem) cannot be checked from here and is refused; `effattn unlock STORE`
removes it once you know that run is gone (`break_store_lock`).

Object stores (fsspec URLs): there is no exclusive create, so the lock is written, left to settle and read back; the
run whose record is read back owns it. This catches runs that start more than `settle_seconds` apart, not runs that
start within the same instant. Stale records on the same host are taken over as on local disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import fsspec
import psutil
from fsspec.implementations.local import LocalFileSystem

from storage_schemas.errors import StoreLockedError
from storage_schemas.storage_faults import storage_errors_explained

LOCK_SUFFIX = ".effattn-lock.json"
LOCK_SCHEMA = "effattn.store_lock"
# A process whose start time differs from the recorded one by more than this is another process with a reused pid.
START_TIME_SLACK_SECONDS = 1.0
# How long to wait for a holder that has just taken the flock to finish writing its record.
RECORD_WAIT_SECONDS = 2.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a store's lock."""

    store: str
    stage: str
    host: str
    pid: int
    process_started: float | None  # the process's start time (seconds since the epoch), to tell a reused pid
    started: str  # when the lock was taken, ISO 8601 UTC
    token: str  # unique per acquisition

    def describe(self) -> str:
        return f"effattn {self.stage} (host {self.host}, pid {self.pid}, started {self.started})"


@dataclass(frozen=True)
class StoreLock:
    """A held lock: our record, and the record of a dead holder this acquisition took over (or None)."""

    holder: LockHolder
    taken_over: LockHolder | None
    lock_path: str


def lock_location(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of the lock file of the store at `url`: `<store>.effattn-lock.json` beside it
    (local paths are made absolute and resolved, so that every spelling of one store finds the same lock)."""
    filesystem, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(filesystem, LocalFileSystem):
        path = os.path.realpath(os.path.abspath(path))
    path = path.rstrip("/")
    if not path or path.endswith(":"):
        raise ValueError(f"cannot lock {url}: a store must be a folder or prefix with a name, not a filesystem root")
    return filesystem, path + LOCK_SUFFIX


def read_store_lock(url: str, storage_options: dict | None = None) -> LockHolder | None:
    """The record of the store's lock file, or None when there is none (or it is not readable as a record)."""
    filesystem, path = lock_location(url, storage_options)
    try:
        return _parse(filesystem.cat_file(path))
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def hold_store_lock(url: str, stage: str, storage_options: dict | None = None) -> Iterator[StoreLock]:
    """Hold the writer lock of the store at `url` for the block; `stage` names the run in messages.

    Raises `StoreLockedError` naming the holder when another live run holds it (or a run on another host that
    cannot be checked), `StoreNotWritableError` when the lock cannot be created there. A lock left by a dead
    process on this host is taken over (logged; `StoreLock.taken_over` names it). Released on exit, also on error.
    """
    filesystem, path = lock_location(url, storage_options)
    record = _new_record(url, stage)
    with storage_errors_explained(url):
        if isinstance(filesystem, LocalFileSystem):
            lock = _LocalLock(path)
        else:
            lock = _ObjectStoreLock(filesystem, path)
        taken_over = lock.acquire(record, url)
    if taken_over is not None:
        logger.warning("%s: took over the lock left by %s, which is no longer running", url, taken_over.describe())
    try:
        yield StoreLock(holder=record, taken_over=taken_over, lock_path=path)
    finally:
        lock.release(record)


def check_store_unlocked(url: str, storage_options: dict | None = None) -> None:
    """Refuse (`StoreLockedError`, the message `hold_store_lock` would give) a store whose lock is held by a live run
    or by a run on another host, without taking the lock or writing anything (for the CLI's pre-flight; the stage
    takes the lock itself when it starts)."""
    holder = read_store_lock(url, storage_options)
    if holder is None:
        return
    verdict = _verdict(holder)
    if verdict != "dead":
        raise _refuse(url, holder, verdict, lock_location(url, storage_options)[1])


def break_store_lock(url: str, storage_options: dict | None = None) -> tuple[bool, LockHolder | None]:
    """Remove the store's lock (`effattn unlock STORE`): for a run that died on another host, whose lock cannot be
    taken over automatically. Refuses (`StoreLockedError`) while the holder is seen running. Returns (whether a
    lock was removed, its record or None when it was not readable)."""
    filesystem, path = lock_location(url, storage_options)
    with storage_errors_explained(url):
        if isinstance(filesystem, LocalFileSystem):
            return _LocalLock(path).break_lock(url)
        holder = read_store_lock(url, storage_options)
        if holder is None and not filesystem.exists(path):
            return False, None
        if holder is not None and _verdict(holder) == "alive":
            raise StoreLockedError(_live_message(url, holder, path, breaking=True))
        filesystem.rm_file(path)
        return True, holder


# --------------------------------------------------------------------------------------------------------------
# records and verdicts


def _this_host() -> str:
    return socket.gethostname()


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _new_record(url: str, stage: str) -> LockHolder:
    pid = os.getpid()
    return LockHolder(
        store=url,
        stage=stage,
        host=_this_host(),
        pid=pid,
        process_started=_process_started(pid),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        token=uuid.uuid4().hex,
    )


def _encode(record: LockHolder) -> bytes:
    return json.dumps({"schema": LOCK_SCHEMA, **asdict(record)}, indent=1).encode()


def _parse(data: bytes) -> LockHolder | None:
    try:
        fields = json.loads(data.decode())
        if fields.pop("schema") != LOCK_SCHEMA:
            return None
        return LockHolder(**fields)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _verdict(holder: LockHolder) -> str:
    """'dead' (its process is gone: safe to take over), 'alive', or 'elsewhere' (another host: cannot tell)."""
    if holder.host != _this_host():
        return "elsewhere"
    if not psutil.pid_exists(holder.pid):
        return "dead"
    started = _process_started(holder.pid)
    if holder.process_started is not None and started is not None:
        if abs(started - holder.process_started) > START_TIME_SLACK_SECONDS:
            return "dead"  # the pid now belongs to a process that started later
    return "alive"


def _live_message(url: str, holder: LockHolder | None, path: str, breaking: bool = False) -> str:
    if holder is None:
        return (
            f"{url} is locked by another effattn run writing into it (its lock file {path} is being written): wait "
            "for that run to finish, or stop it. Nothing was changed"
        )
    if breaking:
        return (
            f"{url} is locked by {holder.describe()}, which is still running: stop that run first (kill {holder.pid} "
            "on that host); its lock is released when it ends"
        )
    return (
        f"{url} is locked by {holder.describe()}, which is still running and writing into it: wait for it to "
        f"finish, or stop it (kill {holder.pid}); two runs writing into one store would lose data. Nothing was changed"
    )


def _elsewhere_message(url: str, holder: LockHolder) -> str:
    return (
        f"{url} is locked by {holder.describe()}, on another host, so whether it is still running cannot be checked "
        f"from {_this_host()}. If it is, wait for it to finish; if it died, remove its lock with "
        f"`effattn unlock {url}` and run this again. Nothing was changed"
    )


def _refuse(url: str, holder: LockHolder, verdict: str, path: str) -> StoreLockedError:
    if verdict == "elsewhere":
        return StoreLockedError(_elsewhere_message(url, holder))
    return StoreLockedError(_live_message(url, holder, path))


# --------------------------------------------------------------------------------------------------------------
# local disk: flock


class _LocalLock:
    """The lock file held with flock (released by the kernel when the holder dies)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.descriptor: int | None = None

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)

    def _flock(self, descriptor: int) -> bool:
        """Take the flock without waiting; False when another open file holds it."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _is_current_file(self, descriptor: int) -> bool:
        """Whether the path still names the file we hold (a releasing holder unlinks it before closing)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(descriptor)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    @staticmethod
    def _read(descriptor: int) -> bytes:
        size = os.fstat(descriptor).st_size
        return os.pread(descriptor, size, 0) if size else b""

    def _holder_of_held_lock(self, descriptor: int) -> LockHolder | None:
        """The record of a lock someone else holds, waiting briefly while a new holder is still writing it (the
        flock's holder is alive, so a record of a dead process is the one it is about to replace)."""
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while True:
            holder = _parse(self._read(descriptor))
            if (holder is not None and _verdict(holder) != "dead") or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)

    def acquire(self, record: LockHolder, url: str) -> LockHolder | None:
        for _ in range(20):  # the file can be replaced between open and flock only by a releasing holder
            descriptor = self._open()
            try:
                if not self._flock(descriptor):
                    holder = self._holder_of_held_lock(descriptor)
                    raise StoreLockedError(_live_message(url, holder, self.path))
                if not self._is_current_file(descriptor):
                    continue
                data = self._read(descriptor)
                previous = _parse(data)
                if previous is not None:
                    verdict = _verdict(previous)
                    if verdict != "dead":
                        raise _refuse(url, previous, verdict, self.path)
                # nobody holds the flock: an empty file is ours, a garbled one was left by a writer that died
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, _encode(record), 0)
                os.fsync(descriptor)
                self.descriptor, descriptor = descriptor, None
                return previous
            finally:
                if descriptor is not None:
                    os.close(descriptor)
        raise StoreLockedError(f"{url}: its lock {self.path} kept changing hands; try again")

    def release(self, record: LockHolder) -> None:
        if self.descriptor is None:
            return
        try:
            if self._is_current_file(self.descriptor):
                os.unlink(self.path)  # unlinked while still flocked: a waiting taker sees a new file
        finally:
            os.close(self.descriptor)
            self.descriptor = None

    def break_lock(self, url: str) -> tuple[bool, LockHolder | None]:
        try:
            descriptor = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False, None
        try:
            holder = _parse(self._read(descriptor))
            if not self._flock(descriptor):
                raise StoreLockedError(_live_message(url, holder, self.path, breaking=True))
            if holder is not None and _verdict(holder) == "alive":
                raise StoreLockedError(_live_message(url, holder, self.path, breaking=True))
            removed = self._is_current_file(descriptor)
            if removed:
                os.unlink(self.path)
            return removed, holder
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------------------------
# object stores: write, settle, read back


class _ObjectStoreLock:
    """A lock object on a filesystem without exclusive create (s3://, gs://, memory://, ...)."""

    settle_seconds = 0.5

    def __init__(self, filesystem: fsspec.AbstractFileSystem, path: str) -> None:
        self.filesystem = filesystem
        self.path = path

    def _read(self) -> tuple[bool, LockHolder | None]:
        try:
            return True, _parse(self.filesystem.cat_file(self.path))
        except FileNotFoundError:
            return False, None

    def acquire(self, record: LockHolder, url: str) -> LockHolder | None:
        exists, previous = self._read()
        if exists and previous is None:
            raise StoreLockedError(
                f"{url} has a lock object {self.path} that is not a readable lock record: if no effattn run is "
                f"writing into the store, remove it with `effattn unlock {url}` and run this again"
            )
        if previous is not None:
            verdict = _verdict(previous)
            if verdict != "dead":
                raise _refuse(url, previous, verdict, self.path)
        self.filesystem.pipe_file(self.path, _encode(record))
        time.sleep(self.settle_seconds)
        _, current = self._read()
        if current is None or current.token != record.token:
            raise StoreLockedError(_live_message(url, current, self.path))
        return previous

    def release(self, record: LockHolder) -> None:
        _, current = self._read()
        if current is not None and current.token == record.token:
            self.filesystem.rm_file(self.path)
