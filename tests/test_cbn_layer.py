"""CrossIterationBatchNorm2d against BatchNorm2d and the literal reference of Eq. 7-11."""
import copy

import pytest
import torch
from torch import nn

from cbn_reference import conv_kwargs, literal_cbn
from mmdet_cbn import CrossIterationBatchNorm2d, convert_cbn, pair_cbn_layers

# The reference checks run on CUDA too where a GPU is present (never in CI).
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device'))]


def conv_cbn(seed=0, bias=False, groups=1, stride=1, dilation=1, dtype=torch.float64,
             device='cpu', **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=bias)
    cbn = CrossIterationBatchNorm2d(6, **kw)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(conv, cbn).to(dtype=dtype, device=device)
    pair_cbn_layers(model)
    return model


def test_window_one_is_batchnorm_in_train_and_eval():
    model = conv_cbn(window_size=1)
    bn = copy.deepcopy(model[1])
    ref = nn.BatchNorm2d(6).double()
    ref.load_state_dict(bn.state_dict(), strict=False)
    for step in range(3):
        y = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
        y_ref = y.detach().clone().requires_grad_()
        out, out_ref = bn(y), ref(y_ref)
        torch.testing.assert_close(out, out_ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        torch.testing.assert_close(y.grad, y_ref.grad)
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bn.eval()
    ref.eval()
    y = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(bn(y), ref(y))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('compensation', ['taylor', 'none'])
@pytest.mark.parametrize('conv_kw', [dict(), dict(bias=True, groups=2),
                                     dict(stride=2, dilation=2, bias=True)])
def test_matches_literal_reference_over_a_training_run(compensation, conv_kw, device):
    """Each step's output equals Eq. 9-11 over stored old weights, biases and inputs."""
    window = 3
    model = conv_cbn(window_size=window, compensation=compensation, device=device, **conv_kw)
    conv, cbn = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = conv_kwargs(conv)
    past = []
    for step in range(6):
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64, device=device)
        w, b = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach()
        out = model(x)
        expected = literal_cbn(conv(x).detach(), past[-(window - 1):], w,
                               None if b is None else b.clone(), kwargs, cbn.weight.detach(),
                               cbn.bias.detach(), cbn.eps, compensation)
        torch.testing.assert_close(out.detach(), expected, rtol=1e-9, atol=1e-9)
        past.append((x, w, None if b is None else b.clone()))
        optimizer.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        optimizer.step()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('backprop_past_stats', [False, True])
@pytest.mark.parametrize('conv_kw', [dict(bias=True, groups=2), dict(stride=2, dilation=2)])
def test_parameter_gradients_match_the_literal_reference(backprop_past_stats, conv_kw, device):
    """Conv and affine gradients equal autograd through Eq. 7-11 on stored old inputs, with the
    compensated past statistics held constant (the paper) or as functions of ``W(t)``."""
    window = 3
    model = conv_cbn(window_size=window, backprop_past_stats=backprop_past_stats, device=device,
                     **conv_kw)
    conv, cbn = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = conv_kwargs(conv)
    past = []
    for step in range(5):
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64, device=device)
        w = conv.weight.detach().clone().requires_grad_()
        b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
        gamma, beta = (p.detach().clone().requires_grad_() for p in (cbn.weight, cbn.bias))
        y = conv._conv_forward(x, w, b)
        w_comp, b_comp = w, b
        if not backprop_past_stats:
            w_comp, b_comp = w.detach(), None if b is None else b.detach()
        expected = literal_cbn(y, past[-(window - 1):], w_comp, b_comp, kwargs, gamma, beta,
                               cbn.eps)
        out = model(x)
        grad_out = torch.randn_like(out)
        optimizer.zero_grad()
        out.backward(grad_out)
        params = [w, gamma, beta] + ([] if b is None else [b])
        ref_grads = torch.autograd.grad(expected, params, grad_out)
        got = [conv.weight.grad, cbn.weight.grad, cbn.bias.grad] + (
            [] if b is None else [conv.bias.grad])
        torch.testing.assert_close(got, list(ref_grads), rtol=1e-9, atol=1e-9)
        past.append((x, w.detach().clone(), None if b is None else b.detach().clone()))
        optimizer.step()


