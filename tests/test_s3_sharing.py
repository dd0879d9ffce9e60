"""Stores on S3: `effattn extract`, `efficient` and `inspect` against a real S3-compatible server on loopback.

moto's S3 server runs as a subprocess on a free loopback port (stopped by its process id). The CLI runs as
subprocesses configured the usual way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION; or fsspec's FSSPEC_S3). A collaborator's view is a separate Python process that imports only
xarray, zarr, s3fs and numpy and opens the store with `xarray.open_zarr(url, consolidated=False,
storage_options=...)`; what it reads is compared with the same extraction written to a local folder.

The CLI calls each start a temporary Prefect server (~10-15 s): the module runs three of them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import s3fs
import zarr

from analysis.efficient_attention import VARIANTS, efficient_attention
from storage_schemas.attention_store import attention_store_state, open_attention_store, read_texts
from storage_schemas.efficient_store import DIAGNOSTIC_ARRAYS
from storage_schemas.inspection import size_on_disk
from storage_schemas.portability import portability_problems
from storage_schemas.remote import is_storage_access_error, storage_access_problem
from tests.conftest import write_reviews_csv

REPOSITORY = Path(__file__).resolve().parents[1]
KEY, SECRET, REGION = "effattn-test-key", "effattn-test-secret", "us-east-1"
BUCKET = "effattn-sharing"
STORE = f"s3://{BUCKET}/reviews-tiny-bert.zarr"
# 9 of the 10 review rows, shards of 4 (the last holds 1), truncated to 16 tokens (longer than head dim 8).
EXTRACT_OPTIONS = ["--limit", "9", "--shard-size", "4", "--batch-size", "3", "--max-length", "16", "--no-train"]
ARRAYS = (
    "tokens",
    "length",
    "untruncated_length",
    "source_index",
    "label",
    "text_bytes",
    "text_offsets",
    "logits",
    "attention",
    "value",
    "w_out",
    "out_bias",
)


def storage_options(endpoint: str) -> dict:
    """s3fs options for the test's S3 server (what a collaborator passes to xarray.open_zarr)."""
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "client_kwargs": {"region_name": REGION}}


