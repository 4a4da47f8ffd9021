"""Reliability: resume, mixed precision, frozen pieces, bad input, folding for deployment."""
import copy
import logging

import pytest
import torch
from mmcv.cnn import build_norm_layer, fuse_conv_bn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from cbn_reference import conv_kwargs, literal_cbn
from mmdet_cbn import CrossIterationBatchNorm2d, cbn_layers, pair_cbn_layers
from mmdet_cbn.compat import runner_checkpoint_globals


class SmallNet(BaseModel):
    """conv-CBN-relu x2 and a linear head: the smallest model with two paired CBN layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = CrossIterationBatchNorm2d(8, window_size=3)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=True)
        self.norm2 = CrossIterationBatchNorm2d(8, window_size=3)
        self.head = nn.Linear(8, 1)

    def forward(self, inputs, targets=None, mode='loss'):
        x = self.norm1(self.conv1(inputs)).relu()
        x = self.norm2(self.conv2(x)).relu().mean((2, 3))
        return {'loss': (self.head(x).squeeze(1) - targets).square().mean()}


class RandomData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), targets=torch.tensor(i / 8))


class LossRecorder(Hook):
    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter] = outputs['loss'].item()


def make_runner(work_dir, max_epochs, resume=False, optim_wrapper=None):
    torch.manual_seed(0)
    recorder = LossRecorder()
    runner = Runner(
        model=SmallNet(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=RandomData(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=True, seed=0),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=optim_wrapper or dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        custom_hooks=[dict(type='CBNBurnInHook', burnin_epochs=1), recorder],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        randomness=dict(seed=0), resume=resume, log_level='WARNING',
        experiment_name=f'{work_dir.parent.name}-{work_dir.name}')  # one logger per run
    return runner, recorder


def test_resume_continues_exactly(tmp_path):
    runner, full = make_runner(tmp_path / 'full', max_epochs=4)
    runner.train()
    # interrupted run: 2 epochs (past the 1-epoch burn-in), then resume to 4 from its checkpoint
    runner, _ = make_runner(tmp_path / 'cut', max_epochs=2)
    runner.train()
    before = {n: m.histories[0].state() for n, m in cbn_layers(runner.model)}
    assert all(m.histories[0].filled == 2 for _, m in cbn_layers(runner.model))
    runner, resumed = make_runner(tmp_path / 'cut', max_epochs=4, resume=True)
    with runner_checkpoint_globals():
        runner.train()
    assert sorted(resumed.losses) == list(range(8, 16))
    assert [resumed.losses[i] for i in range(8, 16)] == [full.losses[i] for i in range(8, 16)]
    state = torch.load(tmp_path / 'cut' / 'epoch_2.pth', weights_only=False)['state_dict']
    for field in ('grad_var', 'xbar', 'mean', 'cursor'):  # saved with the running record
        torch.testing.assert_close(state[f'norm2.cbn_history.0.{field}'], before['norm2'][field])
    assert state['norm2.cbn_history.0.cursor'][2] == 1  # the last iteration's record, written
    assert state['norm2.cbn_steps'].item() == 8


def test_bf16_autocast_trains_and_keeps_statistics_float32(tmp_path, monkeypatch):
    # mmengine's AmpOptimWrapper refuses to be built without an accelerator; lift only that
    # guard so that its bf16 autocast path (the one GPU users run in fp16) runs on this CPU
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    monkeypatch.setattr(amp_optimizer_wrapper, 'is_cuda_available', lambda: True)
    runner, recorder = make_runner(
        tmp_path, max_epochs=2,
        optim_wrapper=dict(type='AmpOptimWrapper', dtype='bfloat16',
                           optimizer=dict(type='SGD', lr=0.05)))
    dtypes = set()
    runner.model.conv2.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    runner.train()
    assert dtypes == {torch.bfloat16}  # CBN really normalized bf16 activations
    assert all(torch.isfinite(torch.tensor(list(recorder.losses.values()))))
    assert runner.optim_wrapper.cast_dtype == torch.bfloat16
    for _, layer in cbn_layers(runner.model):
        assert layer.histories[0].records.dtype == torch.float32
        assert layer.running_var.dtype == torch.float32


def test_autocast_output_dtype_follows_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window_size=2))
    pair_cbn_layers(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for _ in range(3):
            out = model(torch.randn(2, 3, 6, 6))
            out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert model[1].histories[0].xbar.dtype == torch.float32


def paired(window=3, bias=False, seed=0, padding=1, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(4, 5, 3, padding=padding, bias=bias),
                          CrossIterationBatchNorm2d(5, window_size=window, **kw)).double()
    pair_cbn_layers(model)
    return model


def backward(out):
    """End an iteration: a backward pass through the layer."""
    (out * torch.randn_like(out)).sum().backward()


def test_frozen_conv_makes_compensation_a_no_op():
    model = paired()
    model[0].weight.requires_grad_(False)
    naive = copy.deepcopy(model)
    naive[1].compensation = 'none'
    for _ in range(4):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        out, out_naive = model(x), naive(x)
        torch.testing.assert_close(out, out_naive)
        backward(out)
        backward(out_naive)


def test_norm_eval_uses_running_statistics_like_bn():
    model = paired()
    for _ in range(3):
        backward(model(torch.randn(2, 4, 6, 6, dtype=torch.float64)))
    model[1].eval()
    bn = nn.BatchNorm2d(5).double().eval()
    bn.load_state_dict(model[1].state_dict(), strict=False)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), bn(model[0](x)))


def test_non_finite_batch_stays_out_of_history_and_running_stats(record_path):
    model = paired(window=3)
    conv, cbn = model
    kwargs = conv_kwargs(conv)
    past = []
    nan_step = 4  # the ring has wrapped: the free slot holds an old record
    for step in range(7):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        if step == nan_step:
            x[0, 0, 0, 0] = float('nan')
            mean_before = cbn.running_mean.clone()
        out = model(x)
        if step == nan_step:
            assert torch.isnan(out).any()
            torch.testing.assert_close(cbn.running_mean, mean_before)
            assert cbn.nonfinite_batches.item() == 1
        else:
            # the NaN iteration is excluded from the window; the others are used as usual
            window = [p for p in past[-2:] if p is not None]
            expected = literal_cbn(conv(x).detach(), window, conv.weight.detach().clone(), None,
                                   kwargs, cbn.weight.detach(), cbn.bias.detach(), cbn.eps)
            torch.testing.assert_close(out.detach(), expected)
            assert torch.isfinite(cbn.running_var).all()
        past.append(None if step == nan_step else (x, conv.weight.detach().clone(), None))
        model.zero_grad()
        backward(out)
        if step > nan_step:  # the NaN record is out of the weight gradient too (no NaN * 0)
            assert torch.isfinite(conv.weight.grad).all()
        with torch.no_grad():
            conv.weight.add_(0.01 * torch.randn_like(conv.weight))


def test_non_finite_compensated_statistics_are_not_committed(record_path):
    """A finite record can compensate to a non-finite window (here: a weight jump that
    overflows float32's variance): that step reaches neither the running statistics nor the
    history, and later steps are clean."""
    model = paired(window=3).float()
    conv, cbn = model
    for _ in range(3):
        backward(model(torch.randn(2, 4, 6, 6)))
    before = copy.deepcopy(cbn.state_dict())
    saved = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.mul_(1e30)
    backward(model(torch.randn(2, 4, 6, 6)))
    for key in ('running_mean', 'running_var'):
        torch.testing.assert_close(cbn.state_dict()[key], before[key], msg=key)
    assert cbn.nonfinite_batches.item() == 1
    with torch.no_grad():
        conv.weight.copy_(saved)
    for _ in range(3):
        out = model(torch.randn(2, 4, 6, 6))
        assert torch.isfinite(out).all()
        backward(out)
    assert torch.isfinite(cbn.running_var).all() and torch.isfinite(cbn.running_mean).all()
    assert torch.isfinite(cbn.histories[0].records).all()


def test_zero_variance_channel_and_single_value_batches():
    model = paired(window=2)
    with torch.no_grad():
        model[0].weight[1].zero_()
    out = model(torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(model[0].weight.grad).all()
    torch.testing.assert_close(out[:, 1], torch.full_like(out[:, 1], model[1].bias[1].item()))
    # 1 image of 1x1: like BN it can't normalize with no past statistics...
    one = paired(window=2, padding=0)
    with pytest.raises(ValueError, match='more than 1 value'):
        one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='more than 1 value'):
        one[1].set_window(1)
        one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    assert one[1].steps == 0 and one[1].num_batches_tracked.item() == 0  # nothing advanced
    # ...but once the window holds a past batch it can
    one[1].set_window(2)
    backward(one(torch.randn(3, 4, 3, 3, dtype=torch.float64)))
    out = one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    assert out.shape == (1, 5, 1, 1) and torch.isfinite(out).all()


def test_empty_batch_keeps_history_and_statistics():
    """An iteration without RoIs changes no statistic and leaves the window as it was."""
    model = paired(window=3)
    for _ in range(2):
        backward(model(torch.randn(2, 4, 5, 5, dtype=torch.float64)))
    cbn = model[1]
    skipped = copy.deepcopy(model)
    before = copy.deepcopy(cbn.state_dict())
    model.zero_grad()
    out = model(torch.randn(0, 4, 5, 5, dtype=torch.float64))
    out.sum().backward()
    assert out.shape == (0, 5, 5, 5)
    for key in ('running_mean', 'running_var', 'num_batches_tracked', 'cbn_nonfinite_batches'):
        torch.testing.assert_close(cbn.state_dict()[key], before[key], msg=key)
    assert torch.count_nonzero(cbn.weight.grad) == 0
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), skipped(x), rtol=0, atol=0)


def test_unknown_config_key_names_the_fix():
    with pytest.raises(TypeError, match="'windowsize' \\(did you mean 'window_size'\\?\\)"):
        build_norm_layer(dict(type='CBN', windowsize=4), 8)


def test_trained_model_folds_into_its_convs():
    model = paired(window=3, bias=True)
    for _ in range(4):
        model(torch.randn(2, 4, 6, 6, dtype=torch.float64)).sum().backward()
    model.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = model(x)
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected)


def test_hook_warns_about_non_finite_batches(tmp_path, caplog):
    runner, _ = make_runner(tmp_path, max_epochs=1)
    runner.model.norm1.nonfinite_batches += 2
    with caplog.at_level(logging.WARNING):
        runner.train()
    log = (tmp_path / runner.timestamp / f'{runner.timestamp}.log').read_text()
    assert "non-finite batch statistics" in log and "'norm1': 2" in log
