"""Two CPU processes through tools/dist_train.sh: per-rank CBN history, BN-like statistics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

from mmdet_cbn import cbn_layers
from mmdet_cbn.compat import runner_checkpoint_globals
from smoke import cpu_smoke_cfg
from test_reliability import make_runner

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'


def test_two_process_training_keeps_history_per_rank(digits_coco, tmp_path):
    cfg = cpu_smoke_cfg(Config.fromfile(CONFIG), digits_coco, tmp_path / 'work',
                        img_scale=(96, 96), max_iters_or_epochs=1)
    cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1),
                        dict(type='CBNStateProbe')]
    cfg.custom_imports = dict(imports=['mmdet_cbn', 'dist_probe'], allow_failed_imports=False)
    cfg.train_cfg.val_interval = 100  # training only: evaluation is tested elsewhere
    cfg_file = tmp_path / 'cfg.py'
    cfg.dump(str(cfg_file))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]),
               PORT='29531', OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', str(ROOT / 'tools/dist_train.sh'), str(cfg_file), '2'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / 'work' / f'cbn_rank{r}.pt') for r in (0, 1)]
    register_all_modules()
    model = MODELS.build(cfg.model)
    assert ranks[0].keys() == ranks[1].keys() == dict(cbn_layers(model)).keys()
    assert len(ranks[0]) == 12  # FPN: 4 lateral + 4 output convs; box head: 4 shared convs
    for name in ranks[0]:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0['steps'] == r1['steps'] == 2  # 8 images / (2 ranks x 2 per batch)
        # the window-4 step after burn-in left its record, to enter the next iteration's window
        free, filled, written = r0['cursor'].tolist()
        assert filled == 0 and written == 1 and r1['cursor'].tolist() == [free, 0, 1]
        # each rank normalized its own shard: its own history and running statistics
        assert not torch.allclose(r0['grad_var'][free], r1['grad_var'][free])
        assert not torch.allclose(r0['running_mean'], r1['running_mean'])

    # the rank-0 checkpoint loads into a single-process model of the same config
    with runner_checkpoint_globals():
        load_checkpoint(model, str(tmp_path / 'work' / 'epoch_1.pth'), strict=True)
    for name, layer in cbn_layers(model):
        restored = layer.histories[0].state()
        for field in ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var', 'cursor'):
            torch.testing.assert_close(restored[field], ranks[0][name][field])
        torch.testing.assert_close(layer.running_mean, ranks[0][name]['running_mean'])


def _torchrun(script: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(29600 + os.getpid() % 1000), str(script), *args],
                          cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_rank_resumes_its_own_cbn_state(tmp_path: Path) -> None:
    """2 gloo processes: after a resume the next losses equal the uninterrupted run's, per rank
    (each rank's CBN windows differ); in one process the 2-rank windows start empty."""
    probe = Path(__file__).parent / 'dist_resume_probe.py'
    _torchrun(probe, str(tmp_path / 'full'), '4')
    _torchrun(probe, str(tmp_path / 'cut'), '2')
    _torchrun(probe, str(tmp_path / 'cut'), '4', '--resume')
    for rank in (0, 1):
        full, resumed = (json.loads((tmp_path / run / f'losses_rank{rank}.json').read_text())
                         for run in ('full', 'cut'))
        assert sorted(resumed, key=int) == [str(i) for i in range(4, 8)]
        assert [resumed[str(i)] for i in range(4, 8)] == [full[str(i)] for i in range(4, 8)]
    checkpoint = torch.load(tmp_path / 'cut' / 'epoch_2.pth', weights_only=False)
    ranks = checkpoint['cbn_rank_states']
    assert len(ranks) == 2
    assert not torch.equal(ranks[0]['norm2']['cbn_history.0.grad_var'],
                           ranks[1]['norm2']['cbn_history.0.grad_var'])
    # one process resuming the 2-rank checkpoint: the CBN windows start empty, and it says so
    runner, _ = make_runner(tmp_path / 'single', max_epochs=3)
    with runner_checkpoint_globals():
        runner.load_checkpoint(str(tmp_path / 'cut' / 'epoch_2.pth'))
    assert all(layer.histories == [] for _, layer in cbn_layers(runner.model))
    log = (tmp_path / 'single' / runner.timestamp / f'{runner.timestamp}.log').read_text()
    assert 'CBN windows start empty' in log
