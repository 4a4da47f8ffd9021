"""The closed-form statistic gradients, the compensation and the window normalization, against
autograd, the literal reference and the truth."""
import pytest
import torch
from torch import nn

from cbn_reference import compensated, conv_kwargs, stats_and_grads
from mmdet_cbn import functional
from mmdet_cbn.functional import (ConvGeometry, PastRecords, compensate, grad_var_wrt_weight,
                                  mean_input_patch, nonfinite, record_statistics,
                                  update_running_stats, window_normalize)

CONVS = {
    'plain': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    'strided': dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    'dilated': dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    'grouped': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    'biased_1x1': dict(in_channels=4, out_channels=6, kernel_size=1, bias=True),
    'strided_grouped_1x1': dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, groups=2),
    'rect_strided_grouped': dict(in_channels=6, out_channels=9, kernel_size=(3, 1),
                                 stride=(2, 1), padding=(1, 0), groups=3, bias=True),
    # few output positions for its depth at small maps: an unfolded d var / d W (CPU)
    'deep': dict(in_channels=64, out_channels=6, kernel_size=3, stride=2, padding=1),
}


def make(name, seed=0, batch=3, size=(11, 10)):
    torch.manual_seed(seed)
    kwargs = dict(bias=False, **CONVS[name]) if 'bias' not in CONVS[name] else CONVS[name]
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(batch, conv.in_channels, *size, dtype=torch.float64)
    return conv, x


def moments(y):
    return y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)


def record_of(conv, x):
    """The record of one iteration, stacked as a 1-slot window (``compensate``'s keywords)."""
    y = conv(x).detach()
    mean, var = moments(y)
    record = record_statistics(x, y, mean, var, conv.weight.detach(), ConvGeometry.of(conv))
    return dict(mean=record.mean[None], var_intercept=record.var_intercept[None],
                xbar=record.xbar[None], grad_var=record.grad_var[None])


@pytest.mark.parametrize('batch', [3, 6])  # Xbar sums the batch first above 4 images
@pytest.mark.parametrize('name', list(CONVS))
def test_closed_form_gradients_match_autograd(name, batch):
    conv, x = make(name, batch=batch)
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    mu, _, (dmu, dnu) = stats_and_grads(x, conv.weight, conv.bias, conv_kwargs(conv))
    dmu_ref = torch.stack([g[0].reshape(-1) for g in dmu])
    dvar_ref = torch.stack([g[0].reshape(-1) for g in dnu]) - 2 * mu[:, None] * dmu_ref
    xbar = mean_input_patch(x, geometry, y.shape[2:])
    per_group = conv.out_channels // conv.groups
    torch.testing.assert_close(xbar.repeat_interleave(per_group, 0), dmu_ref, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(grad_var_wrt_weight(x, y, mu, geometry), dvar_ref, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('name', ['plain', 'strided', 'dilated'])
def test_grad_var_on_a_deep_input_with_few_output_positions_matches_autograd(name, dtype):
    """A backbone's last stage at low resolution (depth D >= 16 N H' W'): the weight gradient
    is an unfolded product there (on the CPU); it equals autograd's d var / d W."""
    torch.manual_seed(0)
    kwargs = dict(CONVS[name], in_channels=64, bias=False)
    conv = nn.Conv2d(**kwargs).to(dtype)
    x = torch.randn(2, 64, 3, 3, dtype=dtype)
    y = conv(x).detach()
    geometry = ConvGeometry.of(conv)
    assert functional.DEPTH_PER_POSITION * y[:, 0].numel() <= geometry.depth(64)
    weight = conv.weight.detach().clone().requires_grad_()
    var = nn.functional.conv2d(x, weight, **conv_kwargs(conv)).var((0, 2, 3), unbiased=False)
    (expected,) = torch.autograd.grad(var.sum(), weight)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                                   atol=1e-6)
    torch.testing.assert_close(grad_var_wrt_weight(x, y, y.mean((0, 2, 3)), geometry),
                               expected.reshape(6, -1), **tolerance)


@pytest.mark.parametrize('deep', [False, True])
@pytest.mark.parametrize('name', ['plain', 'strided', 'dilated', 'rect_strided_grouped'])
def test_compiled_weight_gradient_operator_agrees_with_its_shape_function(name, deep):
    """The weight-gradient convolution compiled code calls as an opaque operator (so that
    inductor keeps channel counts symbolic): its result is autograd's weight gradient, and its
    fake (shape) function agrees with it, which ``torch.library.opcheck`` verifies, also for a
    channels-last input, and for a deep input with few output positions, where the operator
    computes an unfolded product (ungrouped convs)."""
    if deep:
        torch.manual_seed(0)
        conv = nn.Conv2d(**dict(CONVS[name], in_channels=64 * CONVS[name].get('groups', 1),
                                bias=False)).double()
        x = torch.randn(2, conv.in_channels, 3, 3, dtype=torch.float64)
    else:
        conv, x = make(name, batch=2, size=(7, 6))
    geometry = ConvGeometry.of(conv)
    y = conv(x)
    grad_y = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, conv.weight, grad_y)
    for layout in (torch.contiguous_format, torch.channels_last):
        args = (x.contiguous(memory_format=layout), grad_y.detach(), list(conv.weight.shape),
                list(geometry.stride), list(geometry.padding), list(geometry.dilation),
                geometry.groups)
        torch.testing.assert_close(torch.ops.mmdet_cbn.conv_weight_grad(*args), expected)
        torch.library.opcheck(torch.ops.mmdet_cbn.conv_weight_grad.default, args)
    few = functional._few_positions(x, y, list(conv.weight.shape), geometry.groups)
    assert few == (deep and geometry.groups == 1)


