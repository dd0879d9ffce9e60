"""analysis/model_sources.py: where a model's files are, found without importing torch or transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.model_sources import BUNDLED_MODELS, resolve_model_source

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_models_and_model_folders_resolve(tmp_path):
    folder, extra = resolve_model_source("minilm")
    assert (Path(folder) / "config.json").is_file() and extra == {}
    folder, extra = resolve_model_source("smollm2")
    assert (Path(folder) / extra["gguf_file"]).is_file()
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), {})
    assert sorted(BUNDLED_MODELS) == ["minilm", "smollm2"]


def test_anything_else_is_refused_saying_what_to_pass(tmp_path):
    with pytest.raises(ValueError) as refused:
        resolve_model_source("nosuch")
    assert str(refused.value) == (
        "unknown model 'nosuch': use one of ['minilm', 'smollm2'] or the path of a local "
        "Hugging Face model folder (nothing is downloaded)"
    )
    with pytest.raises(ValueError, match="is not a Hugging Face model folder \\(it has no config.json\\)"):
        resolve_model_source(str(tmp_path))


def test_resolving_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from analysis.model_sources import resolve_model_source; resolve_model_source('minilm'); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert printed == "[]"
