"""SyncCBN in mmengine runs: 2 CPU processes through tools/dist_train.sh (gloo), then resumed.

The model is the repository's Mask R-CNN config with SyncCBN in the FPN neck and the box and
mask heads (``configs/cbn/mask-rcnn_r50_fpn_4conv1fc-synccbn-head_1x_coco.py``), shrunk by
``cpu_smoke_cfg``: 96x96 digits, 1 image per process (the regime SyncCBN is for), 32 RoIs per
image. One epoch is 4 iterations per rank: 1 of burn-in (window 1), then 3 with window 4, so
the history holds 2 committed records and the last iteration's one. Each rank trains on its
own images, so a per-rank CBN would end with different histories (tests/test_distributed.py);
SyncCBN must end with one history and one set of running statistics on every rank, bit for
bit, and validate (``CocoMetric``, bbox and segm). Its checkpoint is then resumed for a second
epoch with 2 processes (``tools/dist_train.sh``) and with 1 (in this process, 2 images per
batch, where SyncCBN is CBN): the loaded history is the checkpoint's, not emptied, and training
goes on with it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import sync_runner_probe  # noqa: F401  (registers the probe hook for the in-process run)
from mmdet_cbn.compat import runner_checkpoint_globals
from smoke import cpu_smoke_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs/cbn/mask-rcnn_r50_fpn_4conv1fc-synccbn-head_1x_coco.py'
SYNC_CLASS = 'SyncCrossIterationBatchNorm2d'
LAYERS = 16  # FPN: 4 lateral + 4 output convs; box head: 4 shared convs; mask head: 4 convs
ITERS = 4  # per epoch and rank: 8 train images / (2 ranks x 1 image)
HISTORY_FIELDS = ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var', 'cursor')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def sync_cfg(data_root: Path, work_dir: Path) -> Config:
    """The SyncCBN Mask R-CNN config, small enough for a few CPU seconds per iteration."""
    cfg = cpu_smoke_cfg(Config.fromfile(CONFIG), data_root, work_dir, img_scale=(96, 96),
                        max_iters_or_epochs=1, with_mask=True, batch_size=1)
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    cfg.model.train_cfg.rcnn.sampler.num = 32
    cfg.model.test_cfg.rpn.update(nms_pre=100, max_per_img=20)
    cfg.model.test_cfg.rcnn.max_per_img = 5
    cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1),
                        dict(type='SyncCBNStateProbe')]
    cfg.custom_imports = dict(imports=['mmdet_cbn', 'sync_runner_probe'],
                              allow_failed_imports=False)
    return cfg


def resume_cfg(cfg: Config, checkpoint: Path, work_dir: Path) -> Config:
    """``cfg`` resumed from ``checkpoint`` for one more epoch, without validation."""
    cfg = copy.deepcopy(cfg)
    cfg.update(resume=True, load_from=str(checkpoint), work_dir=str(work_dir),
               val_cfg=None, val_dataloader=None, val_evaluator=None)
    cfg.train_cfg.max_epochs = 2
    return cfg


def dist_train(cfg: Config, nproc: int) -> None:
    """``tools/dist_train.sh`` on ``cfg`` with ``nproc`` CPU processes."""
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = work_dir.parent / f'{work_dir.name}_cfg.py'
    cfg.dump(str(cfg_file))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]),
               PORT=str(free_port()), OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), str(cfg_file), str(nproc)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def load_states(work_dir: Path, when: str, ranks: int = 2) -> list[dict]:
    return [torch.load(work_dir / f'{when}_rank{r}.pt') for r in range(ranks)]


def assert_same_state(a: dict, b: dict) -> None:
    """Two ranks' (or a rank's and a checkpoint's) SyncCBN states are equal, bit for bit,
    history included (the ranks combine the same gathered and all-reduced numbers)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]['steps'] == b[name]['steps'], name
        assert a[name]['history'] is not None and b[name]['history'] is not None, name
        pairs = [(f, a[name]['history'][f], b[name]['history'][f]) for f in HISTORY_FIELDS]
        pairs += [(k, a[name][k], b[name][k])
                  for k in ('running_mean', 'running_var', 'num_batches_tracked')]
        for field, x, y in pairs:
            torch.testing.assert_close(x, y, rtol=0, atol=0,
                                       msg=lambda m, n=f'{name} {field}': f'{n}: {m}')