@pytest.mark.parametrize('name', list(CONVS))
def test_compensated_mean_is_exact_and_variance_error_is_second_order(name):
    conv, x_old = make(name)
    record = record_of(conv, x_old)
    torch.manual_seed(1)
    for step in (1e-2, 1e-3):
        dw = step * torch.randn_like(conv.weight)
        db = None if conv.bias is None else step * torch.randn_like(conv.bias)
        w_new = conv.weight.detach() + dw
        b_new = None if conv.bias is None else conv.bias.detach() + db
        mu_hat, var_hat, _ = compensate(w_new, b_new, **record)
        y_new = nn.functional.conv2d(x_old, w_new, b_new, **conv_kwargs(conv))
        mu_new, var_new = moments(y_new)
        torch.testing.assert_close(mu_hat[0], mu_new, rtol=1e-10, atol=1e-12)
        # Eq. 8 drops mean(conv(x_old; dW, db)^2) from nu, and mu_hat is exact
        second_order = nn.functional.conv2d(x_old, dw, db, **conv_kwargs(conv))
        torch.testing.assert_close(var_new - var_hat[0], second_order.square().mean((0, 2, 3)),
                                   rtol=1e-7, atol=1e-12)
        # and it agrees with the literal Taylor step of the reference (Eq. 7, 8)
        ref_mu, ref_nu = compensated(x_old, conv.weight.detach(), conv.bias, w_new, b_new,
                                     conv_kwargs(conv))
        torch.testing.assert_close(mu_hat[0], ref_mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var_hat[0], ref_nu - ref_mu.square(), rtol=1e-9,
                                   atol=1e-11)


@pytest.mark.parametrize('size', [(11, 10), (7, 5), (1, 1)])
@pytest.mark.parametrize('s', [2, 3])
@pytest.mark.parametrize('name', ['strided', 'plain', 'biased_1x1', 'strided_grouped_1x1',
                                  'deep'])
def test_sampled_grad_var_is_unbiased_for_every_map_size(name, s, size):
    """The average over all offsets is the exact ``d var / d W``, whether or not the stride
    divides the output size, and a map smaller than the offset gives an empty sample; also
    where the weight gradient is an unfolded product (``deep``: few output positions for the
    depth, at the smaller maps)."""
    conv, x = make(name, size=size)
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    mean = y.mean((0, 2, 3))
    exact = grad_var_wrt_weight(x, y, mean, geometry)
    sampled = [grad_var_wrt_weight(x, y, mean, geometry, stride=s, offset=(i, j))
               for i in range(s) for j in range(s)]
    torch.testing.assert_close(sum(sampled) / s ** 2, exact, rtol=1e-12, atol=1e-12)
    if y.shape[2] * y.shape[3] > 1:
        assert not torch.allclose(sampled[0], exact)


@pytest.mark.parametrize('images', [16, 19])
def test_sampled_grad_var_over_images_is_unbiased(images):
    """RoI heads: every s^2-th image from a drawn offset; unbiased for any number of RoIs."""
    conv, x = make('plain', batch=images, size=(5, 5))
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    mean, var = moments(y)
    weight = conv.weight.detach()
    exact = record_statistics(x, y, mean, var, weight, geometry).grad_var
    sampled = [record_statistics(x, y, mean, var, weight, geometry, grad_stride=2,
                                 draw=(i, 0)).grad_var for i in range(4)]
    torch.testing.assert_close(sum(sampled) / 4, exact, rtol=1e-12, atol=1e-12)


