"""Connecting to a Dask cluster: one place for the scheduler timeout and its message (the CLI's pre-flight and
every stage that runs on a cluster use it). No Prefect import here."""

from __future__ import annotations

import os

# How long to wait for a Dask scheduler to answer (seconds); distributed's own default is 30 s per attempt.
DASK_TIMEOUT_ENV_VAR = "EFFATTN_DASK_TIMEOUT"
DEFAULT_DASK_TIMEOUT_SECONDS = 10.0


class DaskSchedulerUnreachableError(ValueError):
    """No Dask scheduler answered at the address given (`--dask-address`) within the timeout."""


def dask_timeout_seconds() -> float:
    """Seconds to wait for a Dask scheduler: $EFFATTN_DASK_TIMEOUT, default 10."""
    text = os.environ.get(DASK_TIMEOUT_ENV_VAR)
    if text is None:
        return DEFAULT_DASK_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{DASK_TIMEOUT_ENV_VAR}={text!r}: give the seconds to wait for a Dask scheduler, e.g. "
                         f"{DASK_TIMEOUT_ENV_VAR}=30")
    return seconds


def connect_dask_scheduler(address: str, timeout: float | None = None):
    """A distributed Client connected to the scheduler at `address`, waiting at most `timeout` seconds (default
    `dask_timeout_seconds()`); DaskSchedulerUnreachableError when none answers. The caller closes the client."""
    from distributed import Client

    timeout = dask_timeout_seconds() if timeout is None else timeout
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise DaskSchedulerUnreachableError(
            f"no Dask scheduler answers at {address} (waited {timeout:g} s; {type(error).__name__}: {error}): start "
            f"one there (`dask scheduler`, then `dask worker {address}`), correct --dask-address, or leave it out to "
            f"run on a local cluster; set {DASK_TIMEOUT_ENV_VAR}=SECONDS to wait longer"
        ) from None
