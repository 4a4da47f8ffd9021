"""CrossIterationBatchNorm2d against BatchNorm2d and the literal reference of Eq. 7-11."""
import copy
import itertools

import pytest
import torch
from torch import nn

from cbn_reference import conv_kwargs, literal_cbn
from mmdet_cbn import CrossIterationBatchNorm2d, convert_cbn, pair_cbn_layers
from mmdet_cbn.history import History

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


def sgd_step(model, out, optimizer):
    optimizer.zero_grad()
    (out * torch.randn_like(out)).sum().backward()
    optimizer.step()


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
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
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
        sgd_step(model, out, optimizer)
    assert cbn.steps == 6


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('detach', [False, True])
@pytest.mark.parametrize('conv_kw', [dict(bias=True, groups=2), dict(stride=2, dilation=2)])
def test_parameter_gradients_match_the_literal_reference(detach, conv_kw, device):
    """Conv and affine gradients equal autograd through Eq. 7-11 on stored old inputs: by
    default with the compensated statistics as functions of ``W(t)`` (the exact gradient),
    with ``detach_compensation`` with them held constant (the authors' code)."""
    window = 3
    model = conv_cbn(window_size=window, detach_compensation=detach, device=device, **conv_kw)
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
        if detach:
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


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_wide_layer_gradients_match_the_reference_while_the_window_fills_and_wraps(
        dtype, record_path):
    """A layer with ``C x D >= 32768``, whose weight gradient sums the past slots one by one
    (on the CPU only those in the window): output and gradients equal the float64 literal
    reference at every step of a window of 4 over 6 steps (filling, then wrapping around)."""
    window, channels = 4, 32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, channels, 3, padding=1),
                          CrossIterationBatchNorm2d(channels, window_size=window)).to(dtype)
    pair_cbn_layers(model)
    conv, cbn = model
    assert conv.weight.numel() >= 32768
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002)  # a few variances clamp
    kwargs = conv_kwargs(conv)
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                               atol=1e-4)
    past = []
    for step in range(6):
        x = torch.randn(2, 128, 5, 5, dtype=dtype)
        params = [p.detach().to(torch.float64, copy=True).requires_grad_()
                  for p in (conv.weight, conv.bias, cbn.weight, cbn.bias)]
        w, b, gamma, beta = params
        expected = literal_cbn(conv._conv_forward(x.double(), w, b), past[-(window - 1):], w, b,
                               kwargs, gamma, beta, cbn.eps)
        out = model(x)
        grad_out = torch.randn_like(out)
        optimizer.zero_grad()
        out.backward(grad_out)
        torch.testing.assert_close(out.detach().double(), expected.detach(), **tolerance)
        wants = torch.autograd.grad(expected, params, grad_out.double())
        scale = max(want.abs().max() for want in wants)  # the conv bias's is about 0, as in BN
        for got, want in zip([conv.weight.grad, conv.bias.grad, cbn.weight.grad, cbn.bias.grad],
                             wants):
            torch.testing.assert_close(got.double() / scale, want / scale, **tolerance)
        past.append((x.double(), w.detach(), b.detach()))
        optimizer.step()
    assert cbn.histories[0].filled == window - 1 and cbn.histories[0].free != 0
    assert 0 < cbn.clamped_variances[0] < cbn.clamped_variances[1] / 4


def test_exact_gradient_makes_a_mean_shift_gradient_free_as_in_bn():
    """A conv bias shifts the current and the compensated past means alike, so the forward
    hardly depends on it, as BN's does not at all. The default exact gradient leaves only the
    Taylor residual of the variance on it; with the compensation detached (the authors' code)
    the bias gets a full-size gradient, which makes the conv output drift."""
    grads = {}
    for detach in (False, True):
        model = conv_cbn(window_size=4, bias=True, detach_compensation=detach)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        for step in range(4):
            sgd_step(model, model(torch.randn(2, 4, 6, 6, dtype=torch.float64)), optimizer)
        grads[detach] = model[0].bias.grad.abs().max().item()
    assert grads[True] > 1.0
    assert grads[False] < 0.03 * grads[True]


