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
    before = {n: copy.deepcopy(m.history) for n, m in cbn_layers(runner.model)}
    assert all(h is not None and h.written == 2 for h in before.values())
    runner, resumed = make_runner(tmp_path / 'cut', max_epochs=4, resume=True)
    runner.train()
    assert sorted(resumed.losses) == list(range(8, 16))
    assert [resumed.losses[i] for i in range(8, 16)] == [full.losses[i] for i in range(8, 16)]
    state = torch.load(tmp_path / 'cut' / 'epoch_2.pth', weights_only=False)['state_dict']
    torch.testing.assert_close(state['norm2.cbn_history.grad_nu'], before['norm2'].grad_nu)
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
        assert layer.history.grad_nu.dtype == torch.float32
        assert layer.history.stats.dtype == torch.float32
        assert layer.running_var.dtype == torch.float32


def test_autocast_output_dtype_follows_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window_size=2))
    pair_cbn_layers(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for _ in range(2):
            out = model(torch.randn(2, 3, 6, 6))
    assert out.dtype == torch.bfloat16 and model[1].history.xbar.dtype == torch.float32


def paired(window=3, bias=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=bias),
                          CrossIterationBatchNorm2d(5, window_size=window)).double()
    pair_cbn_layers(model)
    return model


def test_frozen_conv_makes_compensation_a_no_op():
    model = paired()
    model[0].weight.requires_grad_(False)
    naive = copy.deepcopy(model)
    naive[1].compensation = 'none'
    for _ in range(4):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(model(x), naive(x))


def test_norm_eval_uses_running_statistics_like_bn():
    model = paired()
    for _ in range(3):
        model(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    model[1].eval()
    bn = nn.BatchNorm2d(5).double().eval()
    bn.load_state_dict(model[1].state_dict(), strict=False)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), bn(model[0](x)))


def test_non_finite_batch_stays_out_of_history_and_running_stats(caplog):
    model = paired(window=3)
    conv, cbn = model
    kwargs = conv_kwargs(conv)
    past = []
    for step in range(6):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        if step == 2:
            x[0, 0, 0, 0] = float('nan')
            mean_before = cbn.running_mean.clone()
        out = model(x)
        if step == 2:
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
        past.append(None if step == 2 else (x, conv.weight.detach().clone(), None))
        with torch.no_grad():
            conv.weight.add_(0.01 * torch.randn_like(conv.weight))


def test_non_finite_record_leaves_gradients_through_the_compensation_finite():
    """With ``backprop_past_stats`` a NaN record in the history stays out of the weight
    gradient (no NaN * 0) while it is in the window."""
    model = paired(window=3)
    model[1].backprop_past_stats = True
    for step in range(4):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        if step == 1:
            x[0, 0, 0, 0] = float('nan')
        model.zero_grad()
        out = model(x)
        (out * torch.randn_like(out)).sum().backward()
        if step > 1:
            assert torch.isfinite(out).all() and torch.isfinite(model[0].weight.grad).all()


def test_zero_variance_channel_and_single_value_batches():
    model = paired(window=2)
    with torch.no_grad():
        model[0].weight[1].zero_()
    out = model(torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(model[0].weight.grad).all()
    torch.testing.assert_close(out[:, 1], torch.full_like(out[:, 1], model[1].bias[1].item()))
    # 1 image of 1x1: like BN it can't normalize with no past statistics...
    one = paired(window=2)
    one[0].padding = (0, 0)
    with pytest.raises(ValueError, match='more than 1 value'):
        one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='more than 1 value'):
        one[1].set_window(1)
        one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    # ...but once the window holds a past batch it can
    one[1].set_window(2)
    one(torch.randn(3, 4, 3, 3, dtype=torch.float64))
    out = one(torch.randn(1, 4, 3, 3, dtype=torch.float64))
    assert out.shape == (1, 5, 1, 1) and torch.isfinite(out).all()


def test_empty_batch_keeps_history_and_statistics():
    model = paired(window=3)
    for _ in range(2):
        model(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    cbn = model[1]
    before = copy.deepcopy(cbn.state_dict())
    out = model(torch.randn(0, 4, 5, 5, dtype=torch.float64))
    out.sum().backward()
    assert out.shape == (0, 5, 5, 5)
    for key, value in cbn.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert torch.count_nonzero(cbn.weight.grad) == 0


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
