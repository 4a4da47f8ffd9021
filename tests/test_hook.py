"""CBNBurnInHook in a real mmengine Runner: pairing report, window switch, logging."""
import logging

import pytest
import torch
from mmengine.config import Config
from mmengine.model import BaseModel, convert_sync_batchnorm
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from mmdet_cbn import CBNBurnInHook, CrossIterationBatchNorm2d
from mmdet_cbn.hooks import check_sync_bn

WINDOW = 3


class ToyNet(BaseModel):
    def __init__(self, paired: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        if not paired:
            self.extra = nn.Conv2d(8, 4, 1)  # registered in between: wrong channel count
        self.norm = CrossIterationBatchNorm2d(8, window_size=WINDOW)
        self.head = nn.Linear(8, 1)
        self.windows: list[int] = []

    def forward(self, inputs, targets=None, mode='loss'):
        self.windows.append(self.norm.window)
        features = self.norm(self.conv(inputs)).relu().mean((2, 3))
        return {'loss': (self.head(features).squeeze(1) - targets).square().mean()}


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 6, 6, generator=g), targets=torch.tensor(float(i)))


def run(tmp_path, model, train_cfg, hook, **runner_kwargs):
    runner = Runner(
        model=model, work_dir=str(tmp_path), **runner_kwargs,
        train_dataloader=dict(dataset=ToyData(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)), train_cfg=train_cfg,
        custom_hooks=[hook], default_hooks=dict(checkpoint=None), log_level='INFO',
        experiment_name=tmp_path.name)  # one logger (and log file) per test
    runner.train()
    return runner


@pytest.mark.parametrize('train_cfg, hook, expected', [
    (dict(by_epoch=True, max_epochs=3), dict(type='CBNBurnInHook', burnin_epochs=2),
     [1] * 8 + [WINDOW] * 4),
    (dict(by_epoch=False, max_iters=5), dict(type='CBNBurnInHook', burnin_iters=2),
     [1, 1] + [WINDOW] * 3),
    # an iteration-based loop counts burn-in epochs in dataloader lengths (4 iterations)
    (dict(by_epoch=False, max_iters=6), dict(type='CBNBurnInHook', burnin_epochs=1),
     [1] * 4 + [WINDOW] * 2),
])
def test_hook_switches_window_at_the_right_time(tmp_path, caplog, train_cfg, hook, expected):
    model = ToyNet()
    with caplog.at_level(logging.INFO):
        runner = run(tmp_path, model, train_cfg, hook)
    assert model.windows == expected
    assert model.norm.paired_conv is model.conv
    values, _ = runner.message_hub.get_scalar('train/cbn_window').data
    assert list(values) == expected
    log = (tmp_path / runner.timestamp / f'{runner.timestamp}.log').read_text()
    assert 'CBN: 1 of 1 CBN layers paired' in log
    assert f'CBN window {WINDOW}' in log


def test_hook_fails_clearly_on_unpaired_layers(tmp_path):
    with pytest.raises(RuntimeError, match=r'\bnorm\b.*Fix'):
        run(tmp_path, ToyNet(paired=False), dict(by_epoch=False, max_iters=1),
            dict(type='CBNBurnInHook', burnin_iters=0))


def test_hook_arguments_are_checked():
    with pytest.raises(ValueError, match='exactly one'):
        CBNBurnInHook()
    with pytest.raises(ValueError, match='>= 0'):
        CBNBurnInHook(burnin_epochs=-1)


def test_hook_refuses_a_model_without_cbn_layers(tmp_path):
    model = ToyNet()
    model.norm = nn.BatchNorm2d(8)
    with pytest.raises(RuntimeError, match=r"no CBN layer\. Fix: norm_cfg=dict\(type='CBN'"):
        run(tmp_path, model, dict(by_epoch=False, max_iters=1),
            dict(type='CBNBurnInHook', burnin_iters=0))


def test_hook_names_sync_bn_as_the_cause(tmp_path):
    """A distributed run with ``sync_bn`` hands the hook a model whose CBN layers mmengine
    converted to SyncBatchNorm (here by hand: a run without a launcher reverts SyncBN to BN,
    which is what the hook then sees). It stops before training, naming cause and fix."""
    model = convert_sync_batchnorm(ToyNet(), 'torch')
    with pytest.raises(RuntimeError, match=r"no CBN layer\. The cause: sync_bn='torch' .*"
                                           r'CBN layers included.*Fix: remove sync_bn'):
        run(tmp_path, model, dict(by_epoch=False, max_iters=1),
            dict(type='CBNBurnInHook', burnin_iters=0), cfg=dict(sync_bn='torch'))
    assert model.windows == []


def test_hook_warns_about_sync_bn_in_a_run_without_launcher(tmp_path):
    runner = run(tmp_path, ToyNet(), dict(by_epoch=False, max_iters=2),
                 dict(type='CBNBurnInHook', burnin_iters=0), cfg=dict(sync_bn='torch'))
    log = (tmp_path / runner.timestamp / f'{runner.timestamp}.log').read_text()
    assert "WARNING - CBNBurnInHook: sync_bn='torch' is set" in log
    assert runner.model.norm.steps == 2


@pytest.mark.parametrize('launcher, model, hooks, refused', [
    ('pytorch', dict(type='X', norm_cfg=dict(type='CBN')), [], True),
    ('slurm', dict(type='X', head=[dict(norm_cfg=dict(type='CBN'))]), [], True),
    ('pytorch', dict(type='X', norm_cfg=dict(type='BN')), [dict(type='CBNBurnInHook')], True),
    ('none', dict(type='X', norm_cfg=dict(type='CBN')), [], False),
    ('pytorch', dict(type='X', norm_cfg=dict(type='BN')), [], False),
])
def test_distributed_configs_with_cbn_and_sync_bn_are_refused(launcher, model, hooks, refused):
    cfg = Config(dict(model=model, custom_hooks=hooks, launcher=launcher, sync_bn='torch'))
    if refused:
        with pytest.raises(RuntimeError, match='builds CBN layers.*Fix: remove sync_bn'):
            check_sync_bn(cfg)
    else:
        check_sync_bn(cfg)
    cfg.sync_bn = None
    check_sync_bn(cfg)
