"""``tools/train.py``, ``tools/test.py`` and the ``dist_*.sh`` scripts run from the command line.

Each runs a config of ours (the CBN head row of Table 4), shrunk by ``cpu_smoke_cfg`` to a
few iterations on the digits dataset at 128 px and dumped to a file, in a subprocess on CPU.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from smoke import cpu_smoke_cfg

REPO = Path(__file__).parents[1]
CONFIG = REPO / 'configs' / 'cbn' / 'faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'


def small_config(digits_coco: Path, path: Path, *, train_images: int) -> Path:
    """Dump ``CONFIG`` shrunk to 1 epoch on ``train_images`` images and 2 val images.

    The CBN burn-in lasts one iteration, so the later iterations use window 4.
    """
    # The tools' --work-dir overrides the config's work_dir.
    cfg = cpu_smoke_cfg(Config.fromfile(CONFIG), digits_coco, path.parent / 'unused')
    cfg.train_dataloader.dataset.indices = train_images
    cfg.val_dataloader.dataset.indices = cfg.test_dataloader.dataset.indices = 2
    cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1)]
    cfg.model.train_cfg.rcnn.sampler.num = 64
    cfg.model.test_cfg.rpn.max_per_img = 100
    cfg.dump(path)
    return path


def run(*args: str | Path, succeeds: bool = True, **env: str) -> str:
    """Run a command in the repository root with extra environment variables ``env``.

    torch runs on one thread per process (torchrun's default for several processes): on a
    loaded 2-core machine more threads spin and wait on each other. Returns the output, and
    fails with it if the command does not succeed (or fail, with ``succeeds=False``).
    """
    proc = subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **env}, timeout=600)
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == succeeds, output[-5000:]
    return output


def free_port() -> str:
    """A free local TCP port for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope='module')
def trained(digits_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, checkpoint) of a 2-iteration ``tools/train.py`` run."""
    tmp = tmp_path_factory.mktemp('train')
    config = small_config(digits_coco, tmp / 'cbn_small.py', train_images=4)
    output = run(sys.executable, 'tools/train.py', config, '--work-dir', tmp / 'work')
    assert 'CBN window 4' in output
    checkpoint = tmp / 'work' / 'epoch_1.pth'
    assert checkpoint.is_file()
    return config, checkpoint


def test_train_writes_a_checkpoint_that_test_evaluates(trained: tuple[Path, Path],
                                                       tmp_path: Path):
    config, checkpoint = trained
    output = run(sys.executable, 'tools/test.py', config, checkpoint, '--work-dir', tmp_path)
    assert 'coco/bbox_mAP:' in output and 'coco/bbox_mAP_50:' in output


def test_train_resumes_from_a_checkpoint(trained: tuple[Path, Path], tmp_path: Path):
    config, checkpoint = trained
    output = run(sys.executable, 'tools/train.py', config, '--work-dir', tmp_path, '--resume',
                 checkpoint, '--cfg-options', 'train_cfg.max_epochs=2')
    assert 'resumed epoch: 1, iter: 2' in output
    assert (tmp_path / 'epoch_2.pth').is_file()


class _Payload:
    """Pickles as a call of ``print``: stands for any callable a malicious file could carry."""

    def __reduce__(self):
        return print, ('PAYLOAD RAN',)


def test_test_refuses_a_checkpoint_carrying_a_callable(trained: tuple[Path, Path],
                                                       tmp_path: Path):
    config, checkpoint = trained
    payload = torch.load(checkpoint, weights_only=False)
    payload['meta']['note'] = _Payload()
    torch.save(payload, tmp_path / 'payload.pth')
    output = run(sys.executable, 'tools/test.py', config, tmp_path / 'payload.pth',
                 '--work-dir', tmp_path, succeeds=False)
    assert 'PAYLOAD RAN' not in output
    assert 'UnpicklingError' in output and 'Unsupported global: GLOBAL print' in output
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' in output  # the note that names the ways out


def test_dist_train_and_test_run_two_cpu_processes(digits_coco: Path, tmp_path: Path):
    config = small_config(digits_coco, tmp_path / 'cbn_small.py', train_images=8)
    work_dir = tmp_path / 'work'
    output = run('bash', 'tools/dist_train.sh', config, '2', '--work-dir', work_dir,
                 PORT=free_port())
    # mmengine's environment report; torchrun exits with 0 only if both ranks did.
    assert 'Distributed launcher: pytorch' in output and 'GPU number: 2' in output
    assert 'CBN window 4' in output and 'coco/bbox_mAP:' in output
    checkpoint = work_dir / 'epoch_1.pth'
    assert checkpoint.is_file()
    # mmengine's default DDP wrapper, without the CUDA device_ids (compat.setup_cpu_distributed)
    assert Config.fromfile(work_dir / 'cbn_small.py').model_wrapper_cfg == dict(
        type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
        find_unused_parameters=False)
    output = run('bash', 'tools/dist_test.sh', config, checkpoint, '2', '--work-dir', work_dir,
                 PORT=free_port())
    assert 'GPU number: 2' in output and 'coco/bbox_mAP:' in output
