"""Stores at fsspec URLs (`s3://bucket/path.zarr`, ...): telling an unreachable or forbidden store from a missing one.

Where a remote store's endpoint and credentials come from: not from this project, but from the usual places that
fsspec and the filesystem's own library read in every process, Dask workers included. For S3 (s3fs, aiobotocore,
botocore): the environment variables `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` (or `~/.aws/config` and `~/.aws/credentials`), and fsspec's own configuration: the environment
variable `FSSPEC_S3` holding a JSON object of `s3fs.S3FileSystem` options (e.g. `{"endpoint_url": "http://...",
"key": "...", "secret": "..."}`), variables `FSSPEC_S3_<OPTION>`, or a JSON file in `~/.config/fsspec/`.
"""

from __future__ import annotations

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