class SharedHead(nn.Module):
    """One conv + CBN applied to every level of a feature pyramid (RetinaNet-style)."""

    def __init__(self, window, explicit=False, **cbn_kw):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
        self.norm = CrossIterationBatchNorm2d(6, window_size=window, **cbn_kw)
        self.explicit = explicit

    def forward(self, levels):
        if self.explicit:
            self.norm.new_iteration()
        return [self.norm(self.conv(x)) for x in levels]


@pytest.mark.parametrize('explicit', [False, True])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_call_sites_each_have_their_own_window(explicit, dtype):
    """A layer called L times per iteration equals, call site by call site, the literal
    reference run separately per call site, in outputs and gradients, over SGD steps; steps
    and the window count iterations, not calls."""
    window, sizes = 3, (9, 5, 3)
    torch.manual_seed(0)
    model = SharedHead(window, explicit=explicit, burnin_iters=1).to(dtype)
    pair_cbn_layers(model)
    conv, cbn = model.conv, model.norm
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    past = {size: [] for size in sizes}
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for step in range(5):
        levels = [torch.randn(2, 4, s, s, dtype=dtype) for s in sizes]
        w = conv.weight.detach().clone().requires_grad_()
        b = conv.bias.detach().clone().requires_grad_()
        outs = model(levels)
        grads = [torch.randn_like(o) for o in outs]
        optimizer.zero_grad()
        torch.autograd.backward(outs, grads)
        expected = []
        for x, size in zip(levels, sizes):
            used = past[size][-(window - 1):] if step >= 1 else []  # burn-in: iteration 1
            expected.append(literal_cbn(conv._conv_forward(x, w, b), used, w, b,
                                        conv_kwargs(conv), cbn.weight.detach(),
                                        cbn.bias.detach(), cbn.eps))
            if step >= 1:
                past[size].append((x, w.detach().clone(), b.detach().clone()))
        for out, exp in zip(outs, expected):
            torch.testing.assert_close(out.detach(), exp.detach(), **tol)
        ref = torch.autograd.grad(expected, [w, b], grads)
        torch.testing.assert_close([conv.weight.grad, conv.bias.grad], list(ref), **tol)
        optimizer.step()
        assert cbn.steps == step + 1 and cbn.num_call_sites == len(sizes)
    assert len(cbn.histories) == len(sizes)
    assert cbn.num_batches_tracked.item() == 5 * len(sizes)  # running stats: per call, as BN


