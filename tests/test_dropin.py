"""CBN as a drop-in for BatchNorm2d: what a BN user does to a model works on CBN too.

PyTorch's ``BatchNorm2d`` is the reference where CBN's window is 1; the literal reference
(``cbn_reference.py``) where it is larger.
"""
import copy
import gc
import io
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbn_reference import conv_kwargs, literal_cbn
from mmdet_cbn import CrossIterationBatchNorm2d, convert_cbn, pair_cbn_layers

HALF_DTYPES = [torch.bfloat16, torch.float16]
ROOT = Path(__file__).resolve().parents[1]


def conv_norm(norm: type, dtype: torch.dtype, bias: bool = True, **kw) -> nn.Sequential:
    """A 3x3 conv (with bias) and a norm layer of 6 channels, the same weights for every norm,
    in ``dtype``; CBN layers paired."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(6, bias=bias, **kw))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        if bias:
            model[1].bias.uniform_(-0.5, 0.5)
    model.to(dtype)
    pair_cbn_layers(model)
    return model


def assert_close_in(dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor,
                    scale: torch.Tensor | None = None) -> None:
    """Equal to a few units of ``dtype``'s precision relative to ``scale`` (default: the
    largest ``|expected|``)."""
    scale = expected.double().abs().max() if scale is None else scale.double()
    error = (actual.double() - expected.double()).abs().max()
    assert error <= 4 * torch.finfo(dtype).eps * scale, (error.item(), scale.item())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_running_statistics_move_as_batchnorms(dtype, momentum):
    """Window 1 running statistics equal BN's over several steps, to the dtype's precision:
    float64 buffers move by a float64 momentum."""
    cbn = CrossIterationBatchNorm2d(6, window_size=1, momentum=momentum).to(dtype)
    bn = nn.BatchNorm2d(6, momentum=momentum).to(dtype)
    for _ in range(6):
        y = torch.randn(4, 6, 5, 5, dtype=dtype) * 3 + 2
        torch.testing.assert_close(cbn(y), bn(y))
    tolerance = dict(rtol=1e-15, atol=1e-15) if dtype == torch.float64 else {}
    torch.testing.assert_close(cbn.running_mean, bn.running_mean, **tolerance)
    torch.testing.assert_close(cbn.running_var, bn.running_var, **tolerance)
    assert cbn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 6


@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_16_bit_model_at_window_1_trains_as_batchnorm(dtype):
    """``model.to(16-bit)`` trains as BN does, the statistics float32 inside: over SGD steps
    outputs, gradients and running statistics equal a 16-bit ``BatchNorm2d``'s."""
    cbn, bn = (conv_norm(norm, dtype, **kw) for norm, kw in (
        (CrossIterationBatchNorm2d, dict(window_size=1)), (nn.BatchNorm2d, {})))
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in (cbn, bn)]
    for _ in range(5):
        x = torch.randn(4, 3, 6, 6).to(dtype)
        grad = torch.randn(4, 6, 6, 6).to(dtype)
        outs = []
        for model, optimizer in zip((cbn, bn), optimizers):
            optimizer.zero_grad()
            outs.append(model(x))
            outs[-1].backward(grad)
        assert outs[0].dtype == dtype
        assert_close_in(dtype, outs[0], outs[1])
        largest = max(p.grad.abs().max() for p in bn.parameters())  # the conv bias's is ~0
        for p, q in zip(cbn.parameters(), bn.parameters()):
            assert p.grad.dtype == dtype
            assert_close_in(dtype, p.grad, q.grad, scale=largest)
        for optimizer in optimizers:
            optimizer.step()
    for name in ('running_mean', 'running_var'):
        assert getattr(cbn[1], name).dtype == dtype  # the module's buffers, as in BN
        assert_close_in(dtype, getattr(cbn[1], name), getattr(bn[1], name))


