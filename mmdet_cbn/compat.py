"""Narrow fixes for the pinned stack (torch 2.13, mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0).

Importing ``mmdet_cbn`` applies none of them: each holds only where it is asked for.
``tools/train.py`` and ``tools/test.py`` run mmdet's own scripts through
:func:`run_mmdet_tool`, which applies all of them. Nothing in site-packages is edited.

1. Runner checkpoints load with torch's safe loader. torch >= 2.6 loads with
   ``weights_only=True``; mmengine 0.10.7 (the newest release) calls a plain
   ``torch.load``, and its Runner checkpoints hold objects that loader refuses, so
   ``resume``, ``load_from`` and ``tools/test.py CHECKPOINT`` fail with ``UnpicklingError``.
   :func:`runner_checkpoint_globals` allows, for the duration of a ``with`` block, exactly
   what they hold (:func:`runner_checkpoint_allowlist`); any other global in a file is
   still refused.

2. Distributed runs on a CPU-only torch (what ``tools/dist_train.sh CONFIG 2`` runs on a
   machine without GPUs). mmengine's ``init_dist`` calls ``torch.cuda.set_device`` first,
   and its default DDP wrapper passes ``device_ids=[LOCAL_RANK]``, which DDP rejects for
   CPU modules. :func:`setup_cpu_distributed` starts the gloo process group itself (the
   Runner then skips ``init_dist``) and sets mmengine's default wrapper without
   ``device_ids``. With CUDA it does nothing. :func:`end_distributed_process` leaves the
   process group together at the end of a run, as PyTorch asks of distributed scripts
   (mmengine never does), and ends the process without the interpreter's teardown, where
   gloo's threads abort a finished rank now and then ("terminate called without an active
   exception").
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import HistoryBuffer

from .hooks import check_sync_bn

_REFUSED_NOTE = (
    'mmdet_cbn.compat.runner_checkpoint_globals() lets torch load with weights_only=True '
    'what mmengine Runner checkpoints hold, and nothing else. Load only checkpoints you '
    'trust. For a trusted file that holds other types, allow them too (wrap the run in '
    '`with torch.serialization.safe_globals([...]):`), or set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 '
    '(unpickles anything: the file can then run code).')


def _history_buffer_statistic(owner: Any, name: str) -> Any:
    """``getattr`` as Runner checkpoints use it: a ``HistoryBuffer`` statistics method only.

    A ``HistoryBuffer`` pickles its statistics methods (``HistoryBuffer.mean`` ...) as
    ``getattr(HistoryBuffer, 'mean')``; a general ``getattr`` would reach any attribute.
    """
    if owner is not HistoryBuffer or name not in ('min', 'max', 'current', 'mean'):
        raise pickle.UnpicklingError(
            f'refusing getattr({owner!r}, {name!r}): only the statistics methods of '
            'mmengine.logging.HistoryBuffer are allowed')
    return getattr(HistoryBuffer, name)


def runner_checkpoint_allowlist() -> list[Any]:
    """The globals of mmengine Runner checkpoints, for :func:`torch.serialization.safe_globals`.

    Beyond torch's defaults (tensors, ``OrderedDict``, ``Counter`` of the step schedulers) a
    checkpoint holds the message hub's ``HistoryBuffer`` objects with their statistics methods
    and numpy arrays, and numpy scalars in its runtime information. numpy's pickle functions
    are allowed under both module names (``numpy.core`` up to numpy 1.x, ``numpy._core``
    since 2.0), and numeric dtypes only: an object dtype is still refused.
    """
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    codes = '?' + np.typecodes['AllInteger'] + np.typecodes['AllFloat']
    dtypes = sorted({type(np.dtype(code)) for code in codes}, key=str)
    return [
        HistoryBuffer, (_history_buffer_statistic, 'builtins.getattr'),
        np.ndarray, np.dtype, *dtypes,
        *((func, f'{module}.{func.__name__}') for func in (reconstruct, scalar)
          for module in ('numpy.core.multiarray', 'numpy._core.multiarray')),
    ]


@contextlib.contextmanager
def runner_checkpoint_globals() -> Iterator[None]:
    """Let ``torch.load`` read mmengine Runner checkpoints safely inside a ``with`` block.

    Use it around ``runner.train()`` / ``runner.test()`` in your own scripts on torch >= 2.6
    with mmengine 0.10.7. An ``UnpicklingError`` raised in the block gets a note naming the
    ways out. On torch < 2.5 (``weights_only=False`` by default) it does nothing.
    """
    if not hasattr(torch.serialization, 'safe_globals'):
        yield
        return
    with torch.serialization.safe_globals(runner_checkpoint_allowlist()):
        try:
            yield
        except pickle.UnpicklingError as err:
            err.add_note(_REFUSED_NOTE)
            raise


def setup_cpu_distributed(cfg: Config) -> None:
    """Prepare a ``pytorch``-launcher run on a machine without CUDA (fix 2 above).

    Starts the gloo process group and, unless the config has its own ``model_wrapper_cfg``,
    sets mmengine's default DDP wrapper (``Runner.wrap_model``) without ``device_ids``.
    """
    if cfg.get('launcher') != 'pytorch' or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group('gloo')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def teardown_distributed() -> bool:
    """Leave the default process group together (a barrier, then destroy), if one is up;
    return whether one was."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def end_distributed_process() -> None:
    """:func:`teardown_distributed`, then, if the process was distributed, end it without the
    interpreter's teardown: there gloo's threads abort a finished rank now and then
    ("terminate called without an active exception", SIGABRT), after all its work is done."""
    if teardown_distributed():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_mmdet_tool(name: str) -> None:
    """Run mmdet's own ``tools/<name>.py`` on ``sys.argv`` with the fixes above.

    A distributed training config with CBN and ``sync_bn`` is refused first
    (:func:`mmdet_cbn.hooks.check_sync_bn`).

    mmdet's wheel ships its tools under ``mmdet/.mim/tools``. For a ``pytorch``-launcher
    run without CUDA the wrapper settings of :func:`setup_cpu_distributed` reach mmdet's
    script as ``--cfg-options``.
    """
    import mmdet

    path = Path(mmdet.__file__).parent / '.mim' / 'tools' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'mmdet_tools_{name}', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args()
    if args.launcher != 'none':
        cfg = Config.fromfile(args.config)
        cfg.merge_from_dict(args.cfg_options or {})
        own_wrapper = cfg.get('model_wrapper_cfg') is not None
        cfg.launcher = args.launcher
        if name == 'train':
            check_sync_bn(cfg)
        if args.launcher == 'pytorch' and not torch.cuda.is_available():
            setup_cpu_distributed(cfg)
            if not own_wrapper:
                sys.argv += ['--cfg-options', *(f'model_wrapper_cfg.{key}={value}'
                                                for key, value in cfg.model_wrapper_cfg.items())]
    with runner_checkpoint_globals():
        tool.main()
    end_distributed_process()
