"""Storage failures: which are transient (retry them), which are not (say what to do).

A failed write never costs stored data: every writer writes whole shards, and a shard is recorded as done only
after its write has returned and its files are on disk (storage_schemas.durable_writes). What this module adds is
the classification and the messages:

* `is_transient_io_error`: a flaky disk or network (EIO, a dropped connection, a timeout) is worth retrying; a full
  disk, a missing permission, a missing file or any non-I/O error is not, and retrying it only delays the message.
* `retry_transient_io`: retries a function on transient errors only, with back-off (for code that runs outside
  Prefect, e.g. on Dask workers; Prefect tasks use their own retries with `is_transient_io_error` as condition).
* `is_corrupt_chunk_error`: a chunk whose stored bytes are damaged (a failed CRC32C checksum), as zarr-python or
  zarrs reports it; `as_os_error` reads zarrs's "(os error N)" RuntimeErrors as the OSErrors they are.
* `storage_errors_explained`: turns "no space left" (also a quota or a file-size limit) and "permission denied" into
  `StoreFullError` / `StoreNotWritableError`, whose messages say what happened and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from storage_schemas.errors import AttentionStoreError, StoreFullError, StoreNotWritableError

# Out of space: the disk, the user's quota, or the process's file-size limit (RLIMIT_FSIZE).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The store cannot be written by this process at all.
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# A path that is missing, or is not what was expected (the OSError subclasses that say so, by number).
NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR})
# Delays (seconds) between the attempts of `retry_transient_io`: 3 retries, back-off by 4.
DEFAULT_RETRY_DELAYS = (0.5, 2.0, 8.0)

Result = TypeVar("Result")


# zarrs (the Rust codec pipeline) reports an operating-system error as a RuntimeError "<strerror> (os error N)".
_ZARRS_OS_ERROR = re.compile(r"\(os error (\d+)\)\s*$")
# What a chunk whose bytes are damaged raises: a CRC32C mismatch (zarr-python: ValueError "Stored and computed
# checksum do not match"; zarrs: RuntimeError "the checksum is invalid"), or Zstandard finding the compressed data
# corrupt (zarrs: OSError "Data corruption detected", no errno).
CORRUPT_CHUNK_MESSAGES = ("checksum", "data corruption detected")


def as_os_error(error: BaseException) -> OSError | None:
    """`error` as an OSError: itself, or zarrs's RuntimeError "... (os error N)" as OSError(N, strerror(N));
    None for anything else."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError):
        found = _ZARRS_OS_ERROR.search(str(error))
        if found is not None:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
    return None


def _os_error_in(error: BaseException) -> OSError | None:
    """`as_os_error` of `error` itself or of the first of its causes that is one (libraries re-raise I/O errors
    wrapped)."""
    seen = set()
    while error is not None and id(error) not in seen:
        found = as_os_error(error)
        if found is not None:
            return found
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def is_corrupt_chunk_error(error: BaseException) -> bool:
    """Whether `error` is a chunk that does not decode because its stored bytes are damaged (a failed CRC32C
    checksum, corrupt compressed data), as zarr-python or zarrs raise it. Rewriting the shard is the fix; retrying
    the read is not."""
    if not isinstance(error, (ValueError, RuntimeError, OSError)):
        return False
    if isinstance(error, OSError) and error.errno is not None:  # a real I/O failure, whatever its message
        return False
    message = str(error).lower()
    return any(text in message for text in CORRUPT_CHUNK_MESSAGES)


def explain_storage_error(error: BaseException, url: str) -> AttentionStoreError | None:
    """A `StoreFullError` or `StoreNotWritableError` for `error` (or its cause), with a message naming `url`,
    what failed and what to do; None when `error` is neither."""
    found = _os_error_in(error)
    if found is None or found.errno is None:
        return None
    what = f"{found.strerror or found}" + (f": {found.filename}" if found.filename else "")
    if found.errno in NO_SPACE_ERRNOS:
        return StoreFullError(
            f"no space left while writing {url} ({what}): free space on that disk (or raise the quota or the "
            "file size limit), then run the same command again. Shards already completed are kept; the shard "
            "being written was not marked done and will be written again"
        )
    if found.errno in NOT_WRITABLE_ERRNOS:
        return StoreNotWritableError(
            f"cannot write to {url} ({what}): choose a store location this user may write to, or fix the "
            "permissions of that folder. Nothing already stored was changed"
        )
    return None


@contextlib.contextmanager
def storage_errors_explained(url: str) -> Iterator[None]:
    """Re-raise "no space" and "not writable" OSErrors of the block (also zarrs's, `as_os_error`) as
    `StoreFullError` / `StoreNotWritableError` (chained to the original); any other exception passes unchanged."""
    try:
        yield
    except Exception as error:  # an OSError, or zarrs's RuntimeError carrying one (as_os_error)
        explained = explain_storage_error(error, url)
        if explained is None:
            raise
        raise explained from error


def is_transient_io_error(error: BaseException) -> bool:
    """Whether retrying the I/O that raised `error` may succeed: an OSError (EIO, a connection reset, a timeout;
    also zarrs's "(os error N)") that is not a missing or existing path, a permission problem, a lack of space or a
    damaged chunk. Other errors are not."""
    found = as_os_error(error)
    if found is None or is_corrupt_chunk_error(error):
        return False
    permanent = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    if isinstance(found, permanent):
        return False
    return found.errno not in NO_SPACE_ERRNOS | NOT_WRITABLE_ERRNOS | NOT_FOUND_ERRNOS


def retry_transient_io(
    function: Callable[..., Result],
    *args,
    delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    **kwargs,
) -> Result:
    """`function(*args, **kwargs)`, called again after `delays[i]` seconds when attempt i failed with a transient
    I/O error (`is_transient_io_error`). Any other error, or a transient one after the last delay, is raised at
    once. `on_retry(attempt, error, delay)` is told about every retry (for logging)."""
    for attempt, delay in enumerate([*delays, None]):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if delay is None or not is_transient_io_error(error):
                raise
            if on_retry is not None:
                on_retry(attempt, error, delay)
            sleep(delay)
    raise AssertionError("unreachable")
