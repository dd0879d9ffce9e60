"""The public API (effattn.py): every name is its home module's object, importing it is light and changes no
process-wide setting, and the README's Python session runs as written."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import effattn

ROOT = Path(__file__).parent.parent


def test_every_name_is_the_object_of_its_home_module():
    homes = {
        "open_store": ("storage_schemas.attention_store", "open_attention_store"),
        "efficient_attention": ("analysis.efficient_attention", "efficient_attention"),
        "VARIANTS": ("analysis.variants", "VARIANTS"),
        "Variant": ("analysis.variants", "Variant"),
        "variant_record": ("analysis.variants", "variant_record"),
        "register_variant": ("analysis.variants", "register_variant"),
        "Explainer": ("analysis.explainers", "Explainer"),
        "explainer_record": ("analysis.explainers", "explainer_record"),
        "register_explainer": ("analysis.explainers", "register_explainer"),
        "Intervention": ("analysis.interventions", "Intervention"),
        "intervention_matrices": ("analysis.interventions", "intervention_matrices"),
        "verify_store": ("storage_schemas.verification", "verify_store"),
        "extract": ("flows.extract", "extract"),
        "efficient": ("flows.efficient", "efficient"),
        "causal": ("flows.causal", "causal"),
        "explain": ("flows.explain", "explain"),
        "report": ("flows.report", "report"),
        "run_pipeline": ("flows.pipeline", "run_pipeline"),
        "ExtractSettings": ("flows.settings", "ExtractSettings"),
        "EfficientSettings": ("flows.settings", "EfficientSettings"),
        "CausalSettings": ("flows.settings", "CausalSettings"),
        "ExplainSettings": ("flows.settings", "ExplainSettings"),
        "ReportSettings": ("flows.settings", "ReportSettings"),
        "PipelineSettings": ("flows.settings", "PipelineSettings"),
        "use_fast_codec_pipeline": ("storage_schemas.attention_store", "use_fast_codec_pipeline"),
    }
    assert sorted(effattn.__all__) == sorted(homes)
    for name, (module, attribute) in homes.items():
        assert getattr(effattn, name) is getattr(importlib.import_module(module), attribute), name
    assert set(effattn.__all__) <= set(dir(effattn))
    from effattn import Intervention, efficient_attention  # noqa: F401 - `from effattn import ...` works too

    with pytest.raises(AttributeError, match="no attribute 'open_attention_store'; its API: open_store"):
        effattn.open_attention_store  # noqa: B018


def test_importing_effattn_loads_neither_torch_nor_prefect_and_leaves_zarr_alone():
    code = (
        "import sys, effattn, zarr; "
        "print(sorted(m for m in ('torch', 'prefect', 'transformers') if m in sys.modules), "
        "zarr.config.get('codec_pipeline.batch_size'), zarr.config.get('codec_pipeline.path'))"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("ZARR_CODEC_PIPELINE__")}
    printed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=environment
    ).stdout.strip()
    assert printed == "[] 1 zarr.core.codec_pipeline.BatchedCodecPipeline"


def readme_python_session() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python: `import effattn`\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no section '## Python: `import effattn`'"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1
    return blocks[0]


def run_readme_session(folder: Path, stdin: bool) -> subprocess.CompletedProcess:
    """The README's block saved as `example.py` in the empty `folder` and run there as a user would: `python
    example.py`, or `python - < example.py` (a fresh Prefect home: its own temporary server)."""
    session = readme_python_session()
    assert "import effattn" in session and "effattn.efficient_attention(" in session
    script = folder / "example.py"
    script.write_text(session, encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    environment.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(folder / "prefect-home"))
    with script.open(encoding="utf-8") as handle:
        return subprocess.run(
            [sys.executable, "-"] if stdin else [sys.executable, "example.py"],
            stdin=handle if stdin else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=folder,
            env=environment,
            timeout=900,
        )


def check_readme_session(completed: subprocess.CompletedProcess, folder: Path) -> None:
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[:3] == [
        "effective E can be negative and its rows need not sum to 1; null dimension 8",  # 12 tokens - rank 4
        "stochastic rows sum to 1 but can be negative; null dimension 7",  # 12 - rank([T|1]) 5
        "simplex rows are probability distributions; null dimension 7",
    ]
    assert lines[-1] == "(2, 6, 12, 24, 24)"
    assert (folder / "runs" / "notebook.zarr" / "efficient" / "stochastic").is_dir()


@pytest.mark.integration
def test_the_readme_python_session_runs_as_a_script(tmp_path):
    """Saved as example.py and run with `python example.py`: the efficient stage's Dask workers import the script
    again, and its `if __name__ == "__main__":` keeps them from running the session a second time."""
    check_readme_session(run_readme_session(tmp_path, stdin=False), tmp_path)


@pytest.mark.integration
def test_the_readme_python_session_runs_from_standard_input(tmp_path):
    """`python - < example.py`: the main module's `__file__` is `<stdin>`, which the workers cannot import again
    (tasks.dask_cluster.main_script_hidden_from_workers)."""
    check_readme_session(run_readme_session(tmp_path, stdin=True), tmp_path)