def test_gradient_accumulation_pools_the_micro_batches():
    """With window N over N micro-batches between two optimizer steps, the last micro-batch
    is normalized with BN's statistics of the N micro-batches pooled (the compensation is
    exactly zero while the weights have not changed)."""
    n = 4
    model = conv_cbn(window_size=n, bias=True)
    conv, cbn = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # an optimizer step, so that earlier records are from older weights
        sgd_step(model, model(torch.randn(2, 4, 6, 6, dtype=torch.float64)), optimizer)
    micro = [torch.randn(2, 4, 6, 6, dtype=torch.float64) for _ in range(n)]
    optimizer.zero_grad()
    for x in micro:
        out = model(x)
        (out * torch.randn_like(out)).sum().backward()
    with torch.no_grad():
        pooled = torch.cat([conv(x) for x in micro])
        y = conv(micro[-1])
    mean = pooled.mean((0, 2, 3), keepdim=True)
    var = pooled.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = ((y - mean) / torch.sqrt(var + cbn.eps) * cbn.weight.view(1, -1, 1, 1)
                + cbn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('flavour', ['reentrant', 'non-reentrant'])
def test_gradient_checkpointing_reproduces_the_forward_and_records_once(flavour):
    """A checkpointed conv-CBN-conv-CBN block trains exactly as the plain one (window 3,
    float64, 6 SGD steps): the recomputation normalizes with the first forward's window and
    changes no state."""
    def block():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),  # outside: the input needs grad
                              nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=True),
                                            CrossIterationBatchNorm2d(5, window_size=3),
                                            nn.ReLU(),
                                            nn.Conv2d(5, 5, 3, padding=1, groups=5),
                                            CrossIterationBatchNorm2d(5, window_size=3)))
        pair_cbn_layers(model)
        return model.double()

    plain, checkpointed = block(), block()
    inner = checkpointed[1]

    def run_checkpointed(x):
        h = checkpointed[0](x)
        return torch.utils.checkpoint.checkpoint(inner, h,
                                                 use_reentrant=flavour == 'reentrant')

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for m in (plain, checkpointed)]
    for step in range(6):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        grad = torch.randn(2, 5, 6, 6, dtype=torch.float64)
        for forward, optimizer in zip((plain, run_checkpointed), optimizers):
            optimizer.zero_grad()
            out = forward(x)
            out.backward(grad)
            optimizer.step()
        for p, q in zip(plain.parameters(), checkpointed.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    for a, b in zip((plain[1][1], plain[1][4]), (inner[1], inner[4])):
        assert a.steps == b.steps == 6 and b.num_call_sites == 1
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 6
        torch.testing.assert_close(b.running_var, a.running_var, rtol=0, atol=1e-12)
        torch.testing.assert_close(b.histories[0].records, a.histories[0].records, rtol=0,
                                   atol=1e-12)


def test_mmdet_resnet_with_cp_trains_as_without():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    models = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = MODELS.build(dict(type='mmdet.ResNet', depth=18, base_channels=8, with_cp=with_cp,
                                  norm_cfg=dict(type='CBN', window_size=3), norm_eval=False,
                                  frozen_stages=-1)).double()
        pair_cbn_layers(model)
        models.append(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(5):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            sum(o.square().mean() for o in model(x)).backward()
            optimizer.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    layers = [m for m in models[1].modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert all(m.steps == 5 and m.num_call_sites == 1 for m in layers)


def test_double_backward_is_refused_clearly():
    model = conv_cbn(window_size=3)
    for _ in range(2):
        with torch.no_grad():
            model(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()


def test_state_dict_round_trip_keeps_history_and_continues_exactly():
    model = conv_cbn(window_size=4, bias=True, grad_nu_stride=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        sgd_step(model, model(torch.randn(2, 4, 6, 6, dtype=torch.float64)), optimizer)
    model[1].nonfinite_batches += 2
    state = copy.deepcopy(model.state_dict())
    fields = ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var', 'cursor')
    assert sorted(state) == sorted(
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
         '1.num_batches_tracked', '1.cbn_steps', '1.cbn_nonfinite_batches', '1.cbn_sampler'] +
        [f'1.cbn_history.0.{n}' for n in fields])
    assert len(list(model.modules())) == 3  # the paired conv is referenced, not a child
    assert state['1.cbn_steps'].item() == 5
    restored = conv_cbn(window_size=4, bias=True, grad_nu_stride=2, seed=3)
    restored.load_state_dict(state)
    assert restored[1].nonfinite_batches.item() == 2
    for _ in range(3):  # the sampler continues too: identical records
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(restored[1].running_var, model[1].running_var, rtol=0, atol=0)
    # a BN-only checkpoint (no history) loads and starts with an empty history
    plain = conv_cbn(window_size=4, bias=True)
    plain.load_state_dict(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
                          .double().state_dict(), strict=False)
    assert plain[1].histories == []
    # a history in the layout of 0.1.0 before 2026-12 (S slots, a pending record) is dropped
    old = dict(state)
    old['1.cbn_history.0.cursor'] = torch.tensor([1, 3])
    old['1.cbn_history.0.pending'] = torch.zeros(100, dtype=torch.float64)
    with pytest.warns(UserWarning, match='another layout; it is dropped'):
        plain.load_state_dict(old)
    assert plain[1].histories == [None] and plain[1].steps == 5


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_grad_nu_stride_set_on_a_built_layer_samples_every_offset(dtype):
    """``layer.grad_nu_stride = 2`` on a built layer (as a benchmark or a user tuning a model
    would) samples like the constructor's option: over the draws every output position enters,
    and the distinct records of ``d var / d W`` average to the exact one (autograd)."""
    model = conv_cbn(window_size=2, dtype=dtype)
    conv, cbn = model
    cbn.grad_nu_stride = 2
    assert 'cbn_sampler' in cbn.state_dict()
    with pytest.raises(ValueError, match='grad_nu_stride must be an integer >= 1'):
        cbn.grad_nu_stride = 0
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    weight = conv.weight.detach().double().requires_grad_()
    var = nn.functional.conv2d(x.double(), weight, None, padding=1).var(dim=(0, 2, 3),
                                                                          unbiased=False)
    (exact,) = torch.autograd.grad(var.sum(), weight)
    distinct = []
    with torch.no_grad():
        for _ in range(64):
            cbn.new_iteration()
            model(x)
            history = cbn.histories[0]
            record = history.grad_var[history.free].clone()
            if not any(torch.allclose(record, seen) for seen in distinct):
                distinct.append(record)
    assert len(distinct) == 4  # the offsets (0, 0), (0, 1), (1, 0), (1, 1) of stride 2
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                                   atol=1e-6)
    torch.testing.assert_close(torch.stack(distinct).mean(0), exact.reshape(6, -1).to(dtype),
                               **tolerance)


def test_burnin_iters_gives_exactly_that_many_window_one_iterations():
    """The window a step really used: the burn-in steps and the first windowed step (whose
    window is still empty) normalize with the batch's own statistics, later ones do not."""
    for burnin in (0, 1, 2):
        model = conv_cbn(window_size=3, burnin_iters=burnin)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        conv, cbn = model
        announced, used = [], []
        for _ in range(4):
            announced.append(cbn.window)
            x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
            out = model(x)
            batch_norm = nn.functional.batch_norm(conv(x), None, None, cbn.weight, cbn.bias,
                                                  True, 0.0, cbn.eps)
            used.append(torch.allclose(out, batch_norm))
            sgd_step(model, out, optimizer)
        assert announced == [1] * burnin + [3] * (4 - burnin)
        assert used == [True] * (burnin + 1) + [False] * (3 - burnin)
    cbn.set_window(1)
    assert cbn.window == 1
    with pytest.raises(ValueError, match='window'):
        cbn.set_window(0)


def test_running_stats_are_window_aggregated_and_unbiased():
    model = conv_cbn(window_size=2, momentum=1.0)
    conv, cbn = model
    x1, x2 = (torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():  # no backward follows: every call is an iteration
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
    assert all(not m.detach_compensation for m in layers)  # the exact gradient by default
    assert layers[0].running_mean[0].item() == pytest.approx(0.3)
    assert not layers[1].weight.requires_grad
    for _ in range(3):
        converted(torch.randn(2, 3, 8, 8)).sum().backward()
    assert [m.steps for m in layers] == [3, 3]


def test_unpaired_layer_and_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match='window_size'):
        CrossIterationBatchNorm2d(4, window_size=0)
    with pytest.raises(ValueError, match='compensation'):
        CrossIterationBatchNorm2d(4, compensation='taylr')
    with pytest.raises(TypeError, match='detach_compensation=True'):
        CrossIterationBatchNorm2d(4, backprop_past_stats=True)
    unpaired = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1, 1)),
                             CrossIterationBatchNorm2d(4, window_size=2))
    with pytest.raises(RuntimeError, match=r"'2'.*pair_cbn_layers"):
        unpaired[2].layer_name = '2'
        unpaired(torch.randn(3, 4))
    # the failed call changed nothing
    assert unpaired[2].steps == 0 and unpaired[2].num_batches_tracked.item() == 0
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


