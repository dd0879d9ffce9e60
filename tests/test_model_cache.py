"""tasks/models.py: a process loads a model once, and again when its folder's files changed (a worker kept across
runs never serves the old weights of a folder retrained in place)."""

from __future__ import annotations

import torch

from tasks.models import cached_model
from tests.conftest import save_model_folder, tiny_bert


def first_weight(loaded) -> torch.Tensor:
    return next(loaded.model.parameters()).detach().clone()


def test_a_model_is_loaded_once_and_again_when_its_folder_is_rewritten(tmp_path):
    folder = save_model_folder(tiny_bert(seed=0), tmp_path / "model")
    first = cached_model(str(folder), 2, "cpu", 0)
    assert cached_model(str(folder), 2, "cpu", 0) is first  # the same files: not loaded again
    save_model_folder(tiny_bert(seed=1), folder)  # retrained in place: other weights under the same path
    second = cached_model(str(folder), 2, "cpu", 0)
    assert second is not first
    assert not torch.equal(first_weight(second), first_weight(first))
    torch.testing.assert_close(first_weight(second), next(tiny_bert(seed=1).parameters()).detach())
