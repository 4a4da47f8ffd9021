"""Shared fixtures: a tiny digits dataset and deterministic CPU seeds."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The digits data generator lives with the demo in experiments/ (not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'experiments'))

from digits_coco import make_digits_coco  # noqa: E402


@pytest.fixture(scope='session')
def digits_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny digits COCO dataset (8 train and 4 val images, 128x128)."""
    root = tmp_path_factory.mktemp('digits_coco')
    make_digits_coco(root, num_train=8, num_val=4, image_size=128, seed=0)
    return root


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed Python, numpy and torch before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=['host', 'device'])
def record_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a CPU test twice: as the CPU runs it (reading ring values on the host, free there)
    and as on a GPU (no host reads: the device-generic writes and sums)."""
    if request.param == 'device':
        import mmdet_cbn.functional
        monkeypatch.setattr(mmdet_cbn.functional, '_on_host', lambda t: False)
    return request.param