def _conv_subclasses():
    from mmcv.cnn import ConvAWS2d, ConvWS2d
    from mmcv.cnn.bricks import Conv2dAdaptivePadding
    from mmcv.ops import SAConv2d
    return {'ConvWS2d': ConvWS2d(4, 6, 3, padding=1),
            'ConvAWS2d': ConvAWS2d(4, 6, 3, padding=1),
            'Conv2dAdaptivePadding': Conv2dAdaptivePadding(4, 6, 3, stride=2),
            'SAConv2d': SAConv2d(4, 6, 3, padding=1, use_deform=False)}


@pytest.mark.parametrize('name', ['ConvWS2d', 'ConvAWS2d', 'Conv2dAdaptivePadding', 'SAConv2d'])
def test_convs_that_transform_weight_or_input_are_refused(name):
    conv = _conv_subclasses()[name]
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(6, window_size=2))
    pair_cbn_layers(model)
    with pytest.raises(RuntimeError, match=f"{name}.*compensation='none'"):
        model(torch.randn(2, 4, 9, 9))
    assert model[1].steps == 0 and model[1].num_batches_tracked.item() == 0
    naive = nn.Sequential(conv, CrossIterationBatchNorm2d(6, window_size=2, compensation='none'))
    for _ in range(2):
        naive(torch.randn(2, 4, 9, 9)).sum().backward()