def test_backprop_past_stats_makes_a_mean_shift_gradient_free_as_in_bn():
    """A conv bias shifts the current and the compensated past means alike, so the forward
    hardly depends on it, as BN's does not at all. With the paper's constant past statistics
    the bias still gets a full-size gradient, which makes the conv output drift; with
    ``backprop_past_stats`` only the Taylor residual of the variance is left."""
    grads = {}
    for flag in (False, True):
        model = conv_cbn(window_size=4, bias=True, backprop_past_stats=flag)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        for step in range(4):
            optimizer.zero_grad()
            out = model(torch.randn(2, 4, 6, 6, dtype=torch.float64))
            (out * torch.randn_like(out)).sum().backward()
            optimizer.step()
        grads[flag] = model[0].bias.grad.abs().max().item()
    assert grads[False] > 1.0
    assert grads[True] < 0.03 * grads[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('options', [dict(), dict(grad_nu_stride=2),
                                     dict(backprop_past_stats=True)])
def test_cuda_training_and_eval_steps_never_wait_for_the_device(options):
    """No ``.item()``, no data-dependent shapes: a step queues its kernels without a host sync
    (the NaN guard stays on the device), in training with a full window and in eval."""
    model = conv_cbn(window_size=4, bias=True, dtype=torch.float32, device='cuda', **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        optimizer.zero_grad()
        out = model(torch.randn(2, 4, 9, 9, device='cuda'))
        (out * torch.randn_like(out)).sum().backward()
        optimizer.step()

    for _ in range(4):  # first allocations and a full history
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4, 9, 9, device='cuda'))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(model[1].running_var).all()


def test_gradients_flow_only_through_the_current_iteration_gradcheck():
    model = conv_cbn(window_size=3, bias=True)
    for _ in range(2):  # fill the history
        model(torch.randn(2, 4, 4, 4, dtype=torch.float64))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def fresh_forward(inp):
        return copy.deepcopy(model)(inp)

    assert torch.autograd.gradcheck(fresh_forward, (x,))
    # the gradient differs from plain BN's (the history enters the statistics)...
    out = copy.deepcopy(model)(x)
    (g_cbn,) = torch.autograd.grad(out.square().sum(), x)
    one = copy.deepcopy(model)
    one[1].set_window(1)
    (g_bn,) = torch.autograd.grad(one(x).square().sum(), x)
    assert not torch.allclose(g_cbn, g_bn)
    # ...and no gradient reaches the past: parameters of old iterations are plain tensors
    assert all(not t.requires_grad for t in model[1].history.tensors().values())


def test_state_dict_round_trip_keeps_history_and_continues_exactly():
    model = conv_cbn(window_size=4, bias=True)
    for _ in range(5):
        model(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    state = copy.deepcopy(model.state_dict())
    assert sorted(state) == sorted(
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
         '1.num_batches_tracked', '1.cbn_steps'] +
        [f'1.cbn_history.{n}' for n in ('xbar', 'grad_nu', 'stats', 'count', 'valid', 'cursor')])
    assert len(list(model.modules())) == 3  # the paired conv is referenced, not a child
    assert '1.cbn_history.grad_nu' in state and state['1.cbn_steps'].item() == 5
    restored = conv_cbn(window_size=4, bias=True, seed=3)
    restored.load_state_dict(state)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(restored[1].running_var, model[1].running_var, rtol=0, atol=0)
    # a BN-only checkpoint (no history) loads and starts with an empty history
    plain = conv_cbn(window_size=4, bias=True)
    plain.load_state_dict(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
                          .double().state_dict(), strict=False)
    assert plain[1].history is None


