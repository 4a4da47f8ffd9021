"""A slow, literal implementation of CBN (paper Eq. 7-10) used as the independent reference.

It keeps what the authors' code keeps: the old weights, bias and input of every past iteration,
and gets ``d mu / d W`` and ``d nu / d W`` from ``torch.autograd.grad``. Nothing from
``mmdet_cbn`` is used here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_kwargs(module):
    """The geometry of an ``nn.Conv2d`` as keyword arguments of ``F.conv2d``."""
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups)


def conv(x, weight, bias, conv_kwargs):
    return F.conv2d(x, weight, bias, **conv_kwargs)


def stats_and_grads(x, weight, bias, conv_kwargs):
    """``mu``, ``nu`` of ``conv(x)`` and their autograd derivatives w.r.t. weight and bias."""
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = conv(x, w, b, conv_kwargs)
    mu, nu = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
    inputs = [w] if b is None else [w, b]
    grads = []
    for moment in (mu, nu):
        per_channel = []
        for c in range(moment.shape[0]):
            g = torch.autograd.grad(moment[c], inputs, retain_graph=True)
            per_channel.append((g[0][c], None if b is None else g[1][c]))
        grads.append(per_channel)
    return mu.detach(), nu.detach(), grads


def compensated(x_old, w_old, b_old, w_new, b_new, conv_kwargs):
    """Eq. 7 and 8 for one past iteration: ``(mu_hat, nu_hat)``."""
    mu, nu, (dmu, dnu) = stats_and_grads(x_old, w_old, b_old, conv_kwargs)
    dw = w_new - w_old
    db = None if b_new is None else b_new - b_old
    mu_hat, nu_hat = mu.clone(), nu.clone()
    for c in range(mu.shape[0]):
        mu_hat[c] += (dmu[c][0] * dw[c]).sum()
        nu_hat[c] += (dnu[c][0] * dw[c]).sum()
        if db is not None:
            mu_hat[c] += dmu[c][1] * db[c]
            nu_hat[c] += dnu[c][1] * db[c]
    return mu_hat, nu_hat


def literal_cbn(y, past, w_new, b_new, conv_kwargs, gamma, beta, eps, compensation='taylor'):
    """Eq. 9-11 for the current output ``y`` and ``past = [(x, W, b), ...]`` iterations."""
    mu = y.mean((0, 2, 3))
    nu = y.square().mean((0, 2, 3))
    mus, nus = [mu], [torch.maximum(nu, mu.square())]
    for x_old, w_old, b_old in past:
        if compensation == 'taylor':
            mu_hat, nu_hat = compensated(x_old, w_old, b_old, w_new, b_new, conv_kwargs)
        else:
            mu_hat, nu_hat, _ = stats_and_grads(x_old, w_old, b_old, conv_kwargs)
        mus.append(mu_hat)
        nus.append(torch.maximum(nu_hat, mu_hat.square()))
    mu_bar = torch.stack(mus).mean(0)
    var_bar = torch.stack(nus).mean(0) - mu_bar.square()
    out = (y - mu_bar[None, :, None, None]) / torch.sqrt(var_bar[None, :, None, None] + eps)
    return out * gamma[None, :, None, None] + beta[None, :, None, None]