def test_plain_conv_wrappers_pair_and_train():
    from mmcv.cnn.bricks.wrappers import Conv2d
    for conv in (nn.Conv2d(4, 6, 3, padding=1), Conv2d(4, 6, 3, padding=1),
                 nn.Conv2d(4, 6, 3, padding='same', bias=True)):
        model = nn.Sequential(conv, CrossIterationBatchNorm2d(6, window_size=2))
        pair_cbn_layers(model)
        for _ in range(3):
            model(torch.randn(2, 4, 9, 9)).sum().backward()
        assert model[1].steps == 3


@pytest.mark.parametrize('new_window', [2, 5])
def test_changing_the_window_keeps_the_newest_records(new_window):
    model = conv_cbn(window_size=3)
    conv, cbn = model
    kwargs = conv_kwargs(conv)
    past = []
    for _ in range(4):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        with torch.no_grad():
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
    assert cbn.histories[0].slots == new_window - 1


@pytest.mark.parametrize('slots', [1, 2, 4])
def test_a_commit_advances_the_ring_past_a_written_slot_and_keeps_the_valid_ones(slots):
    """From every ring position: ``[free, filled, written] -> [(free + w) % P, min(filled + w,
    P - 1), 0]``; the window weighs the valid committed slots, never the free one."""
    physical = slots + 1
    for free, filled, written in itertools.product(range(physical), range(physical), (0, 1)):
        history = History(slots, 2, 1, 1, torch.device('cpu'), torch.float32)
        valid = [(free + 2 * slot) % 3 != 0 for slot in range(physical)]  # some slots empty
        history.valid.copy_(torch.tensor(valid, dtype=torch.float32))
        history.cursor.copy_(torch.tensor([free, filled, written]))
        history.commit()
        new_free = (free + written) % physical
        assert history.cursor.tolist() == [new_free, min(filled + written, slots), 0]
        weights = [float(v and slot != new_free) for slot, v in enumerate(valid)]
        assert history.slot_weight.tolist() == weights
        assert history.window.tolist() == [1 + sum(weights)]


def test_torch_compile_matches_eager():
    """``torch.compile`` (mmengine's ``compile=True``) compiles the model around each CBN
    layer's training forward, which runs eager (one graph break per layer: its state lives in
    Python); outputs and gradients equal eager over SGD steps, in training and in eval."""
    def stack():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                              CrossIterationBatchNorm2d(8, window_size=3),
                              nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                              CrossIterationBatchNorm2d(8, window_size=3)).double()
        pair_cbn_layers(model)
        return model

    eager, inner = stack(), stack()
    compiled = torch.compile(inner, backend='aot_eager')
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, inner)]
    for _ in range(5):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        grad = torch.randn(2, 8, 8, 8, dtype=torch.float64)
        outs = []
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            outs.append(model(x))
            outs[-1].backward(grad)
        # relative 1e-12: eager and compiled code sum the compensation in other orders
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
        for p, q in zip(eager.parameters(), inner.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12)
        for optimizer in optimizers:
            optimizer.step()
    assert inner[1].steps == 5
    eager.eval()
    inner.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)


def test_many_calls_without_backward_warn_once():
    model = conv_cbn(window_size=2)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match='64 times in one iteration'):
        for _ in range(64):
            model(x)
    assert model[1].steps == 1 and model[1].num_call_sites == 64