def base_environment(tmp: Path) -> dict[str, str]:
    """This environment without any S3/fsspec configuration, and with no AWS files or instance metadata to read."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "FSSPEC_", "PREFECT_API_"))
    }
    environment.update(
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # the temporary Prefect server of each CLI call may start slowly on a busy machine (default: 20 s)
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return environment


def aws_environment(tmp: Path, endpoint: str) -> dict[str, str]:
    """The usual AWS variables, pointing at `endpoint`."""
    return {
        **base_environment(tmp),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
    }


def effattn(arguments: list[str], environment: dict[str, str], prefect_home: Path | None = None) -> subprocess.Popen:
    """Start `effattn ARGUMENTS` (the CLI module of this checkout) as a subprocess."""
    environment = dict(environment)
    if prefect_home is not None:
        prefect_home.mkdir(parents=True, exist_ok=True)
        environment["PREFECT_HOME"] = str(prefect_home)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *arguments],
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 500) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def run_ok(process: subprocess.Popen) -> str:
    code, out, err = finish(process)
    assert code == 0, f"{process.args} exited {code}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}"
    return out


# ------------------------------------------------------------------------------------------
# fixtures: the S3 server, and the stores written once for the module


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> str:
    """moto's S3 server on a free loopback port (port 0: the server picks one and logs it), with one bucket."""
    folder = tmp_path_factory.mktemp("moto")
    log_path = folder / "moto.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_environment(folder),
    )
    try:
        endpoint = None
        deadline = time.monotonic() + 60
        while endpoint is None:
            assert process.poll() is None, f"moto server exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"moto server did not start: {log_path.read_text()}"
            found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            endpoint = found.group(1) if found else None
            time.sleep(0.2)
        while True:  # listening: answers an S3 ListBuckets
            try:
                with urllib.request.urlopen(endpoint, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, f"moto server does not answer: {log_path.read_text()}"
                time.sleep(0.2)
        import boto3  # installed with moto

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        process.terminate()  # SIGTERM to the server's process id
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def stores(s3_endpoint, tiny_bert_folder, tmp_path_factory) -> dict:
    """The same extraction into s3:// and into a local folder, then `effattn efficient` on s3."""
    tmp = tmp_path_factory.mktemp("s3-sharing")
    corpus = write_reviews_csv(tmp / "reviews.csv")
    local = str(tmp / "local.zarr")
    environment = aws_environment(tmp, s3_endpoint)
    common = ["extract", "--corpus", str(corpus), "--model", str(tiny_bert_folder), *EXTRACT_OPTIONS]
    extract_output = run_ok(effattn([*common, "--store", STORE], environment, tmp / "prefect"))
    run_ok(effattn([*common, "--store", local], base_environment(tmp), tmp / "prefect"))
    efficient_output = run_ok(effattn(["efficient", "--store", STORE, "--workers", "1"], environment, tmp / "prefect"))
    return {"local": local, "tmp": tmp, "extract_output": extract_output, "efficient_output": efficient_output}


# ------------------------------------------------------------------------------------------
# a collaborator reads the store with plain xarray


READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import xarray as xr
    url, options, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    root = xr.open_zarr(url, consolidated=False, storage_options=options)
    efficient = xr.open_zarr(url, group="efficient", consolidated=False, storage_options=options)
    simplex = xr.open_zarr(url, group="diagnostics/simplex", consolidated=False, storage_options=options)
    arrays = {name: root[name].values for name in root.data_vars}
    data, offsets = arrays["text_bytes"].tobytes(), arrays["text_offsets"]
    arrays["text"] = np.array([data[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)])
    arrays.update({"efficient__" + name: efficient[name].values for name in efficient.data_vars})
    arrays.update({"simplex__" + name: simplex[name].values for name in simplex.data_vars})
    np.savez(out, **arrays)
    project = sorted(m for m in sys.modules if m.split(".")[0] in ("analysis", "storage_schemas", "tasks", "flows"))
    print(json.dumps({
        "project_modules": project, "s3fs_loaded": "s3fs" in sys.modules,
        "dims": {name: list(root[name].dims) for name in root.data_vars},
        "efficient_dims": {name: list(efficient[name].dims) for name in efficient.data_vars},
        "schema": root.attrs["schema"], "completed_shards": root.attrs["completed_shards"],
        "efficient_completed": {name: efficient[name].attrs["completed_shards"] for name in efficient.data_vars},
    }))
    """
)


@pytest.fixture(scope="module")
def collaborator_view(stores, s3_endpoint) -> tuple[dict, dict[str, np.ndarray]]:
    """What a separate process without this project reads from the s3 store: (facts, arrays)."""
    out = stores["tmp"] / "read.npz"
    environment = base_environment(stores["tmp"])  # no AWS variables: the options are passed explicitly
    result = subprocess.run(
        [sys.executable, "-c", READER, STORE, json.dumps(storage_options(s3_endpoint)), str(out)],
        cwd=stores["tmp"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    with np.load(out, allow_pickle=False) as read:
        arrays = {name: read[name] for name in read.files}
    return json.loads(result.stdout), arrays


def test_a_plain_xarray_reader_sees_the_same_extraction_as_the_local_store(stores, collaborator_view):
    facts, read = collaborator_view
    assert facts["project_modules"] == [] and facts["s3fs_loaded"]
    assert facts["schema"] == "effattn.attention_store"
    assert facts["completed_shards"] == [0, 1, 2]
    assert facts["dims"]["attention"] == ["example", "layer", "head", "query", "key"]
    assert facts["dims"]["value"] == ["example", "layer", "kv_head", "position", "head_dim"]
    assert facts["dims"]["text_bytes"] == ["text_byte"] and facts["dims"]["text_offsets"] == ["example_boundary"]

    local = zarr.open_group(stores["local"], mode="r")
    assert set(ARRAYS) <= set(read)
    for name in ("tokens", "length", "untruncated_length", "source_index", "label"):
        np.testing.assert_array_equal(read[name], local[name][:], err_msg=name)
    assert read["text"].tolist() == read_texts(local)
    assert len(set(read["text"].tolist())) == 9
    for name in ("logits", "attention", "value", "w_out", "out_bias"):
        assert read[name].dtype == np.float32 and read[name].shape == local[name].shape, name
        np.testing.assert_allclose(read[name], local[name][:], rtol=0, atol=1e-6, err_msg=name)
    # Not trivially equal: real attention rows of the first example sum to one.
    n = int(read["length"][0])
    np.testing.assert_allclose(read["attention"][0, :, :, :n, :n].sum(-1), 1.0, atol=1e-5)


def test_the_efficient_stage_wrote_to_s3_what_recomputing_from_the_local_store_gives(stores, collaborator_view):
    facts, read = collaborator_view
    assert facts["efficient_completed"] == {variant: [0, 1, 2] for variant in VARIANTS}
    assert facts["efficient_dims"] == {variant: ["example", "layer", "head", "query", "key"] for variant in VARIANTS}
    local = open_attention_store(stores["local"])
    expected = efficient_attention(
        local["attention"][:], local["value"][:], local["w_out"][:], local["length"][:], causal=False, variants=VARIANTS
    )
    for variant in VARIANTS:
        np.testing.assert_allclose(
            read[f"efficient__{variant}"], expected[variant].efficient, rtol=0, atol=1e-5, err_msg=variant
        )
    for name in DIAGNOSTIC_ARRAYS:
        assert f"simplex__{name}" in read, name
    np.testing.assert_array_equal(read["simplex__rank"], expected["simplex"].diagnostics["rank"])
    np.testing.assert_array_equal(read["simplex__null_dim"], expected["simplex"].diagnostics["null_dim"])
    assert read["simplex__null_dim"].max() > 0  # sequences longer than the head dim: something was removed
    assert read["simplex__converged"].dtype == bool


def test_s3_arrays_use_zarr_s_pipeline_where_zarrs_cannot_open_the_store(stores, s3_endpoint):
    """zarrs opens no fsspec S3 store: zarr falls back to its own pipeline for those arrays, silently and in
    batches, while local arrays of the same process go through zarrs (the CLI runs above did the same)."""
    from zarr.core.codec_pipeline import BatchedCodecPipeline

    from storage_schemas.attention_store import CHUNK_CODEC_BATCH_SIZE, FAST_CODEC_PIPELINE
    from storage_schemas.zarrs_pipeline import ChecksumValidatingZarrsPipeline

    assert zarr.config.get("codec_pipeline.path") == FAST_CODEC_PIPELINE  # as the entry points set it (conftest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remote = open_attention_store(STORE, storage_options=storage_options(s3_endpoint))
        pipeline = remote["attention"]._async_array.codec_pipeline
        assert type(pipeline) is BatchedCodecPipeline and pipeline.batch_size == CHUNK_CODEC_BATCH_SIZE
        local = open_attention_store(stores["local"])
        assert type(local["attention"]._async_array.codec_pipeline) is ChecksumValidatingZarrsPipeline
        for name in ("attention", "value"):
            np.testing.assert_allclose(remote[name][:], local[name][:], rtol=0, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(remote[name][4:6, 1], local[name][4:6, 1], rtol=0, atol=1e-6, err_msg=name)


def test_everything_written_to_s3_is_portable(stores, s3_endpoint):
    assert portability_problems(STORE, storage_options(s3_endpoint)) == []


def test_extract_and_efficient_print_the_remote_store(stores):
    assert stores["extract_output"].splitlines()[0] == f"attention store {STORE}"
    assert "  shards: 3 of 3 completed (4 examples each)" in stores["extract_output"].splitlines()
    efficient_lines = stores["efficient_output"].splitlines()
    for variant in VARIANTS:
        assert any(re.match(rf"^    {variant} +3 of 3 shards completed", line) for line in efficient_lines), variant


def test_inspect_a_remote_store_configured_through_fsspec(stores, s3_endpoint):
    """No AWS variables at all: the s3fs options come from fsspec's FSSPEC_S3 (a JSON object)."""
    environment = {**base_environment(stores["tmp"]), "FSSPEC_S3": json.dumps(storage_options(s3_endpoint))}
    lines = run_ok(effattn(["inspect", STORE], environment)).splitlines()
    assert lines[0] == f"attention store {STORE}"
    assert "  schema: effattn.attention_store v3" in lines[1]
    assert "  shards: 3 of 3 completed (4 examples each)" in lines
    assert any(line.startswith("    simplex     3 of 3 shards completed") for line in lines)
    size = s3fs.S3FileSystem(**storage_options(s3_endpoint), skip_instance_cache=True).du(STORE, total=True)
    match = next(re.match(r"^  size on disk: ([\d.]+) KiB ", line) for line in lines if "size on disk" in line)
    assert match and float(match.group(1)) == pytest.approx(size / 1024, abs=0.05)


def test_size_on_disk_of_a_remote_prefix_follows_new_objects(s3_endpoint):
    options = storage_options(s3_endpoint)
    url = f"s3://{BUCKET}/scratch-size"
    writer = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    writer.pipe(f"{BUCKET}/scratch-size/a/blob", b"x" * 1000)
    # The filesystem instance size_on_disk gets (fsspec caches instances by options) has listed the prefix, as
    # the extraction's store checks do: s3fs keeps such listings.
    reader, path = fsspec.core.url_to_fs(url, **options)
    assert reader.ls(path) == [f"{BUCKET}/scratch-size/a"] and reader.ls(f"{path}/a") == [f"{path}/a/blob"]
    assert size_on_disk(url, options) == 1000
    writer.pipe(f"{BUCKET}/scratch-size/a/more", b"y" * 200)  # written by another client since
    writer.pipe(f"{BUCKET}/scratch-size/b/c/blob", b"z" * 34)
    assert size_on_disk(url, options) == 1234


def test_store_state_on_s3(s3_endpoint, stores):
    options = storage_options(s3_endpoint)
    assert attention_store_state(STORE, options) == "prepared"
    assert attention_store_state(f"s3://{BUCKET}/nothing-here.zarr", options) == "absent"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).pipe(f"{BUCKET}/someones-files/notes.txt", b"precious")
    assert attention_store_state(f"s3://{BUCKET}/someones-files", options) == "something else"


