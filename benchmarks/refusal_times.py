"""How long `effattn` takes to refuse bad input, this tree against an earlier commit, side by side in one run.

Each case is a real `effattn` command line in a fresh interpreter with its own empty Prefect home and no Prefect
server configured (inputs: the tiny random BERT of tests/conftest and its 10 reviews, stores built without Prefect).
For each case and each tree: the wall time, the exit status, the number of stderr lines and the longest one's
length, whether a traceback was printed, and whether the temporary Prefect server was started (its database appears
in the Prefect home). A run that does not end within `--limit` seconds (default 120) is killed and shown as -9.

    .venv/bin/python benchmarks/refusal_times.py [--before 90e9b18] [--cases unknown-variant,locked ...]

`--before` is any git revision of this repository: its tree is exported (`git archive`) to a temporary folder and
run with this virtualenv. `--before none` times this tree only.
"""

from __future__ import annotations

import argparse
import io
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads on a shared machine
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.silent_server import silent_server  # noqa: E402

# The commit before the pre-flight moved these refusals ahead of Prefect (issue 26).
DEFAULT_BEFORE = "90e9b18"
AWS = {
    "AWS_ACCESS_KEY_ID": "x",
    "AWS_SECRET_ACCESS_KEY": "y",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def build_inputs(folder: Path) -> dict[str, str]:
    """The tiny model, corpora and stores the cases use (paths by name)."""
    from storage_schemas.attention_store import open_attention_store, unmark_shards
    from tests.conftest import save_model_folder, tiny_bert, write_reviews_csv
    from tests.store_builders import build_real_store

    model = str(save_model_folder(tiny_bert(), folder / "tiny-bert"))
    reviews = write_reviews_csv(folder / "reviews.csv")
    other = folder / "other.csv"
    other.write_text(reviews.read_text().replace("film", "movie"))
    (folder / "nul.csv").write_bytes(b"\0" * 16384)
    done = build_real_store(str(folder / "done.zarr"), Path(model), reviews, variants=("effective",))
    extracted = build_real_store(str(folder / "extracted.zarr"), Path(model), reviews, variants=())
    unfinished = build_real_store(str(folder / "unfinished.zarr"), Path(model), reviews, variants=())
    unmark_shards(open_attention_store(unfinished, mode="r+"), [1])
    shutil.copytree(extracted, folder / "read-only.zarr")
    shutil.copytree(extracted, folder / "locked.zarr")
    return {
        "model": model,
        "reviews": str(reviews),
        "other": str(other),
        "nul": str(folder / "nul.csv"),
        "done": done,
        "extracted": extracted,
        "unfinished": unfinished,
        "read_only": str(folder / "read-only.zarr"),
        "locked": str(folder / "locked.zarr"),
    }


def cases(paths: dict[str, str], work: Path, silent_port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (effattn arguments, extra environment)."""
    p, results, new = paths, str(work / "r.zarr"), str(work / "new.zarr")
    silent = f"http://127.0.0.1:{silent_port}"
    extract = ["extract", "--corpus", p["reviews"], "--model", p["model"]]
    return {
        "unknown-variant": (["efficient", "--store", p["extracted"], "--variants", "nosuch"], {}),
        "unknown-intervention": (
            ["causal", "--store", p["done"], "--results", results, "--interventions", "nosuch"],
            {},
        ),
        "causal-unfinished": (["causal", "--store", p["unfinished"], "--results", results], {}),
        "explain-unfinished": (["explain", "--store", p["unfinished"], "--results", results], {}),
        "causal-before-efficient": (["causal", "--store", p["extracted"], "--results", results], {}),
        "second-corpus": (["extract", "--corpus", p["other"], "--model", p["model"], "--store", p["done"]], {}),
        "other-settings": ([*extract, "--store", p["done"], "--max-length", "32"], {}),
        "max-length-1": ([*extract, "--store", new, "--max-length", "1"], {}),
        "read-only-efficient": (["efficient", "--store", p["read_only"], "--variants", "effective"], {}),
        "locked": (["efficient", "--store", p["locked"], "--variants", "effective"], {}),
        "serve-silent-server": (
            ["serve", "--interval", "60", "--corpus", p["reviews"], "--model", p["model"]],
            {"PREFECT_API_URL": f"{silent}/api"},
        ),
        "unknown-model": (["extract", "--corpus", p["reviews"], "--model", "nosuch", "--store", new], {}),
        "nul-csv": (["extract", "--corpus", p["nul"], "--model", p["model"], "--store", new], {}),
        "verify-s3-unreachable": (
            ["verify", "s3://nonexistent-bucket/x.zarr"],
            {**AWS, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
        ),
        "verify-s3-silent": (["verify", "s3://bucket/x.zarr"], {**AWS, "AWS_ENDPOINT_URL": silent}),
        "verify-unfinished": (["verify", p["unfinished"]], {}),
    }


def read_only_wrapper(store: str) -> list[str]:
    """A command prefix that runs the command with `store` read-only: as root (whom permissions do not stop), in a
    private mount namespace where the store is bind-mounted read-only."""
    if os.geteuid() != 0:
        return []
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        f'mount --bind "{store}" "{store}" && mount -o remount,ro,bind "{store}" "{store}" && exec "$@"',
        "sh",
    ]


def run_case(
    tree: Path, arguments: list[str], extra: dict[str, str], work: Path, prefix: list[str], limit: float = 120.0
) -> dict:
    """One command line on the source tree `tree` (its outcome: seconds, status, lines, traceback, prefect,
    message); killed after `limit` seconds (status -9)."""
    home = Path(tempfile.mkdtemp(prefix="prefect-home-", dir=work))
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "AWS_", "FSSPEC_"))
    }
    environment.update(
        PREFECT_HOME=str(home),
        PYTHONPATH=str(tree),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    started = time.perf_counter()
    try:
        finished = subprocess.run(
            [*prefix, sys.executable, "-c", code, *arguments],
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:  # a hang (killed): no status
        return {
            "seconds": time.perf_counter() - started,
            "status": -9,
            "lines": 0,
            "width": 0,
            "traceback": False,
            "prefect": any(home.iterdir()),
            "message": f"no answer within {limit:g} s: killed",
        }
    seconds = time.perf_counter() - started
    lines = finished.stderr.splitlines()
    return {
        "seconds": seconds,
        "status": finished.returncode,
        "lines": len(lines),
        "width": max((len(line) for line in lines), default=0),
        "traceback": "Traceback" in finished.stderr,
        "prefect": any(home.iterdir()),
        "message": next(
            (line for line in lines if line.startswith("effattn ")),
            (lines or finished.stdout.strip().splitlines() or [""])[-1],
        )[:200],
    }


def export_tree(revision: str, folder: Path) -> Path:
    """The files of `revision` (git archive) in `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    folder.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare with, or 'none'")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument(
        "--messages", action="store_true", help="print each run's `effattn ...` line (else its last line)"
    )
    parser.add_argument("--limit", type=float, default=120.0, help="seconds before a run is killed as hung")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="effattn-refusals-") as temporary, silent_server() as port:
        base = Path(temporary)
        paths = build_inputs(base / "inputs")
        trees = {"after": ROOT}
        if options.before != "none":
            trees = {"before": export_tree(options.before, base / "before"), **trees}
        # a live writer holds the lock of `locked` for the whole benchmark
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from storage_schemas.store_lock import hold_store_lock\n"
                "with hold_store_lock(sys.argv[1], 'efficient'):\n    print('held', flush=True); time.sleep(3600)",
                paths["locked"],
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        holder.stdout.readline()
        try:
            chosen = cases(paths, base, port)
            names = [name.strip() for name in options.cases.split(",") if name.strip()] or list(chosen)
            print(f"{'case':24s}" + "".join(f" | {tree:>6s} s  st  ln  width tb pf" for tree in trees))
            for name in names:
                arguments, extra = chosen[name]
                prefix = read_only_wrapper(paths["read_only"]) if name == "read-only-efficient" else []
                row, messages = f"{name:24s}", []
                for tree_name, tree in trees.items():
                    work = base / f"work-{tree_name}-{name}"
                    work.mkdir()
                    outcome = run_case(tree, arguments, extra, work, prefix, options.limit)
                    row += (
                        f" | {outcome['seconds']:8.1f}  {outcome['status']:2d} {outcome['lines']:3d} "
                        f"{outcome['width']:6d} {'y' if outcome['traceback'] else 'n'}  "
                        f"{'y' if outcome['prefect'] else 'n'}"
                    )
                    messages.append(f"    {tree_name}: {outcome['message']}")
                if len(trees) == 2:
                    before, after = (float(part.split()[0]) for part in row.split(" | ")[1:])
                    row += f" | {before / after:5.1f}x"
                print(row, flush=True)
                if options.messages:
                    print("\n".join(messages), flush=True)
        finally:
            holder.kill()
            holder.wait()
    print(
        "st: exit status (-9: killed after --limit s); ln: stderr lines; width: the longest stderr line's "
        "characters; tb: a traceback printed; pf: the temporary Prefect server started"
    )


if __name__ == "__main__":
    main()
