"""tasks/dask_cluster.py: the scheduler timeout and the message when no scheduler answers."""

from __future__ import annotations

import pytest

from tasks import dask_cluster
from tasks.dask_cluster import DaskSchedulerUnreachableError, connect_dask_scheduler, dask_timeout_seconds
from tests.test_preflight import free_loopback_address


def test_dask_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, raising=False)
    assert dask_timeout_seconds() == 10.0
    monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, "2.5")
    assert dask_timeout_seconds() == 2.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, bad)
        with pytest.raises(ValueError) as raised:
            dask_timeout_seconds()
        assert str(raised.value) == (
            f"EFFATTN_DASK_TIMEOUT={bad!r}: give the seconds to wait for a Dask scheduler, e.g. EFFATTN_DASK_TIMEOUT=30"
        )


def test_no_scheduler_at_the_address_is_refused_within_the_timeout(monkeypatch):
    address = free_loopback_address()
    monkeypatch.setenv(dask_cluster.DASK_TIMEOUT_ENV_VAR, "1")
    with pytest.raises(DaskSchedulerUnreachableError) as raised:
        connect_dask_scheduler(address)
    message = str(raised.value)  # "after 1 s": the timeout reached distributed (its default is 30 s)
    assert message.startswith(f"no Dask scheduler answers at {address} (waited 1 s; OSError: Timed out trying to "
                              f"connect to {address} after 1 s): start one there")
    assert message.endswith(
        f"correct --dask-address, or leave it out to run on a local cluster; set EFFATTN_DASK_TIMEOUT=SECONDS to wait "
        "longer"
    )