def test_history_moves_with_model_to_and_stays_float32():
    model = conv_cbn(window_size=2, dtype=torch.float32)
    model(torch.randn(2, 4, 6, 6))
    model.to(torch.float64)
    assert model[1].history.grad_nu.dtype == torch.float32
    model.to('meta')
    assert model[1].history.grad_nu.device.type == 'meta'


def test_burnin_iters_without_hook_and_set_window():
    model = conv_cbn(window_size=3, burnin_iters=2)
    cbn = model[1]
    windows = []
    for _ in range(4):
        windows.append(cbn.window)
        model(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert windows == [1, 1, 3, 3]
    cbn.set_window(1)
    assert cbn.window == 1
    with pytest.raises(ValueError, match='window'):
        cbn.set_window(0)


def test_running_stats_are_window_aggregated_and_unbiased():
    model = conv_cbn(window_size=2, momentum=1.0)
    conv, cbn = model
    cbn.set_window(2)
    x1, x2 = (torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        model(x1)
        model(x2)  # weights unchanged: compensation is a no-op, stats pool both batches
        pooled = torch.cat([conv(x1), conv(x2)])
    torch.testing.assert_close(cbn.running_mean, pooled.mean((0, 2, 3)))
    torch.testing.assert_close(cbn.running_var, pooled.var((0, 2, 3), unbiased=True))


def test_convert_cbn_on_a_plain_pytorch_resnet_like_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
        nn.AdaptiveAvgPool2d(1))
    model[1].running_mean.fill_(0.3)
    model[3][1].weight.requires_grad_(False)
    converted = convert_cbn(model, window_size=2)
    layers = [m for m in converted.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == 2 and all(m.paired_conv is not None for m in layers)
    assert layers[0].running_mean[0].item() == pytest.approx(0.3)
    assert not layers[1].weight.requires_grad
    for _ in range(3):
        converted(torch.randn(2, 3, 8, 8)).sum().backward()


def test_unpaired_layer_and_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match='window_size'):
        CrossIterationBatchNorm2d(4, window_size=0)
    with pytest.raises(ValueError, match='compensation'):
        CrossIterationBatchNorm2d(4, compensation='taylr')
    unpaired = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1, 1)),
                             CrossIterationBatchNorm2d(4, window_size=2))
    with pytest.raises(RuntimeError, match=r"'2'.*pair_cbn_layers"):
        unpaired[2].layer_name = '2'
        unpaired(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match='2'):
        pair_cbn_layers(unpaired)
    naive = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1, 1)),
                          CrossIterationBatchNorm2d(4, window_size=2, compensation='none'))
    pair_cbn_layers(naive)
    naive(torch.randn(3, 4))
    naive(torch.randn(3, 4))


def test_wrong_pairing_is_detected_at_run_time():
    class NormBeforeConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.norm = CrossIterationBatchNorm2d(4, window_size=2)

        def forward(self, x):
            return self.conv(self.norm(x))

    model = NormBeforeConv()
    pair_cbn_layers(model)  # statically plausible: conv registered before norm, 4 channels
    with pytest.raises(RuntimeError, match="'norm'"):
        model(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize('new_window', [2, 5])
def test_changing_the_window_keeps_the_newest_records(new_window):
    model = conv_cbn(window_size=3)
    conv, cbn = model
    kwargs = conv_kwargs(conv)
    past = []
    for _ in range(4):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        model(x)
        past.append((x, conv.weight.detach().clone(), None))
        with torch.no_grad():
            conv.weight.add_(0.01 * torch.randn_like(conv.weight))
    cbn.set_window(new_window)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    kept = past[-min(new_window - 1, 2):]  # window 3 held the last 2 iterations
    expected = literal_cbn(conv(x).detach(), kept, conv.weight.detach().clone(), None, kwargs,
                           cbn.weight.detach(), cbn.bias.detach(), cbn.eps)
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-9, atol=1e-9)
    assert cbn.history.slots == new_window - 1
