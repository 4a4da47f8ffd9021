"""The closed-form statistic gradients and the compensation, against autograd and the truth."""
import pytest
import torch
from torch import nn

from cbn_reference import compensated, stats_and_grads
from mmdet_cbn.functional import (ConvGeometry, aggregate, compensate, grad_nu_wrt_weight,
                                  mean_input_patch)

CONVS = {
    'plain': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    'strided': dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    'dilated': dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    'grouped': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    'biased_1x1': dict(in_channels=4, out_channels=6, kernel_size=1, bias=True),
    'rect_strided_grouped': dict(in_channels=6, out_channels=9, kernel_size=(3, 1),
                                 stride=(2, 1), padding=(1, 0), groups=3, bias=True),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(bias=False, **CONVS[name]) if 'bias' not in CONVS[name] else CONVS[name]
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(3, conv.in_channels, 11, 10, dtype=torch.float64)
    return conv, x


def conv_kwargs(conv):
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups)


def history_of(conv, x):
    """What the layer records for one iteration, stacked as a 1-slot history."""
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    xbar = mean_input_patch(x, geometry, y.shape[2:])
    grad_nu = grad_nu_wrt_weight(x, y, geometry)
    mu, nu = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
    s = (grad_nu * conv.weight.detach().reshape(conv.out_channels, -1)).sum(1)
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros_like(mu)
    return (xbar[None], grad_nu[None], nu[None], mu[None], s[None], bias[None])


@pytest.mark.parametrize('name', list(CONVS))
def test_closed_form_gradients_match_autograd(name):
    conv, x = make(name)
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    _, _, (dmu, dnu) = stats_and_grads(x, conv.weight, conv.bias, conv_kwargs(conv))
    dmu_ref = torch.stack([g[0].reshape(-1) for g in dmu])
    dnu_ref = torch.stack([g[0].reshape(-1) for g in dnu])
    xbar = mean_input_patch(x, geometry, y.shape[2:])
    per_group = conv.out_channels // conv.groups
    torch.testing.assert_close(xbar.repeat_interleave(per_group, 0), dmu_ref, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(grad_nu_wrt_weight(x, y, geometry), dnu_ref, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize('name', list(CONVS))
def test_compensated_mean_is_exact_and_variance_error_is_second_order(name):
    conv, x_old = make(name)
    record = history_of(conv, x_old)
    torch.manual_seed(1)
    for step in (1e-2, 1e-3):
        dw = step * torch.randn_like(conv.weight)
        db = None if conv.bias is None else step * torch.randn_like(conv.bias)
        w_new = conv.weight.detach() + dw
        b_new = None if conv.bias is None else conv.bias.detach() + db
        mu_hat, nu_hat = compensate(w_new, b_new, *record)
        y_new = nn.functional.conv2d(x_old, w_new, b_new, **conv_kwargs(conv))
        torch.testing.assert_close(mu_hat[0], y_new.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
        second_order = nn.functional.conv2d(x_old, dw, db, **conv_kwargs(conv))
        torch.testing.assert_close(y_new.square().mean((0, 2, 3)) - nu_hat[0],
                                   second_order.square().mean((0, 2, 3)), rtol=1e-7,
                                   atol=1e-12)
        # and it agrees with the literal Taylor step of the reference (Eq. 7, 8)
        ref_mu, ref_nu = compensated(x_old, conv.weight.detach(), conv.bias, w_new, b_new,
                                     conv_kwargs(conv))
        torch.testing.assert_close(mu_hat[0], ref_mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(nu_hat[0], ref_nu, rtol=1e-10, atol=1e-12)


def test_sampled_grad_nu_is_unbiased_over_offsets():
    conv, x = make('strided')
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    exact = grad_nu_wrt_weight(x, y, geometry)
    s = 2
    sampled = [grad_nu_wrt_weight(x, y, geometry, s, (i, j)) for i in range(s) for j in range(s)]
    # every output position is in exactly one offset grid; equal grid sizes -> exact average
    h, w = y.shape[2:]
    counts = torch.tensor([len(range(i, h, s)) * len(range(j, w, s))
                           for i in range(s) for j in range(s)], dtype=torch.float64)
    weighted = sum(c * g for c, g in zip(counts, sampled)) / counts.sum()
    torch.testing.assert_close(weighted, exact, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(sampled[0], exact)


def test_aggregate_ignores_invalid_slots_and_clamps_variance():
    mu = torch.tensor([1.0, 2.0])
    nu = torch.tensor([2.0, 4.0])  # second channel has zero variance
    mu_hat = torch.tensor([[3.0, 2.0], [float('nan'), 5.0]])
    nu_hat = torch.tensor([[1.0, 4.0], [float('nan'), 1.0]])  # slot 0 ch 0: nu < mu^2
    mu_bar, var_bar, k = aggregate(mu, nu, mu_hat, nu_hat, torch.tensor([True, False]))
    assert k.item() == 2
    torch.testing.assert_close(mu_bar, torch.tensor([2.0, 2.0]))
    # nu_bar = (2 + max(1, 9)) / 2 = 5.5 -> var 1.5; channel 1: (4 + 4) / 2 - 4 = 0
    torch.testing.assert_close(var_bar, torch.tensor([1.5, 0.0]))