@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_16_bit_model_at_window_4_trains_as_the_reference(dtype):
    """A 16-bit model with window 4 trains; each step's output equals the literal reference
    of Eq. 7-11 in float64 over the stored 16-bit inputs and weights, to 16-bit precision,
    and the history is float32."""
    model = conv_norm(CrossIterationBatchNorm2d, dtype, window_size=4)
    conv, cbn = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    past = []
    for _ in range(6):
        x = torch.randn(4, 3, 6, 6).to(dtype)
        weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
        out = model(x)
        expected = literal_cbn(conv(x).detach().double(), past[-3:], weight, bias,
                               conv_kwargs(conv), cbn.weight.detach().double(),
                               cbn.bias.detach().double(), cbn.eps)
        assert_close_in(dtype, out, expected)
        past.append((x.double(), weight, bias))
        optimizer.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        assert all(p.grad.dtype == dtype and p.grad.isfinite().all() for p in model.parameters())
        optimizer.step()
    assert cbn.histories[0].records.dtype == torch.float32 and cbn.histories[0].filled == 3
    assert cbn.nonfinite_batches.item() == 0


def train_alike(models: list[nn.Module], dtype: torch.dtype, steps: int = 4,
                shape: tuple[int, ...] = (4, 3, 6, 6)) -> list[list[torch.Tensor]]:
    """SGD steps of each model on the same inputs and output gradients: the outputs of each
    step, per model."""
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
                  for m in models]
    outputs = []
    for _ in range(steps):
        x = torch.randn(shape).to(dtype)
        grad = None
        outs = []
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            out = model(x)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
            optimizer.step()
            outs.append(out.detach())
        outputs.append(outs)
    return outputs


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_bias_false_trains_as_batchnorm(dtype):
    """``bias=False`` (an affine scale without shift), as in ``BatchNorm2d``: window 1 trains
    as BN, window 4 as the literal reference with a zero shift; an empty batch passes."""
    cbn, bn = (conv_norm(norm, dtype, bias=False, **kw) for norm, kw in (
        (CrossIterationBatchNorm2d, dict(window_size=1)), (nn.BatchNorm2d, {})))
    assert cbn[1].bias is None and 'bias' not in cbn[1].state_dict()
    assert 'bias=False' in repr(cbn[1])
    for cbn_out, bn_out in train_alike([cbn, bn], dtype):
        torch.testing.assert_close(cbn_out, bn_out)
    for p, q in zip(cbn.parameters(), bn.parameters()):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(cbn[1].running_var, bn[1].running_var)
    empty = torch.zeros(0, 6, 4, 4, dtype=dtype, requires_grad=True)
    assert cbn[1](empty).shape == empty.shape

    model = conv_norm(CrossIterationBatchNorm2d, dtype, bias=False, window_size=4)
    conv, layer = model
    past = []
    for _ in range(5):
        x = torch.randn(4, 3, 6, 6, dtype=dtype)
        weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
        out = model(x)
        expected = literal_cbn(conv(x).detach(), past[-3:], weight, bias, conv_kwargs(conv),
                               layer.weight.detach(), torch.zeros_like(layer.weight), layer.eps)
        torch.testing.assert_close(out, expected, **(
            dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else {}))
        past.append((x, weight, bias))
        out.backward(torch.randn_like(out))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_convert_cbn_keeps_dtype_bias_and_requires_grad(dtype):
    """``convert_cbn`` of a float64 or 16-bit model with a ``bias=False`` BN and a frozen BN
    weight: the CBN layers have the model's dtype, no bias where BN had none, the frozen
    weight stays frozen, and at window 1 the model trains as before the conversion."""
    torch.manual_seed(0)
    bn_model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                             nn.BatchNorm2d(6, bias=False), nn.ReLU(),
                             nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)).to(dtype)
    bn_model[4].weight.requires_grad_(False)
    train_alike([bn_model], dtype, steps=2)  # running statistics and weights not at init
    cbn_model = convert_cbn(copy.deepcopy(bn_model), window_size=1)
    for index in (1, 4):
        layer = cbn_model[index]
        assert isinstance(layer, CrossIterationBatchNorm2d) and layer.paired_conv is not None
        assert all(t.dtype == dtype for t in (*layer.parameters(), layer.running_mean,
                                              layer.running_var))
    assert cbn_model[1].bias is None and cbn_model[4].bias is not None
    assert not cbn_model[4].weight.requires_grad and cbn_model[4].bias.requires_grad
    for cbn_out, bn_out in train_alike([cbn_model, bn_model], dtype):
        if dtype == torch.float64:
            torch.testing.assert_close(cbn_out, bn_out)
        else:
            assert_close_in(dtype, cbn_out, bn_out)
    for name, buffer in bn_model.state_dict().items():
        if dtype == torch.float64:
            torch.testing.assert_close(cbn_model.state_dict()[name], buffer)
        else:
            assert_close_in(dtype, cbn_model.state_dict()[name], buffer)


