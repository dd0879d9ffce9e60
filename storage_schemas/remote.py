"""Stores at fsspec URLs (`s3://bucket/path.zarr`, ...): telling an unreachable or forbidden store from a missing one.

Where a remote store's endpoint and credentials come from: not from this project, but from the usual places that
fsspec and the filesystem's own library read in every process, Dask workers included. For S3 (s3fs, aiobotocore,
botocore): the environment variables `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` (or `~/.aws/config` and `~/.aws/credentials`), and fsspec's own configuration: the environment
variable `FSSPEC_S3` holding a JSON object of `s3fs.S3FileSystem` options (e.g. `{"endpoint_url": "http://...",
"key": "...", "secret": "..."}`), variables `FSSPEC_S3_<OPTION>`, or a JSON file in `~/.config/fsspec/`.
"""

from __future__ import annotations

import os
import threading

import fsspec

_REMOTE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "google", "azure")

STORAGE_CONFIGURATION_HINT = (
    "for S3, set AWS_ENDPOINT_URL (an S3-compatible server), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
    "AWS_DEFAULT_REGION, or put s3fs options in FSSPEC_S3 as a JSON object, "
    'e.g. FSSPEC_S3=\'{"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."}\''
)


def is_remote(url: str) -> bool:
    """Whether `url` names a store on another filesystem than the local disk (s3://, gs://, memory://, ...)."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol not in (None, "file", "local")


def is_storage_access_error(error: BaseException) -> bool:
    """Whether `error` says the storage could not be reached or refused access (as opposed to "nothing there").

    PermissionError, connection errors and timeouts, and the exceptions of the object stores' client libraries
    (botocore, aiohttp, ...) that their fsspec filesystems pass through untranslated.
    """
    if isinstance(error, FileNotFoundError):
        return False
    if isinstance(error, (PermissionError, ConnectionError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in _REMOTE_LIBRARIES for cls in type(error).__mro__)


def storage_access_problem(url: str, error: BaseException) -> str | None:
    """A message saying what went wrong reaching `url` and what to do, or None if `error` is no access error."""
    if not is_storage_access_error(error):
        return None
    what = f"{type(error).__name__}: {error}"
    if not is_remote(url):
        return f"cannot access {url} ({what}): check that this user may read and write there"
    return (
        f"cannot access {url} ({what}): check that the object store is running and reachable, and that its "
        f"endpoint and credentials are configured in this process's environment; {STORAGE_CONFIGURATION_HINT}"
    )


# How long one request to an object store may wait for the connection and for an answer (seconds): without a limit,
# an endpoint that accepts the connection and never answers hangs a command for ever.
STORAGE_TIMEOUT_ENV_VAR = "EFFATTN_STORAGE_TIMEOUT"
DEFAULT_STORAGE_TIMEOUT_SECONDS = 10.0


class StoreUnreachableError(ValueError):
    """A remote store's object store cannot be reached, does not answer in time, or refuses access: not a missing
    store and not a damaged one."""


def seconds_from_environment(variable: str, default: float, what: str) -> float:
    """A positive number of seconds from the environment variable `variable` (`default` when unset); any other value
    is refused naming the variable and `what` the seconds are for."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{variable}={text!r}: give the seconds {what}, e.g. {variable}=30")
    return seconds


def storage_timeout_seconds() -> float:
    """Seconds one object-store request may wait: $EFFATTN_STORAGE_TIMEOUT, default 10."""
    return seconds_from_environment(
        STORAGE_TIMEOUT_ENV_VAR, DEFAULT_STORAGE_TIMEOUT_SECONDS, "an object-store request may wait"
    )


def apply_storage_time_limits() -> None:
    """Give S3 requests of this process a connect and a read time limit of `storage_timeout_seconds()` (and two
    attempts), as fsspec defaults: options the user set (FSSPEC_S3's `config_kwargs`, or given to a call) win."""
    seconds = storage_timeout_seconds()
    defaults = fsspec.config.conf.setdefault("s3", {})
    config = dict(defaults.get("config_kwargs") or {})
    config.setdefault("connect_timeout", seconds)
    config.setdefault("read_timeout", seconds)
    config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    defaults["config_kwargs"] = config


def check_store_reachable(url: str, storage_options: dict | None = None) -> None:
    """Refuse (`StoreUnreachableError`, one line naming the URL) a remote store whose object store does not answer
    within `storage_timeout_seconds()` or refuses access. Local paths and a store that is simply absent pass (the
    caller says what is missing). The probe runs in a daemon thread, so that a silent endpoint cannot hold the
    caller past the limit."""
    if not is_remote(url):
        return
    seconds = storage_timeout_seconds()
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            filesystem, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            filesystem.exists(path.rstrip("/") + "/zarr.json")
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(error)

    thread = threading.Thread(target=probe, name="effattn-store-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise StoreUnreachableError(
            f"cannot reach {url}: its object store did not answer within {seconds:g} s (set "
            f"{STORAGE_TIMEOUT_ENV_VAR}=SECONDS to wait longer): check that the object store is running and "
            f"reachable; {STORAGE_CONFIGURATION_HINT}"
        )
    error = outcome[0]
    if error is None or isinstance(error, FileNotFoundError):
        return
    problem = storage_access_problem(url, error)
    if problem is None:
        raise error
    raise StoreUnreachableError(problem) from None