def checkpoint_state(checkpoint: Path, names) -> dict:
    """The SyncCBN state saved in the model's state dict of a Runner checkpoint."""
    weights = torch.load(checkpoint, weights_only=False)['state_dict']
    return {name: dict(
        steps=int(weights[f'{name}.cbn_steps']),
        history={f: weights[f'{name}.cbn_history.0.{f}'] for f in HISTORY_FIELDS},
        **{key: weights[f'{name}.{key}']
           for key in ('running_mean', 'running_var', 'num_batches_tracked')})
        for name in names}


def cursor(state: dict) -> list[int]:
    """``[free, filled, written]`` of every layer's history (all layers alike)."""
    cursors = {tuple(s['history']['cursor'].tolist()) for s in state.values()}
    assert len(cursors) == 1, cursors
    return list(cursors.pop())


@pytest.fixture(scope='module')
def trained(digits_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """One epoch on 2 processes with validation; the config and the work dir."""
    work_dir = tmp_path_factory.mktemp('sync_cbn_run') / 'train'
    cfg = sync_cfg(digits_coco, work_dir)
    dist_train(cfg, 2)
    return cfg, work_dir


def test_two_processes_train_evaluate_and_hold_one_synccbn_state(trained) -> None:
    _, work_dir = trained
    ranks = load_states(work_dir, 'trained')
    assert len(ranks[0]) == LAYERS
    assert {s['type'] for r in ranks for s in r.values()} == {SYNC_CLASS}
    for state in ranks:
        assert {s['steps'] for s in state.values()} == {ITERS}
        # burn-in, then 3 iterations with window 4: 2 records in the window, the last written
        assert cursor(state)[1:] == [2, 1]
    # every rank normalized with the pooled statistics: one history, one running average
    assert_same_state(ranks[0], ranks[1])
    # the statistics re-estimated for validation and the checkpoint agree too (pooled)
    assert_same_state(*load_states(work_dir, 'end'))

    metrics = [json.loads((work_dir / f'metrics_rank{r}.json').read_text()) for r in (0, 1)]
    assert metrics[0] == metrics[1]
    for kind in ('bbox', 'segm'):
        assert math.isfinite(metrics[0][f'coco/{kind}_mAP'])

    # one copy of the SyncCBN state, in the model's state dict: none per rank
    checkpoint = torch.load(work_dir / 'epoch_1.pth', weights_only=False)
    per_rank = checkpoint.get('cbn_rank_states') or []
    assert not any(per_rank_state for per_rank_state in per_rank)
    assert_same_state(checkpoint_state(work_dir / 'epoch_1.pth', ranks[0]),
                      load_states(work_dir, 'end')[0])


def test_resumed_with_two_processes_keeps_the_synccbn_history(trained, tmp_path: Path) -> None:
    cfg, work_dir = trained
    saved = checkpoint_state(work_dir / 'epoch_1.pth', load_states(work_dir, 'end')[0])
    dist_train(resume_cfg(cfg, work_dir / 'epoch_1.pth', tmp_path / 'resumed2'), 2)
    start = load_states(tmp_path / 'resumed2', 'start')
    for state in start:  # loaded, not emptied
        assert_same_state(state, saved)
    ranks = load_states(tmp_path / 'resumed2', 'trained')
    assert {s['steps'] for s in ranks[0].values()} == {2 * ITERS}
    assert cursor(ranks[0])[1:] == [3, 1]  # the window full
    assert_same_state(ranks[0], ranks[1])


def test_resumed_with_one_process_keeps_the_synccbn_history(trained, tmp_path: Path) -> None:
    cfg, work_dir = trained
    saved = checkpoint_state(work_dir / 'epoch_1.pth', load_states(work_dir, 'end')[0])
    cfg = resume_cfg(cfg, work_dir / 'epoch_1.pth', tmp_path / 'resumed1')
    cfg.train_dataloader.batch_size = 2  # the 2 ranks' images of an iteration in one batch
    cfg.experiment_name = 'sync_cbn_resumed1'
    runner = Runner.from_cfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads spin against the other jobs of a 2-core machine
    try:
        with runner_checkpoint_globals():
            runner.train()
    finally:
        torch.set_num_threads(threads)
    (start,) = load_states(tmp_path / 'resumed1', 'start', ranks=1)
    assert_same_state(start, saved)  # the 2-rank history, loaded into one process
    (state,) = load_states(tmp_path / 'resumed1', 'trained', ranks=1)
    assert {s['type'] for s in state.values()} == {SYNC_CLASS}
    assert {s['steps'] for s in state.values()} == {2 * ITERS}
    assert cursor(state)[1:] == [3, 1]
    log = next((tmp_path / 'resumed1').rglob('*.log')).read_text()
    assert 'CBN windows start empty' not in log
