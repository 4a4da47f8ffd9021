"""Narrow fixes for the pinned stack (torch 2.13, mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0).

:func:`apply` is called when ``mmdet_cbn`` is imported and is idempotent. Every fix
it makes is listed here, with the reason; nothing in site-packages is edited.

1. Local checkpoints load with ``weights_only=False``.
   torch >= 2.6 makes ``torch.load`` default to ``weights_only=True``. mmengine
   0.10.7 (the newest release) loads local files with a plain
   ``torch.load(filename, map_location=...)``, and the checkpoints its Runner
   saves hold ``message_hub`` objects and numpy arrays, so ``resume=True``,
   ``load_from``, ``mmengine.runner.load_checkpoint`` and mmdet's
   ``tools/test.py CHECKPOINT`` fail with ``UnpicklingError``. The fix
   re-registers the loader of local paths (the ``''`` prefix) through mmengine's
   public extension point ``CheckpointLoader.register_scheme(..., force=True)``
   with a loader that passes ``weights_only=False``. Only local files, which are
   the user's own checkpoints, are affected; URL schemes keep torch's default.

2. Distributed training on CPU-only torch (what ``tools/dist_train.sh CONFIG 2`` runs on a
   machine without GPUs). mmengine's ``init_dist`` calls ``torch.cuda.set_device`` first, and
   its default DDP wrapper passes ``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU
   modules. :func:`setup_cpu_distributed` starts the gloo process group itself (the Runner then
   skips ``init_dist``) and sets ``model_wrapper_cfg`` without ``device_ids``. With CUDA it
   does nothing. :func:`teardown_distributed` leaves the process group at the end of
   ``tools/train.py`` and ``tools/test.py``, as PyTorch asks of distributed scripts (mmengine
   never does): left to interpreter shutdown, gloo's threads once aborted a finished rank
   with "terminate called without an active exception".
"""

from __future__ import annotations

import os.path as osp

import torch
import torch.distributed as dist
from mmengine.runner import CheckpointLoader


def load_from_local(filename: str, map_location=None) -> dict:
    """Load a local checkpoint, unpickling the Runner's non-tensor state.

    Same contract as mmengine's ``load_from_local`` (the ``''`` scheme), plus
    ``weights_only=False``. The name matters: mmengine logs the scheme as the
    loader's name without its ``load_from_`` prefix.

    Args:
        filename: Local checkpoint path (``~`` is expanded).
        map_location: Same as :func:`torch.load`.

    Returns:
        The loaded checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


def apply() -> None:
    """Apply every fix listed in the module docstring (idempotent)."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def setup_cpu_distributed(cfg) -> None:
    """Prepare a ``pytorch``-launcher run on a machine without CUDA (fix 2 above).

    Called by ``tools/train.py`` and ``tools/test.py`` after the config is loaded.
    """
    if cfg.get('launcher') != 'pytorch' or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group('gloo')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)


def teardown_distributed() -> None:
    """Destroy the default process group, if one is up (the end of a train or test run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