def trained_stack(window: int = 3) -> nn.Sequential:
    """conv, CBN, ReLU, conv, CBN in float64, paired and trained 4 SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1),
                          CrossIterationBatchNorm2d(6, window_size=window), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1),
                          CrossIterationBatchNorm2d(6, window_size=window)).double()
    pair_cbn_layers(model)
    train_alike([model], torch.float64)
    return model


def assert_holds_no_input(module: nn.Module, train: bool) -> None:
    """A call of ``module`` (in train or eval mode) leaves no reference to its input."""
    module.train(train)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    alive = weakref.ref(x)
    with torch.no_grad():
        module(x)
    del x
    gc.collect()
    assert alive() is None


def test_fused_convs_hold_no_activations_and_free_the_cbn_layers():
    """``mmcv.cnn.fuse_conv_bn`` (deploy) folds each CBN layer into its conv and puts an
    Identity in its place: the layers are freed, history and all, and the fused convs keep no
    activation of a call, in eval or in train mode."""
    from mmcv.cnn import fuse_conv_bn
    model = trained_stack().eval()
    layers = [weakref.ref(m) for m in model.modules()
              if isinstance(m, CrossIterationBatchNorm2d)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    fused = fuse_conv_bn(model)
    del model
    gc.collect()
    assert all(layer() is None for layer in layers)
    torch.testing.assert_close(fused(x), expected)
    for train in (False, True):
        assert_holds_no_input(fused, train)


def test_torch_fused_conv_and_eval_convs_hold_no_activations():
    """``torch.nn.utils.fusion.fuse_conv_bn_eval`` copies the conv (and its hook): the copy
    holds no activation; nor does a conv whose CBN is in eval mode, run without the CBN."""
    model = trained_stack().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    torch.testing.assert_close(fused(x), model[1](model[0](x)))
    assert_holds_no_input(fused, train=False)
    assert_holds_no_input(model[0], train=False)


def test_deepcopy_and_pickle_keep_each_copy_paired_with_its_own_conv():
    """A deep copy (EMA, model soups) and a pickled model (``torch.save(model)``) are paired
    with their own convs: they train on exactly as the original, which is left alone."""
    model = trained_stack()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for other in copies:
        for index in (1, 4):
            assert other[index].paired_conv is other[index - 1]
    steps = model[1].steps
    for outs in train_alike([model, *copies], torch.float64):
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert model[1].steps == copies[0][1].steps == copies[1][1].steps == steps + 4


def test_reset_running_stats_forgets_the_window_too():
    """After ``reset_running_stats`` no statistic seen before enters a later one, as in BN: the
    running statistics are BN's reset values, and the next training step normalizes with its
    own batch alone and updates the running statistics as a reset ``BatchNorm2d`` does."""
    model = trained_stack(window=3)
    conv, cbn = model[0], model[1]
    assert cbn.histories[0].filled == 2 and cbn.window == 3
    bn = nn.BatchNorm2d(6).double()
    bn.load_state_dict(cbn.state_dict(), strict=False)
    cbn.reset_running_stats()
    bn.reset_running_stats()
    assert cbn.histories == [] and cbn.window == 3
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cbn(conv(x)), bn(conv(x)))
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(cbn, name), getattr(bn, name))


def test_eval_model_fx_traces():
    """``torch.fx.symbolic_trace`` of a model in eval mode records CBN as BN's eval
    computation with the running statistics: the traced module's outputs equal the model's.
    A training-mode trace is refused naming the layer and the fix."""
    model = trained_stack().eval()
    traced = torch.fx.symbolic_trace(model)
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in traced.modules())
    for _ in range(2):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    model.train()
    with pytest.raises(RuntimeError, match=r"^1: .*training mode.*Fix: trace the model in eval"):
        torch.fx.symbolic_trace(model)



def test_eval_mmdet_resnet18_fx_traces_as_with_bn():
    """An mmdet ResNet-18 backbone with CBN traces in eval mode as with BN (``with_cp=False``:
    with it mmdet's block branches on ``x.requires_grad``, BN or not); every output equals
    the backbone's."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model = MODELS.build(dict(type='mmdet.ResNet', depth=18, base_channels=8,
                              norm_cfg=dict(type='CBN', window_size=2), norm_eval=False,
                              frozen_stages=-1)).double()
    pair_cbn_layers(model)
    for _ in range(3):
        sum(out.mean() for out in model(torch.randn(2, 3, 32, 32, dtype=torch.float64))).backward()
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for got, expected in zip(traced(x), model(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

class PadInForward(nn.Conv2d):
    """A conv whose forward pads its input (right and bottom): its output has the shape of
    its ``padding``'s, the values shifted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = 2 * self.padding[0]
        return F.conv2d(F.pad(x, (0, total, 0, total)), self.weight, self.bias, self.stride,
                        0, self.dilation, self.groups)


def _transforming_conv(name: str) -> nn.Module:
    from mmcv.cnn import ConvAWS2d, ConvWS2d
    from mmcv.cnn.bricks import Conv2dAdaptivePadding
    from mmcv.ops import SAConv2d
    return {'ConvWS2d': lambda: ConvWS2d(16, 8, 3, padding=1),
            'ConvAWS2d': lambda: ConvAWS2d(16, 8, 3, padding=1),
            'SAConv2d': lambda: SAConv2d(16, 8, 3, padding=1, use_deform=False),
            'Conv2dAdaptivePadding': lambda: Conv2dAdaptivePadding(16, 8, 3, stride=2),
            'PadInForward': lambda: PadInForward(16, 8, 3, padding=1)}[name]()


def conv_check_model(conv: nn.Module, dtype: torch.dtype, weight_scale: float) -> nn.Sequential:
    """``conv`` (its weight and bias scaled) and a window-2 CBN: the conv check runs at the
    first call."""
    out_channels = [m for m in conv.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    with torch.no_grad():
        for name, parameter in conv.named_parameters():
            if name.endswith(('weight', 'bias')):
                parameter.mul_(weight_scale)
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(out_channels, window_size=2)).to(dtype)
    pair_cbn_layers(model)
    return model


CHECK_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SCALES = (1e-3, 1.0, 1e3)


@pytest.mark.parametrize('dtype', CHECK_DTYPES)
def test_conv_check_accepts_plain_convs_at_any_magnitude(dtype):
    """Plain convs (also a wide one, grouped / strided / dilated ones, and one after mmcv's
    ``AdaptivePadding`` module, whose padded map is the conv's input) pass the conv check
    with inputs and weights scaled by 1e-3 to 1e3, and train."""
    from mmcv.cnn.bricks.transformer import AdaptivePadding
    convs = [lambda: nn.Conv2d(16, 8, 3, padding=1),
             lambda: nn.Conv2d(256, 8, 3, padding=1),
             lambda: nn.Conv2d(32, 8, 3, padding=2, groups=4, stride=2, dilation=2),
             lambda: nn.Sequential(AdaptivePadding(kernel_size=3, stride=2),
                                   nn.Conv2d(16, 8, 3, stride=2))]
    for make in convs:
        for x_scale in SCALES:
            for weight_scale in SCALES:
                model = conv_check_model(make(), dtype, weight_scale)
                in_channels = next(m for m in model.modules()
                                   if isinstance(m, nn.Conv2d)).in_channels
                for _ in range(2):
                    x = torch.randn(2, in_channels, 9, 9).mul(x_scale).to(dtype)
                    model(x).float().square().mean().backward()
                assert model[1].steps == 2


@pytest.mark.parametrize('dtype', CHECK_DTYPES)
@pytest.mark.parametrize('name', ['ConvWS2d', 'ConvAWS2d', 'SAConv2d', 'Conv2dAdaptivePadding',
                                  'PadInForward'])
def test_conv_check_refuses_convs_that_transform_weight_or_input(name, dtype):
    """Weight standardization (mmcv's ConvWS2d, ConvAWS2d, SAConv2d) and padding inside
    forward (mmcv's Conv2dAdaptivePadding, a conv that pads) are refused at any magnitude,
    naming the conv and the fix, before any state changes."""
    for scale in (1e-3, 1e3):
        model = conv_check_model(_transforming_conv(name), dtype, scale)
        with pytest.raises(RuntimeError, match=f"{name}.*compensation='none'"):
            model(torch.randn(2, 16, 9, 9).mul(scale).to(dtype))
        assert model[1].steps == 0 and model[1].num_batches_tracked.item() == 0


@pytest.mark.parametrize('with_cp', [False, True])
def test_float64_mmdet_resnet18_passes_the_conv_check(with_cp):
    """An mmdet ResNet-18 (64 base channels: convs up to D = 256 * 9 at ``layer3``) with CBN
    everywhere trains in float64, with and without ``with_cp``."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model = MODELS.build(dict(type='mmdet.ResNet', depth=18, with_cp=with_cp,
                              norm_cfg=dict(type='CBN', window_size=2), norm_eval=False,
                              frozen_stages=-1)).double()
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        outs = model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
        sum(out.square().mean() for out in outs).backward()
        optimizer.step()
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == 20 and all(m.steps == 2 for m in layers)


def two_processes(*command: str, port: int) -> subprocess.CompletedProcess:
    """``command`` run as 2 gloo processes (torchrun, or ``tools/dist_train.sh`` with its own
    launch) from the repository root with this checkout first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port),
               PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]))
    if command[0].endswith('.sh'):
        args = ['bash', *command]
    else:
        args = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                '--master_port', str(port), *command]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


SYNC_BN_ERROR = (r"sync_bn='torch' is set in the config: .*converts every _BatchNorm .*CBN "
                 r"layers included.*Fix: remove sync_bn from the config; for CBN statistics "
                 r"pooled across the GPUs as well, norm_cfg=dict\(type='SyncCBN', ...\)")


@pytest.mark.parametrize('norm', ['CBN', 'SyncCBN'])
def test_check_sync_bn_refuses_cbn_and_synccbn_configs_and_names_synccbn(norm):
    """mmengine would convert SyncCBN layers to SyncBatchNorm as well: both are refused."""
    from mmengine.config import Config

    from mmdet_cbn.hooks import check_sync_bn
    cfg = Config(dict(launcher='pytorch', sync_bn='torch',
                      model=dict(type='X', neck=dict(norm_cfg=dict(type=norm, window_size=4)))))
    with pytest.raises(RuntimeError, match='The config builds CBN layers, but ' + SYNC_BN_ERROR):
        check_sync_bn(cfg)
    cfg.launcher = 'none'  # one process: mmengine ignores sync_bn
    check_sync_bn(cfg)


def test_distributed_run_with_sync_bn_stops_before_training(tmp_path):
    """2 gloo processes, ``sync_bn='torch'``: mmengine's Runner converts the CBN layers to
    SyncBatchNorm; ``CBNBurnInHook`` stops the run before training with the cause and the fix
    (with a wrapper that lets SyncBN past DDP on CPU modules, as GPUs do)."""
    proc = two_processes(str(ROOT / 'tests' / 'sync_bn_probe.py'), str(tmp_path), port=29641)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'CBNBurnInHook is configured but the model has no CBN layer' in output, output[-3000:]
    assert re.search(SYNC_BN_ERROR, output)
    assert 'SyncBatchNorm expected input tensor' not in output  # no training step ran


def test_dist_train_with_sync_bn_stops_before_the_runner(tmp_path):
    """``tools/dist_train.sh CONFIG 2 --cfg-options sync_bn=torch`` with a CBN config on CPU:
    each rank stops with the cause and the fix before the Runner is built (whose DDP wrapper
    would otherwise fail first with "SyncBatchNorm layers only work with GPU modules")."""
    config = ROOT / 'configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'
    proc = two_processes('tools/dist_train.sh', str(config), '2', '--work-dir', str(tmp_path),
                         '--cfg-options', 'sync_bn=torch', port=29643)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search('The config builds CBN layers, but ' + SYNC_BN_ERROR, output), output[-3000:]
    assert 'only work with GPU modules' not in output