def test_stable_aggregation_equals_eq_10_and_clamps_each_slot():
    """``var_bar = mean(max(var_hat, 0)) + mean((mu_hat - mu_bar)^2)`` is Eq. 10's
    ``mean(max(nu_hat, mu_hat^2)) - mu_bar^2``; an invalid slot (weight 0) is ignored."""
    y = torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64).view(2, 2, 1, 1)
    mean = torch.tensor([[3.0, 2.0], [7.0, 5.0]], dtype=torch.float64)
    var = torch.tensor([[-8.0, 1.0], [4.0, 1.0]], dtype=torch.float64)  # slot 0 ch 0: < 0
    weights = torch.tensor([1.0, 0.0], dtype=torch.float64)
    past = PastRecords(mean, var, weights, 1 + weights.sum(), None, None)
    out, mu, v, window, clamped = window_normalize(y, None, None, 0.0, past=past)
    assert clamped.item() == 1  # slot 0, channel 0 (slot 1 is out of the window)
    mu_bar, var_bar = window
    torch.testing.assert_close((mu, v), moments(y))
    torch.testing.assert_close(mu_bar, torch.tensor([2.0, 2.0], dtype=torch.float64))
    nu = torch.stack([y.square().mean((0, 2, 3)), mean[0].square() + var[0].clamp_min(0)])
    torch.testing.assert_close(var_bar, nu.mean(0) - mu_bar.square())  # ch0 1, ch1 1.5
    torch.testing.assert_close(out[:, 0].flatten(), torch.tensor([-1.0, -1.0],
                                                                 dtype=torch.float64))


def test_window_normalize_backward_is_the_autograd_of_eq_7_11():
    """Gradients to ``y``, the affine parameters and, through the compensation, the conv weight
    and bias, equal autograd through the composite of Eq. 7-11 (gradcheck, float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    history = [record_of(conv, torch.randn(2, 4, 5, 5, dtype=torch.float64)) for _ in range(3)]
    past = {k: torch.cat([h[k] for h in history]) for k in history[0]}
    past['var_intercept'][1, 2] -= 50.0  # one slot clamped at 0
    weights = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    records = PastRecords(past['mean'], past['var_intercept'], weights, 1 + weights.sum(),
                          past['xbar'], past['grad_var'])
    y = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(6, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = (conv.weight.detach() + 0.05 * torch.randn_like(conv.weight)).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def composite(y, gamma, beta, w, b):
        mu_hat, var_hat, _ = compensate(w, b, **past)
        keep = weights.bool()
        mus = torch.cat([y.mean((0, 2, 3))[None], mu_hat[keep]])
        nus = torch.cat([y.square().mean((0, 2, 3))[None],
                         var_hat[keep].clamp_min(0) + mu_hat[keep].square()])
        mu_bar = mus.mean(0)
        std = torch.sqrt(nus.mean(0) - mu_bar.square() + 1e-5)
        return ((y - mu_bar.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1) * gamma.view(1, -1, 1, 1)
                + beta.view(1, -1, 1, 1))

    def fused(y, gamma, beta, w, b):
        return window_normalize(y, gamma, beta, 1e-5, weight=w, bias=b, past=records)[0]

    inputs = (y, gamma, beta, w, b)
    torch.testing.assert_close(fused(*inputs), composite(*inputs))
    assert torch.autograd.gradcheck(fused, inputs)
    g = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(fused(*inputs), inputs, g),
                               torch.autograd.grad(composite(*inputs), inputs, g))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_update_running_stats_is_bn_and_keeps_buffers_on_bad_statistics(dtype):
    running_mean, running_var = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    update_running_stats(running_mean, running_var,
                         torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]]), examples=5,
                         factor=0.1, keep=torch.tensor(True))
    tolerance = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else {}
    torch.testing.assert_close(running_mean, torch.tensor([0.1, 0.2, 0.3], dtype=dtype),
                               **tolerance)
    torch.testing.assert_close(running_var, torch.full((3,), 0.9 + 0.1 * 2.0 * 5 / 4,
                                                       dtype=dtype), **tolerance)
    before = running_mean.clone(), running_var.clone()
    update_running_stats(running_mean, running_var,
                         torch.tensor([[5.0, 1.0, 1.0], [7.0, 1.0, 1.0]]), examples=5,
                         factor=0.1, keep=torch.tensor(0.0))
    torch.testing.assert_close((running_mean, running_var), before, rtol=0, atol=0)


def test_nonfinite_flags_nan_and_both_infinities_only():
    big = torch.full((3,), torch.finfo(torch.float32).max)  # finite, but its sum overflows
    assert not nonfinite(big).item()
    assert not nonfinite(torch.full((4,), 6e4, dtype=torch.float16)).item()
    assert not nonfinite(torch.randn(4, 6)[:, 2]).item()  # strided
    for bad in (float('nan'), float('inf'), float('-inf')):
        t = torch.ones(2, 5)
        t[1, 3] = bad
        assert nonfinite(t).item()
        assert nonfinite(t.double()).item()
