"""storage_schemas.storage_faults: which storage errors are retried, the messages of the others (as zarr-python and
zarrs raise them), damaged chunks, durable and rewritable shard writes, and the efficient stage's selective retries
(its per-shard function, without Dask)."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest

import tasks.efficient
from storage_schemas.attention_store import AttentionStoreError, open_attention_store, store_layout
from storage_schemas.durable_writes import discard_shard_files, shard_file_paths
from storage_schemas.efficient_store import write_efficient_shard
from storage_schemas.storage_faults import (
    StoreFullError,
    StoreNotWritableError,
    as_os_error,
    explain_storage_error,
    is_corrupt_chunk_error,
    is_transient_io_error,
    retry_transient_io,
    storage_errors_explained,
)
from tasks.efficient import compute_efficient_piece, compute_efficient_shard
from tests.store_builders import SETTINGS, build_real_store, write_corpus


def full_message(url: str, what: str) -> str:
    return (
        f"no space left while writing {url} ({what}): free space on that disk (or raise the quota or the file size "
        "limit), then run the same command again. Shards already completed are kept; the shard being written was "
        "not marked done and will be written again"
    )


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_space_is_a_store_full_error_saying_what_to_do(code):
    error = OSError(code, os.strerror(code), "/data/store.zarr/attention/c/3/0/0/0/0")
    explained = explain_storage_error(error, "/data/store.zarr")
    assert isinstance(explained, StoreFullError) and isinstance(explained, AttentionStoreError)
    assert str(explained) == full_message(
        "/data/store.zarr", f"{os.strerror(code)}: /data/store.zarr/attention/c/3/0/0/0/0"
    )


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied", "/ro/store.zarr"),
        OSError(errno.EROFS, "Read-only file system", "/ro/store.zarr"),
    ],
)
def test_not_writable_is_a_store_not_writable_error(error):
    explained = explain_storage_error(error, "/ro/store.zarr")
    assert isinstance(explained, StoreNotWritableError)
    assert str(explained) == (
        f"cannot write to /ro/store.zarr ({error.strerror}: /ro/store.zarr): choose a store location this user may "
        "write to, or fix the permissions of that folder. Nothing already stored was changed"
    )


# What zarrs (Rust) raises for these failures: a RuntimeError carrying the OS error's text and number.
@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("File too large (os error 27)"), StoreFullError),
        (RuntimeError("No space left on device (os error 28)"), StoreFullError),
        (RuntimeError("Disk quota exceeded (os error 122)"), StoreFullError),
        (RuntimeError("Permission denied (os error 13)"), StoreNotWritableError),
        (RuntimeError("Read-only file system (os error 30)"), StoreNotWritableError),
    ],
)
def test_zarrs_os_errors_are_explained_by_their_number(error, expected):
    explained = explain_storage_error(error, "/data/store.zarr")
    assert type(explained) is expected
    number = int(str(error).rsplit("os error ", 1)[1].rstrip(")"))
    assert f"({os.strerror(number)})" in str(explained)
    with pytest.raises(expected) as raised, storage_errors_explained("/data/store.zarr"):
        raise error
    assert raised.value.__cause__ is error
    assert as_os_error(error).errno == number


def test_a_runtime_error_without_an_os_error_number_is_not_an_os_error():
    for error in (
        RuntimeError("the checksum is invalid"),
        RuntimeError("os error 28 happened elsewhere"),
        RuntimeError("Non-native byte order not supported"),
    ):
        assert as_os_error(error) is None and explain_storage_error(error, "s") is None
        with pytest.raises(RuntimeError), storage_errors_explained("s"):
            raise error


@pytest.mark.parametrize(
    "error, corrupt",
    [
        (ValueError("Stored and computed checksum do not match. Stored: b'1234'. Computed: b'5678'."), True),  # zarr
        (RuntimeError("the checksum is invalid"), True),  # zarrs, a CRC32C mismatch
        (OSError("Data corruption detected"), True),  # zarrs, Zstandard finding corrupt data
        (OSError(errno.EIO, "Input/output error: checksum of the block"), False),  # a real I/O error, by number
        (RuntimeError("Input/output error (os error 5)"), False),
        (ValueError("shard 1: 'value' has shape (3,), expected (4,)"), False),
        (KeyError("checksum"), False),
    ],
)
def test_damaged_chunks_are_recognised_as_either_pipeline_raises_them(error, corrupt):
    assert is_corrupt_chunk_error(error) is corrupt
    if corrupt:
        assert not is_transient_io_error(error)  # re-reading damaged bytes gives the same damage


def test_a_wrapped_cause_is_found_and_other_errors_pass_unchanged():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("the codec pipeline failed") from inner
    except RuntimeError as outer:
        assert isinstance(explain_storage_error(outer, "s"), StoreFullError)
    assert explain_storage_error(OSError(errno.EIO, "Input/output error"), "s") is None
    assert explain_storage_error(ValueError("bad shape"), "s") is None
    with pytest.raises(OSError, match="Input/output error"), storage_errors_explained("s"):
        raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(StoreFullError) as raised, storage_errors_explained("s"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(raised.value.__cause__, OSError)


@pytest.mark.parametrize(
    "error, transient",
    [
        (OSError(errno.EIO, "Input/output error"), True),
        (RuntimeError("Input/output error (os error 5)"), True),  # zarrs
        (RuntimeError("Connection reset by peer (os error 104)"), True),
        (RuntimeError("No space left on device (os error 28)"), False),
        (RuntimeError("Permission denied (os error 13)"), False),
        (RuntimeError("No such file or directory (os error 2)"), False),
        (RuntimeError("the checksum is invalid"), False),
        (OSError("a flaky object store"), True),
        (ConnectionResetError("connection reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EFBIG, "File too large"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (PermissionError("Permission denied"), False),
        (FileNotFoundError("no such file"), False),
        (StoreFullError("no space left while writing ..."), False),
        (ValueError("shard 1: 'value' has shape ..."), False),
        (KeyError("attention"), False),
    ],
)
def test_only_transient_io_errors_are_retried(error, transient):
    assert is_transient_io_error(error) is transient


class Flaky:
    """Fails with `error` the first `failures` calls, then returns "done"."""

    def __init__(self, failures: int, error: BaseException):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_retry_backs_off_on_transient_errors_and_gives_up_after_the_last_delay():
    slept = []
    flaky = Flaky(2, OSError(errno.EIO, "Input/output error"))
    assert retry_transient_io(flaky, delays=(0.5, 2.0, 8.0), sleep=slept.append) == "done"
    assert flaky.calls == 3 and slept == [0.5, 2.0]

    slept.clear()
    always = Flaky(10, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        retry_transient_io(always, delays=(0.5, 2.0), sleep=slept.append)
    assert always.calls == 3 and slept == [0.5, 2.0]


@pytest.mark.parametrize(
    "error",
    [ValueError("shard 1: 'value' has shape (3,), expected (4,)"), OSError(errno.ENOSPC, "No space left on device")],
)
def test_retry_raises_other_errors_at_once(error):
    slept = []
    flaky = Flaky(1, error)
    with pytest.raises(type(error)):
        retry_transient_io(flaky, delays=(0.5, 2.0), sleep=slept.append)
    assert flaky.calls == 1 and slept == []


# ------------------------------------------------------------------------------------------
# on a real store of the tiny BERT


@pytest.fixture(scope="module")
def extracted_store(tmp_path_factory, tiny_bert_folder) -> str:
    """The tiny BERT over the 10 reviews, shards of 4; no efficient attention yet."""
    folder = tmp_path_factory.mktemp("faults")
    return build_real_store(
        str(folder / "store.zarr"), tiny_bert_folder, write_corpus(folder / "reviews.csv"), variants=()
    )


@pytest.fixture()
def store_with_variant(extracted_store, tmp_path) -> str:
    import shutil

    url = str(tmp_path / "store.zarr")
    shutil.copytree(extracted_store, url)
    tasks.efficient.prepare_variants(url, ["effective"], SETTINGS)
    return url


def test_the_efficient_stage_retries_a_transient_write_error_and_succeeds(store_with_variant, monkeypatch):
    calls = []

    def flaky_write(*args):  # the real write, after two transient failures
        calls.append(args[3])
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return write_efficient_shard(*args)

    monkeypatch.setattr(tasks.efficient, "write_efficient_shard", flaky_write)
    assert compute_efficient_shard(store_with_variant, 1, ["effective"], SETTINGS, retry_delays=(0.01, 0.01, 0.01)) == (
        1,
        ["effective"],
    )
    assert calls == [1, 1, 1]  # two failures, then the write that succeeded
    group = open_attention_store(store_with_variant)
    region = store_layout(group).shard_slice(1)
    written = group["efficient/effective"][region]
    length = group["length"][region]
    for example, n in enumerate(length):  # the real block was written (rows of an effective matrix are not 0)
        assert np.abs(written[example, :, :, :n, :n]).sum(-1).all()


@pytest.mark.parametrize(
    "error",
    [
        ValueError("efficient/effective has shape (1,), expected (4, ...)"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_the_efficient_stage_does_not_retry_other_errors(store_with_variant, monkeypatch, error):
    flaky = Flaky(1, error)
    monkeypatch.setattr(tasks.efficient, "write_efficient_shard", flaky)
    with pytest.raises(type(error)):
        compute_efficient_shard(store_with_variant, 1, ["effective"], SETTINGS, retry_delays=(0.01, 0.01, 0.01))
    assert flaky.calls == 1


def test_nan_in_a_stored_tensor_is_refused_by_the_efficient_stage(store_with_variant):
    group = open_attention_store(store_with_variant, mode="r+")
    value = group["value"][4:8]
    value[1, 0, 2, 3, 5] = np.nan
    group["value"][4:8] = value
    message = (
        f"{store_with_variant}, shard 1 (examples 4 to 7): value holds 1 NaN or infinite values (the first at "
        "[example, layer, kv_head, position, head_dim] (1, 0, 2, 3, 5)): efficient attention needs finite inputs. "
        "The stored tensors are damaged or the model overflowed (e.g. float16 storage): `effattn verify STORE` names "
        "the damaged shards; extract them again"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        compute_efficient_shard(store_with_variant, 1, ["effective"], SETTINGS)
    # the stage on Dask computes one layer per task: the message names the layer
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{store_with_variant}, shard 1 (examples 4 to 7, layer 0; indices below count from example 4 and layer "
            "0): "
            "value holds 1 NaN or infinite values (the first at [example, layer, kv_head, position, head_dim] "
            "(1, 0, 2, 3, 5))"
        ),
    ):
        compute_efficient_piece(store_with_variant, 1, (0, 1), ["effective"], SETTINGS)
    assert (
        compute_efficient_piece(store_with_variant, 1, (1, 2), ["effective"], SETTINGS)["effective"].efficient.shape[1]
        == 1
    )  # the other layer is fine


def test_a_damaged_unfinished_shard_is_rewritten_and_its_files_are_synced(store_with_variant):
    """Zarr merges a shard write into the file on disk; a damaged leftover must not block the rewrite."""
    group = open_attention_store(store_with_variant, mode="r+")
    compute_efficient_shard(store_with_variant, 0, ["effective"], SETTINGS)
    before = group["efficient/effective"][0:4]
    (path,) = shard_file_paths(group, ["efficient/effective"], 0)
    size = path.stat().st_size
    with path.open("r+b") as handle:  # garble the shard index at the end of the file
        handle.seek(size - 12)
        handle.write(b"\xff" * 8)
    with pytest.raises(Exception, match="checksum") as raised:
        group["efficient/effective"][0:4]
    assert is_corrupt_chunk_error(raised.value)
    compute_efficient_shard(store_with_variant, 0, ["effective"], SETTINGS)  # not marked done: rewritten whole
    np.testing.assert_array_equal(open_attention_store(store_with_variant)["efficient/effective"][0:4], before)


def test_discard_removes_exactly_that_shards_files(store_with_variant):
    group = open_attention_store(store_with_variant, mode="r+")
    names = ["attention", "value", "logits"]
    assert len(shard_file_paths(group, names, 1)) == 3 and len(shard_file_paths(group, names, 2)) == 3
    discard_shard_files(group, names, 1)
    assert shard_file_paths(group, names, 1) == []
    assert len(shard_file_paths(group, names, 2)) == 3


def test_the_extraction_shards_retry_only_transient_errors_with_back_off():
    from prefect.states import Failed

    from tasks.extraction import EXTRACT_STAGE
    from tasks.stages import RETRY_POLICY, retry_on_io_error

    assert retry_on_io_error(None, None, Failed(data=OSError(errno.EIO, "Input/output error"))) is True
    assert retry_on_io_error(None, None, Failed(data=OSError(errno.ENOSPC, "No space left on device"))) is False
    assert retry_on_io_error(None, None, Failed(data=StoreFullError("no space left while writing ..."))) is False
    assert retry_on_io_error(None, None, Failed(data=ValueError("shard 1: 'value' has shape ..."))) is False
    assert EXTRACT_STAGE.retry is RETRY_POLICY and RETRY_POLICY.delays == (0.5, 2.0, 8.0)
    assert RETRY_POLICY.retries(OSError(errno.EIO, "Input/output error"))
    assert not RETRY_POLICY.retries(OSError(errno.ENOSPC, "No space left on device"))
