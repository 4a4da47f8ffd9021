"""The closed-form statistic gradients and the compensation, against autograd and the truth."""
import pytest
import torch
from torch import nn

from cbn_reference import compensated, conv_kwargs, stats_and_grads
from mmdet_cbn.functional import (ConvGeometry, all_finite, compensate, grad_nu_wrt_weight,
                                  mean_input_patch, past_sums, window_normalize)

CONVS = {
    'plain': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    'strided': dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    'dilated': dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    'grouped': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    'biased_1x1': dict(in_channels=4, out_channels=6, kernel_size=1, bias=True),
    'strided_grouped_1x1': dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, groups=2),
    'rect_strided_grouped': dict(in_channels=6, out_channels=9, kernel_size=(3, 1),
                                 stride=(2, 1), padding=(1, 0), groups=3, bias=True),
}


def make(name, seed=0, batch=3):
    torch.manual_seed(seed)
    kwargs = dict(bias=False, **CONVS[name]) if 'bias' not in CONVS[name] else CONVS[name]
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(batch, conv.in_channels, 11, 10, dtype=torch.float64)
    return conv, x


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


@pytest.mark.parametrize('batch', [3, 6])  # Xbar sums the batch first above 4 images
@pytest.mark.parametrize('name', list(CONVS))
def test_closed_form_gradients_match_autograd(name, batch):
    conv, x = make(name, batch=batch)
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


@pytest.mark.parametrize('s', [2, 3])
@pytest.mark.parametrize('name', ['strided', 'biased_1x1', 'strided_grouped_1x1'])
def test_sampled_grad_nu_is_unbiased_over_offsets(name, s):
    conv, x = make(name)
    geometry = ConvGeometry.of(conv)
    y = conv(x).detach()
    exact = grad_nu_wrt_weight(x, y, geometry)
    sampled = [grad_nu_wrt_weight(x, y, geometry, s, (i, j)) for i in range(s) for j in range(s)]
    # every output position is in exactly one offset grid; equal grid sizes -> exact average
    h, w = y.shape[2:]
    counts = torch.tensor([len(range(i, h, s)) * len(range(j, w, s))
                           for i in range(s) for j in range(s)], dtype=torch.float64)
    weighted = sum(c * g for c, g in zip(counts, sampled)) / counts.sum()
    torch.testing.assert_close(weighted, exact, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(sampled[0], exact)


def test_window_aggregation_ignores_invalid_slots_and_clamps_variance():
    y = torch.tensor([1.0, 1.0, 1.0, 3.0]).view(2, 2, 1, 1)  # ch0: 1, 1 (mu 1, nu 1); ch1: 1, 3
    mu_hat = torch.tensor([[3.0, 2.0], [float('nan'), 5.0]])
    nu_hat = torch.tensor([[1.0, 5.0], [float('nan'), 1.0]])  # slot 0 ch 0: nu_hat < mu_hat^2
    past_mu, past_nu, k = past_sums(mu_hat, nu_hat, torch.tensor([True, False]))
    assert k.item() == 2
    torch.testing.assert_close(past_nu, torch.tensor([9.0, 5.0]))  # max(1, 3^2), max(5, 4)
    out, mu, nu, mu_bar, var_bar = window_normalize(y, None, None, past_mu, past_nu, k, 0.0)
    torch.testing.assert_close(mu_bar, torch.tensor([2.0, 2.0]))
    # ch0: nu_bar = (1 + 9) / 2 = 5 -> var 1; ch1: (5 + 5) / 2 - 4 = 1
    torch.testing.assert_close(var_bar, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, -1.0, -1.0, 1.0]))
    # inconsistent sums (only rounding can make them so): sigma2_bar is clamped at 0
    _, _, _, _, var_bar = window_normalize(torch.zeros(2, 1, 1, 1), None, None,
                                           torch.tensor([2.0]), torch.tensor([0.0]),
                                           torch.tensor(2.0), 1e-5)
    assert var_bar.item() == 0.0


def test_window_normalize_backward_is_the_autograd_of_eq_9_11():
    torch.manual_seed(0)
    y = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    past_mu, past_nu = torch.randn(4, dtype=torch.float64), 3 + torch.rand(4, dtype=torch.float64)
    k = torch.tensor(3.0, dtype=torch.float64)

    def composite(y, w, b):
        mu, nu = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
        mu_bar, nu_bar = (mu + past_mu) / k, (nu + past_nu) / k
        std = torch.sqrt(nu_bar - mu_bar.square() + 1e-5)
        return (y - mu_bar.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1) * w.view(1, -1, 1, 1) \
            + b.view(1, -1, 1, 1)

    def fused(y, w, b):
        return window_normalize(y, w, b, past_mu, past_nu, k, 1e-5)[0]

    torch.testing.assert_close(fused(y, w, b), composite(y, w, b))
    assert torch.autograd.gradcheck(fused, (y, w, b))
    g = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(fused(y, w, b), (y, w, b), g),
                               torch.autograd.grad(composite(y, w, b), (y, w, b), g))


def test_all_finite_flags_nan_and_both_infinities_only():
    big = torch.full((3,), torch.finfo(torch.float32).max)  # finite, but its sum overflows
    assert all_finite(big, torch.zeros(2, 2)).item()
    assert all_finite(torch.full((4,), 6e4, dtype=torch.float16)).item()
    for bad in (float('nan'), float('inf'), float('-inf')):
        t = torch.ones(5)
        t[3] = bad
        assert not all_finite(torch.zeros(2), t).item()
        assert not all_finite(t.double()).item()