# ------------------------------------------------------------------------------------------
# an unreachable store is a clear error, not "nothing there" or "something else"


def _closed_loopback_endpoint() -> str:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_cli_names_an_unreachable_endpoint_and_what_to_configure(tmp_path):
    endpoint = _closed_loopback_endpoint()
    environment = {**aws_environment(tmp_path, endpoint), "AWS_MAX_ATTEMPTS": "1"}
    code, out, err = finish(effattn(["inspect", STORE], environment), timeout=120)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith(f"effattn inspect: error: cannot access {STORE} (EndpointConnectionError: ")
    assert f'Could not connect to the endpoint URL: "{endpoint}/' in lines[0]
    assert lines[0].endswith(
        "check that the object store is running and reachable, and that its endpoint and credentials are configured "
        "in this process's environment; for S3, set AWS_ENDPOINT_URL (an S3-compatible server), AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION, or put s3fs options in FSSPEC_S3 as a JSON object, "
        'e.g. FSSPEC_S3=\'{"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."}\''
    )


def test_an_unreachable_store_is_not_absent():
    """Extraction must not treat an unreachable store as "absent" (and create it) or as foreign (and refuse it)."""
    options = {**storage_options(_closed_loopback_endpoint()), "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(Exception) as caught:
        attention_store_state(STORE, options)
    assert is_storage_access_error(caught.value), repr(caught.value)


def test_storage_access_problem_tells_access_errors_from_missing_stores():
    assert storage_access_problem("s3://b/x.zarr", FileNotFoundError("b/x.zarr")) is None
    assert storage_access_problem("s3://b/x.zarr", ValueError("bad layout")) is None
    assert storage_access_problem("/data/x.zarr", PermissionError(13, "Permission denied")) == (
        "cannot access /data/x.zarr (PermissionError: [Errno 13] Permission denied): "
        "check that this user may read and write there"
    )
    remote = storage_access_problem("s3://b/x.zarr", PermissionError("Access Denied"))
    assert remote.startswith("cannot access s3://b/x.zarr (PermissionError: Access Denied): check that the object")
    from botocore.exceptions import NoCredentialsError

    assert storage_access_problem("s3://b/x.zarr", NoCredentialsError()).startswith(
        "cannot access s3://b/x.zarr (NoCredentialsError: Unable to locate credentials): "
    )


def test_view_serves_a_remote_store(stores, s3_endpoint):
    """`effattn view s3://...` (options from FSSPEC_S3) serves the same texts and matrices as the local extraction."""
    import signal
    import socket

    import httpx

    from analysis.view_html import decode_matrix
    from storage_schemas.attention_store import open_attention_store, read_texts

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**base_environment(stores["tmp"]), "FSSPEC_S3": json.dumps(storage_options(s3_endpoint))}
    process = effattn(["view", STORE, "--port", str(port)], environment)
    try:
        line = process.stdout.readline()
        assert line.strip() == f"serving {STORE} at http://127.0.0.1:{port}/ (Ctrl-C stops)", process.stderr.read()
        local = open_attention_store(stores["local"])
        table = httpx.get(f"http://127.0.0.1:{port}/examples", timeout=60)
        assert table.status_code == 200 and read_texts(local, [3])[0] in table.text
        page = httpx.get(f"http://127.0.0.1:{port}/example/5?layer=1&head=2", timeout=60).text
        n = int(local["length"][5])
        found = re.search(r'data-kind="attention"[^>]*data-matrix="([^"]+)"', page)
        np.testing.assert_array_equal(decode_matrix(found.group(1), n, n), local["attention"][5, 1, 2, :n, :n])
        assert 'data-variant="simplex"' in page  # the efficient stage ran on the s3 store
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 130


def test_verify_of_an_unreachable_store_is_one_line_not_damage(tmp_path):
    """Credentials set, no endpoint answering: an unreachable store (exit 2), not a damaged one (exit 1)."""
    endpoint = _closed_loopback_endpoint()
    code, out, err = finish(
        effattn(["verify", "s3://nonexistent-bucket/x.zarr"], aws_environment(tmp_path, endpoint)), timeout=120
    )
    assert (code, out) == (2, ""), err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(
        "effattn verify: error: cannot access s3://nonexistent-bucket/x.zarr (EndpointConnectionError: "
    )
    assert "DAMAGED" not in err


def test_verify_on_s3_reads_a_sound_store_and_says_when_there_is_none(stores, s3_endpoint, tmp_path):
    environment = aws_environment(tmp_path, s3_endpoint)
    code, out, err = finish(effattn(["verify", STORE], environment), timeout=300)
    assert code == 0, out + err
    assert out.splitlines()[0].startswith(f"{STORE}: OK: ")
    code, out, err = finish(effattn(["verify", f"s3://{BUCKET}/nothing-here.zarr"], environment), timeout=120)
    assert (code, out, err.splitlines()) == (
        2,
        "",
        [f"effattn verify: error: there is no store at s3://{BUCKET}/nothing-here.zarr: nothing to verify"],
    )


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_silent_endpoint_ends_in_one_line_after_the_time_limit(command, tmp_path):
    """An endpoint that accepts connections and never answers: one line naming the URL once
    $EFFATTN_STORAGE_TIMEOUT (here 2 s) has passed, instead of a hang."""
    from tests.silent_server import silent_server

    with silent_server() as port:
        environment = {**aws_environment(tmp_path, f"http://127.0.0.1:{port}"), "EFFATTN_STORAGE_TIMEOUT": "2"}
        code, out, err = finish(effattn([command, STORE], environment), timeout=120)
    assert (code, out) == (2, ""), err
    assert err.splitlines() == [
        f"effattn {command}: error: cannot reach {STORE}: its object store did not answer within 2 s (set "
        "EFFATTN_STORAGE_TIMEOUT=SECONDS to wait longer): check that the object store is running and reachable; for "
        "S3, set AWS_ENDPOINT_URL (an S3-compatible server), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
        "AWS_DEFAULT_REGION, or put s3fs options in FSSPEC_S3 as a JSON object, e.g. "
        'FSSPEC_S3=\'{"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."}\''
    ]


def test_the_storage_time_limit_reaches_s3_requests(monkeypatch):
    import fsspec.config

    from storage_schemas.remote import STORAGE_TIMEOUT_ENV_VAR, apply_storage_time_limits, storage_timeout_seconds

    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"config_kwargs": {"read_timeout": 60}}})
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV_VAR, "3")
    apply_storage_time_limits()
    assert fsspec.config.conf["s3"]["config_kwargs"] == {  # the user's read_timeout is kept
        "read_timeout": 60,
        "connect_timeout": 3.0,
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    filesystem = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    assert filesystem.config_kwargs["connect_timeout"] == 3.0
    monkeypatch.setenv(STORAGE_TIMEOUT_ENV_VAR, "soon")
    with pytest.raises(
        ValueError,
        match="^EFFATTN_STORAGE_TIMEOUT='soon': give the seconds an object-store request "
        "may wait, e.g. EFFATTN_STORAGE_TIMEOUT=30$",
    ):
        storage_timeout_seconds()
