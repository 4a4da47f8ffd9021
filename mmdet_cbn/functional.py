"""Pure tensor math of Cross-Iteration Batch Normalization (paper Eq. 7-11, Appendix B).

Nothing here knows about modules, registries or mmdet: every function takes tensors and
returns tensors, so each piece can be checked against an independent reference. The
derivations are in ``docs/math.md``.

Notation: a CBN layer normalizes ``y = conv(x; W, b)`` with ``W`` of shape
``(C, C_in / g, kh, kw)``, ``x`` of shape ``(N, C_in, H, W)`` and ``y`` of shape
``(N, C, H', W')``; ``M = N * H' * W'`` examples per channel; ``D = C_in / g * kh * kw``;
``S`` past iterations ("slots") in the window. Statistics are per channel: the mean ``mu`` and
the centered (biased) variance ``var`` of ``y``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    'ConvGeometry', 'SlotRecord', 'stat_dtype', 'mean_input_patch', 'grad_var_wrt_weight',
    'record_statistics', 'compensate', 'PastRecords',
    'window_normalize', 'nonfinite', 'update_running_stats',
]


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of the 2-d convolution feeding a CBN layer."""

    weight_shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> 'ConvGeometry':
        """Read the geometry of ``conv`` (string paddings are resolved to integers)."""
        padding = conv.padding
        if isinstance(padding, str):
            if padding == 'valid':
                padding = (0, 0)
            else:  # 'same' with stride 1: total padding d * (k - 1), split as PyTorch does
                padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
                if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
                    raise ValueError("padding='same' with an even kernel span is not supported")
        if conv.padding_mode != 'zeros':
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported, only 'zeros'")
        return cls(tuple(conv.weight.shape), tuple(conv.stride), tuple(padding),
                   tuple(conv.dilation), conv.groups)

    @property
    def depth(self) -> int:
        """``D``: weights per output channel."""
        return math.prod(self.weight_shape[1:])


class SlotRecord(NamedTuple):
    """What one iteration leaves for the next ones (Eq. 7, 8 in the form of ``docs/math.md``).

    ``mean``, ``var_intercept``: ``(C,)``; ``xbar``: ``(g, D)`` mean input patch ``d mu / d W``;
    ``grad_var``: ``(C, D)`` ``d var / d W``. ``var_intercept = var - grad_var . W`` at that
    iteration, so that the compensated variance at weights ``W(t)`` is ``var_intercept +
    grad_var . W(t) - delta^2``. Without compensation ``xbar`` and ``grad_var`` are None and
    ``var_intercept = var``.
    """

    mean: Tensor
    var_intercept: Tensor
    xbar: Tensor | None
    grad_var: Tensor | None


def stat_dtype(t: Tensor) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 tensors, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _conv_weight_grad(x: Tensor, grad_y: Tensor, weight: Tensor, geometry: ConvGeometry,
                      stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """The weight gradient of ``conv2d`` for output gradient ``grad_y`` (one backward conv;
    ``weight`` gives the shape only)."""
    _, grad_w, _ = torch.ops.aten.convolution_backward.default(
        grad_y, x, weight, None, list(stride), list(padding), list(geometry.dilation), False,
        [0, 0], geometry.groups, [False, True, False])
    return grad_w


@functools.lru_cache(maxsize=256)
def _tap_rows(size: int, out_size: int, kernel: int, stride: int, padding: int,
              dilation: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(kernel, size)`` 0/1 matrix: which input rows (or columns) kernel tap ``a`` reads over
    all output positions, i.e. ``q * stride + a * dilation - padding`` inside the input.

    Cached: it depends on the geometry only.
    """
    with torch.inference_mode(False), torch.no_grad():
        taps = torch.arange(kernel, device=device).unsqueeze(1) * dilation
        rows = torch.arange(out_size, device=device) * stride - padding + taps
        inside = (rows >= 0) & (rows < size)
        out = torch.zeros(kernel, size + 1, device=device, dtype=dtype)
        out.scatter_(1, torch.where(inside, rows, size), 1.0)
        return out[:, :size]


def mean_input_patch(x: Tensor, geometry: ConvGeometry, out_hw: tuple[int, int], *,
                     out: Tensor | None = None) -> Tensor:
    """``Xbar`` of Appendix B: the mean input patch, ``d mu_c / d W_c`` for every channel ``c``.

    ``Xbar[j, i, u] = 1/M sum_{n,p} x_patch(n, i, p + u)`` for the input channels of group ``j``.
    Because the output gradient is all ones it is the same for every image and separable in
    the two spatial directions: with ``R[a, h] = 1`` when tap row ``a`` reads input row ``h``
    for some output row (and ``S`` likewise for columns),
    ``Xbar[i, a, b] = 1/M sum_{n,h,w} R[a, h] x[n, i, h, w] S[b, w]``: two matrix products, the
    first one reading ``x`` once, exact for any stride, padding and dilation.

    Returns ``(g, D)`` in :func:`stat_dtype` of ``x`` (written to ``out`` if given).
    """
    g = geometry.groups
    _, c_in_g, kh, kw = geometry.weight_shape
    dtype = stat_dtype(x)
    # many small maps (RoIs): sum the batch first; a few large ones (FPN levels): don't copy
    xf = x.sum(0, keepdim=True, dtype=dtype) if x.shape[0] > 4 else x.to(dtype)
    height, width = x.shape[2:]
    rows = _tap_rows(height, out_hw[0], kh, geometry.stride[0], geometry.padding[0],
                     geometry.dilation[0], xf.device, dtype)
    cols = _tap_rows(width, out_hw[1], kw, geometry.stride[1], geometry.padding[1],
                     geometry.dilation[1], xf.device, dtype)
    xbar = torch.matmul(rows, torch.matmul(xf, cols.t()).sum(0))  # (c, a, b)
    m = x.shape[0] * out_hw[0] * out_hw[1]
    return torch.div(xbar.reshape(g, c_in_g * kh * kw), m, out=out)


def grad_var_wrt_weight(x: Tensor, y: Tensor, mean: Tensor, geometry: ConvGeometry, *,
                        stride: int = 1, offset: tuple[int, int] = (0, 0),
                        weight: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``d var / d W``: the weight gradient of the conv for the output gradient ``2 (y - mu) / M``.

    ``grad_var[c, i, u] = 2/M sum_{n,p} (y(n, c, p) - mu_c) x_patch(n, i, p + u)``, ``(C, D)``.
    Centering ``y`` first keeps it free of the cancellation of ``d nu / d W - 2 mu Xbar``.

    With ``stride = s > 1`` only the output positions ``offset + s * q`` enter, weighted by
    ``s^2`` (their inverse probability of being drawn): the estimate is unbiased for every map
    size when ``offset`` is uniform in ``[0, s)^2``, and ``s^2`` times cheaper. In float32, or
    float64 for float64 inputs. ``weight`` (optional) is any tensor of the weight's shape;
    ``out`` (optional) receives the result.
    """
    dtype = stat_dtype(y)
    xf = x.to(dtype)
    centered = y.to(dtype) - mean.view(1, -1, 1, 1)
    (sh, sw), (ph, pw) = geometry.stride, geometry.padding
    m = y.shape[0] * y.shape[2] * y.shape[3]
    conv_stride, conv_padding = (sh, sw), (ph, pw)
    if stride > 1:
        oh, ow = offset
        centered = centered[:, :, oh::stride, ow::stride]
        if centered.numel() == 0:  # a map smaller than the offset: nothing drawn this time
            zeros = y.new_zeros(y.shape[1], geometry.depth, dtype=dtype)
            return zeros if out is None else out.copy_(zeros)
        if geometry.weight_shape[2:] == (1, 1) and (ph, pw) == (0, 0):
            # a 1x1 conv sees one input pixel per output position: gather those, then a
            # stride-1 weight gradient (cheaper than a strided one)
            hs, ws = centered.shape[2:]
            xf = xf[:, :, oh * sh::stride * sh, ow * sw::stride * sw][:, :, :hs, :ws]
            conv_stride = (1, 1)
        else:
            # zero padding, less what the offset skips (negative: a crop), in one copy
            xf = torch.nn.functional.pad(xf, (pw - ow * sw, pw, ph - oh * sh, ph))
            conv_stride = (sh * stride, sw * stride)
        conv_padding = (0, 0)
        m = m / stride ** 2
    if weight is None or weight.dtype != dtype:
        weight = xf.new_zeros(()).expand(geometry.weight_shape)
    grad_w = _conv_weight_grad(xf.contiguous(), centered.contiguous(), weight, geometry,
                               conv_stride, conv_padding)
    return torch.mul(grad_w.reshape(grad_w.shape[0], -1), 2.0 / m, out=out)


@functools.lru_cache(maxsize=64)
def _constant(shape: tuple[int, ...], value: float, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    """A cached constant tensor (read, never written)."""
    with torch.inference_mode(False):
        return torch.full(shape, value, device=device, dtype=dtype)


def record_statistics(x: Tensor | None, y: Tensor, mean: Tensor, var: Tensor,
                      weight: Tensor | None, geometry: ConvGeometry | None, *,
                      grad_stride: int = 1, draw: tuple[int, int] = (0, 0),
                      out: SlotRecord | None = None) -> SlotRecord:
    """The record of the current iteration: what compensating it later needs (no gradient).

    Args:
        x, y: the conv's input and output of this iteration (x unused without compensation).
        mean, var: ``(C,)`` statistics of ``y``.
        weight: the conv weight of this iteration, or None without compensation.
        geometry: the conv's geometry, or None without compensation.
        grad_stride: ``s``; above 1 ``grad_var`` is sampled (:func:`grad_var_wrt_weight`): with
            at least ``4 s^2`` images (RoI heads) every ``s^2``-th image from ``draw[0]``,
            else every ``s``-th position in each direction from ``draw``.
        draw: the random offsets in ``[0, s)``, ``[0, s^2)`` for images.
        out: tensors of the record's shapes the record is written to (a history slot), or
            None.
    """
    if out is not None:
        mean = out.mean.copy_(mean)
    if geometry is None:
        return SlotRecord(mean, var if out is None else out.var_intercept.copy_(var), None,
                          None)
    xbar = mean_input_patch(x, geometry, y.shape[2:], out=None if out is None else out.xbar)
    step = grad_stride ** 2
    grad_out = None if out is None else out.grad_var
    if grad_stride > 1 and y.shape[0] >= 4 * step:
        # every s^2-th image (RoI): a stride-1 conv; inverse inclusion probability s^2
        first = draw[0] % step
        grad_var = grad_var_wrt_weight(x[first::step], y[first::step], mean, geometry,
                                       weight=weight, out=grad_out)
        grad_var.mul_(y[first::step].shape[0] * step / y.shape[0])
    else:
        grad_var = grad_var_wrt_weight(x, y, mean, geometry, stride=grad_stride,
                                       offset=(draw[0] % grad_stride, draw[1] % grad_stride),
                                       weight=weight, out=grad_out)
    flat_weight = weight.reshape(weight.shape[0], -1).to(grad_var.dtype)
    var_intercept = torch.sub(var, torch.linalg.vecdot(grad_var, flat_weight),
                              out=None if out is None else out.var_intercept)
    return SlotRecord(mean, var_intercept, xbar, grad_var)


def compensate(weight: Tensor | None, bias: Tensor | None, *, mean: Tensor,
               var_intercept: Tensor, xbar: Tensor | None, grad_var: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Past statistics moved to the current weights (Eq. 7, 8), all slots at once.

    ``mu_hat = W(t) . Xbar + b(t)`` (exact: ``mu`` is linear in ``W``) and
    ``var_hat = var_intercept + grad_var . W(t) - (mu_hat - mu)^2``, i.e. Eq. 8 written for the
    centered variance (``docs/math.md``): it needs no old weights, and no large raw moment
    cancels. Differentiable in ``weight`` and ``bias``. Without compensation (``xbar`` None)
    the records are returned as they are.

    Args:
        weight: current conv weight ``(C, C_in/g, kh, kw)``; bias: ``(C,)`` or None.
        mean, var_intercept: ``(S, C)``; xbar: ``(S, g, D)``; grad_var: ``(S, C, D)``.

    Returns:
        ``(mu_hat, var_hat, delta)``, each ``(S, C)`` and new: ``var_hat`` not yet clamped at
        0 and ``delta = mu_hat - mu``, the change of the mean (None without compensation).
    """
    if xbar is None:
        return mean, var_intercept.clone(), None
    slots, groups, depth = xbar.shape
    flat = weight.reshape(weight.shape[0], depth).to(xbar.dtype)
    if groups == 1:  # (S, D) @ (D, C), plus the bias, in one product
        mu_hat = (torch.mm(xbar[:, 0], flat.t()) if bias is None
                  else torch.addmm(bias.to(xbar.dtype), xbar[:, 0], flat.t()))
    else:  # per group (g, c, D) @ (g, D, S) -> (S, C)
        mu_hat = torch.bmm(flat.view(groups, -1, depth), xbar.permute(1, 2, 0))
        mu_hat = mu_hat.reshape(-1, slots).t()
        if bias is not None:
            mu_hat = mu_hat + bias.to(xbar.dtype)
    delta = mu_hat - mean
    var_hat = torch.addcmul(var_intercept + torch.linalg.vecdot(grad_var, flat), delta, delta,
                            value=-1)
    return mu_hat, var_hat, delta


def _batch_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` in one stable pass of BatchNorm's own
    statistics kernel; ``var_mean`` where that kernel has no implementation (meta tensors,
    ``torch.compile`` tracing)."""
    if y.device.type == 'meta' or torch.compiler.is_compiling():
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        return mean, var
    return torch.batch_norm_update_stats(y, None, None, 0.0)


class PastRecords(NamedTuple):
    """The window's past slots as the normalization reads them (none of them needs grad)."""

    mean: Tensor  # (P, C)
    var_intercept: Tensor  # (P, C)
    slot_weight: Tensor  # (P,) 1 for a record in the window, 0 for an empty, discarded or free slot
    window: Tensor  # () k = 1 + sum(slot_weight): iterations aggregated
    xbar: Tensor | None  # (P, g, D)
    grad_var: Tensor | None  # (P, C, D)


class _WindowNormalize(torch.autograd.Function):
    """Eq. 7-11 in one node: compensation, aggregation, normalization, closed-form backward.

    Forward: the current statistics (one stable reduction pass), the compensated past slots,
    ``mu_bar = (mu + sum_j mu_hat_j) / k`` and, by the parallel-variance rule,
    ``var_bar = (var + (mu - mu_bar)^2 + sum_j [max(var_hat_j, 0) + (mu_hat_j - mu_bar)^2]) / k``
    (equal to Eq. 10's ``nu_bar - mu_bar^2``), then BatchNorm's eval kernel with them.

    Backward: BatchNorm's *training-mode* backward kernel, whose input gradient
    ``g*A + (y - m)*B + C`` has the right shape; fed ``mu_bar``, ``inv_std / sqrt(k)`` and
    ``gamma * sqrt(k)``, it gives Eq. 9-11's ``A`` and ``B`` (the moments' paths carry weight
    ``1/k``) and misses ``C`` by a per-channel constant, added in one pass. With the gradient
    through the compensation, ``d L / d mu_hat_j`` and ``d L / d var_hat_j`` go to the conv
    weight through ``d mu_hat / d W = Xbar`` and ``d var_hat / d W = grad_var - 2 delta Xbar``
    (bias: ``1`` and ``-2 delta``): two small products.
    """

    @staticmethod
    def forward(ctx, y, gamma, beta, weight, bias, past, eps, on_backward, clamped):
        dtype = stat_dtype(y)
        y_stats = y if y.dtype == dtype else y.to(dtype)
        mean, var = _batch_moments(y_stats)
        if past is None:  # k = 1: the batch is the window
            k, mu_bar, var_bar = None, mean, var
        else:
            mu_hat, var_hat, delta = compensate(
                weight, bias, mean=past.mean, var_intercept=past.var_intercept,
                xbar=past.xbar, grad_var=past.grad_var)
            w, k = past.slot_weight, past.window
            if clamped is not None:  # a diagnostic: compensated variances below 0, of all
                in_window = w > 0
                clamped[0].add_(var_hat.lt(0).logical_and_(in_window.unsqueeze(1)).sum())
                clamped[1].add_(in_window.sum() * var_hat.shape[1])
            mu_bar = torch.addmv(mean, mu_hat.t(), w).div_(k)
            spread, gap = mu_hat - mu_bar, mean - mu_bar
            var_bar = torch.addmv(torch.addcmul(var, gap, gap),
                                  torch.addcmul(var_hat.clamp_min_(0), spread, spread).t(),
                                  w).div_(k)
            if weight is not None and weight.requires_grad:
                ctx.past, ctx.slot_terms = past, (spread, var_hat, delta)
        out = torch.batch_norm(y, gamma, beta, mu_bar, var_bar, False, 0.0, eps, True)
        ctx.save_for_backward(y, gamma, mu_bar, var_bar)
        ctx.eps, ctx.k, ctx.on_backward = eps, k, on_backward
        ctx.weight_shape = None if weight is None else weight.shape
        window = torch.stack([mu_bar, var_bar])
        ctx.mark_non_differentiable(mean, var, window)
        ctx.set_materialize_grads(False)
        return out, mean, var, window

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused):
        if ctx.on_backward is not None:
            ctx.on_backward()
        if grad_out is None:  # only the (non-differentiable) statistics were used
            return (None,) * 9
        y, gamma, mu_bar, var_bar = ctx.saved_tensors
        inv_std = (var_bar + ctx.eps).rsqrt_()
        if gamma is None:
            gamma = torch.ones_like(inv_std)
        elif gamma.dtype != inv_std.dtype:
            gamma = gamma.to(inv_std.dtype)
        k = ctx.k
        if k is None:  # BatchNorm's backward
            grad_y, grad_gamma, g_sum = torch.ops.aten.native_batch_norm_backward.default(
                grad_out, y, gamma, None, None, mu_bar, inv_std, True, ctx.eps,
                [True, True, True])
            return _input_grads(ctx, grad_y, grad_gamma, g_sum)
        root_k = k.sqrt()
        # BN's training backward with batch mean m, inverse std s and weight w returns
        # (g - sum(g)/M - (y - m) s^2 sum(g (y - m))/M) s w,  sum(g (y - m)) s,  sum(g).
        grad_y, grad_w, g_sum = torch.ops.aten.native_batch_norm_backward.default(
            grad_out, y, gamma * root_k, None, None, mu_bar, inv_std / root_k, True, ctx.eps,
            [True, True, True])
        gamma_inv_std = gamma * inv_std
        neg_grad_mu_bar = gamma_inv_std * g_sum
        # Eq. 9-11 subtract sum(g)/(k M) where the kernel subtracted sum(g)/M.
        count = y.numel() // y.shape[1]
        shift = torch.sub(neg_grad_mu_bar, neg_grad_mu_bar / k).div_(count)
        grad_y.add_(shift.to(grad_y.dtype).view(1, -1, 1, 1))
        grad_gamma = grad_w.mul_(root_k)  # sum(g (y - mu_bar)) * inv_std
        if not hasattr(ctx, 'slot_terms'):
            return _input_grads(ctx, grad_y, grad_gamma, g_sum)
        grad_weight, grad_bias = _grad_through_compensation(
            ctx.past, *ctx.slot_terms, neg_grad_mu_bar=neg_grad_mu_bar,
            grad_var_bar_2=gamma_inv_std.mul_(inv_std).mul_(grad_gamma))
        return _input_grads(ctx, grad_y, grad_gamma, g_sum, grad_weight.view(ctx.weight_shape),
                            grad_bias)


def _input_grads(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients of ``_WindowNormalize``'s inputs: None where an input needs none."""
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (
        len(needs) - len(grads))


def _grad_through_compensation(past: PastRecords, spread: Tensor, var_hat: Tensor,
                               delta: Tensor, *, neg_grad_mu_bar: Tensor,
                               grad_var_bar_2: Tensor) -> tuple[Tensor, Tensor]:
    """``d L / d W`` and ``d L / d b`` through the compensated past slots (Eq. 7, 8).

    With ``a = -d L / d mu_bar`` and ``q = -2 d L / d var_bar`` (``grad_var_bar_2``):
    ``d L / d mu_hat_j = -w_j / k (a + q (mu_hat_j - mu_bar))`` and
    ``d L / d var_hat_j = -w_j / k q / 2 [var_hat_j > 0]``; ``mu_hat`` is linear in ``W`` with
    slope ``Xbar`` and ``var_hat`` has slope ``grad_var - 2 delta Xbar``, so the slope of
    ``Xbar`` is ``-(w_j / k (a + q spread_j) - [var_hat_j > 0] w_j / k q delta_j)``.
    """
    w = (past.slot_weight / past.window).unsqueeze(1)  # (S, 1): w_j / k
    half_var = (w * (var_hat > 0)).mul_(grad_var_bar_2)  # -2 d L / d var_hat_j; var_hat >= 0
    neg_slope = torch.addcmul(neg_grad_mu_bar, grad_var_bar_2, spread).mul_(w)
    neg_slope.addcmul_(half_var, delta, value=-1)
    slots, groups, depth = past.xbar.shape
    # sum_j half_var_j grad_var_j as one broadcast product and sum (a strided batched product
    # would run per channel on the CPU)
    from_grad_var = torch.mul(half_var.unsqueeze(2), past.grad_var).sum(0)
    if groups == 1:
        grad_weight = torch.addmm(from_grad_var, neg_slope.t(), past.xbar[:, 0], beta=-0.5,
                                  alpha=-1)
    else:
        channels = neg_slope.shape[1]
        from_xbar = torch.bmm(neg_slope.t().reshape(groups, channels // groups, slots),
                              past.xbar.transpose(0, 1)).reshape(channels, depth)
        grad_weight = torch.add(from_xbar, from_grad_var, alpha=0.5).neg_()
    return grad_weight, neg_slope.sum(0).neg_()


def window_normalize(y: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, *,
                     weight: Tensor | None = None, bias: Tensor | None = None,
                     past: PastRecords | None = None,
                     on_backward: Callable[[], None] | None = None,
                     clamped: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``y`` with the statistics of the window (Eq. 7-11).

    Args:
        y: ``(N, C, H, W)`` the current conv output.
        gamma, beta: ``(C,)`` the affine parameters, or None.
        eps: added to the variance.
        weight, bias: the current conv weight and bias the past slots are compensated to.
            The gradient flows through the compensation into them unless they are detached.
        past: the past slots, or None (then this is BatchNorm's training forward).
        on_backward: called when the backward runs (how a layer learns an iteration ended).
        clamped: ``(2,)`` integer counter, or None: adds the number of compensated past
            variances below 0 (clamped to 0 in Eq. 10) and the number of compensated past
            variances (slots in the window x channels), without a host sync.

    Returns:
        ``(out, mean, var, window)``: the normalized ``y`` (dtype of ``y``) and, detached,
        the batch's mean and variance ``(C,)`` and the window's ``(2, C)`` (``mu_bar``,
        ``var_bar``); float32, or float64 for float64 ``y``.
    """
    return _WindowNormalize.apply(y, gamma, beta, weight, bias, past, eps, on_backward,
                                  clamped)


def nonfinite(t: Tensor) -> Tensor:
    """0-d bool tensor: some element of ``t`` is NaN or infinite, without a host sync.

    ``0 * t`` is 0 for finite elements and NaN otherwise, so the dot product of the elements
    with zeros is exactly 0 iff all are finite, else NaN (a sum of the values could overflow).
    """
    flat = t.reshape(-1)
    return torch.dot(flat, _constant(flat.shape, 0.0, flat.device, flat.dtype)).isnan()


def update_running_stats(running_mean: Tensor, running_var: Tensor, window: Tensor, *,
                         examples: int, factor: Tensor | float, keep: Tensor) -> None:
    """BatchNorm's running-average step, in place: ``r <- r + factor (stat - r)``.

    ``window`` is ``(2, C)``: the mean and the biased variance, which enters unbiased,
    ``var * n / (n - 1)`` with ``n = examples`` per channel. Where ``keep`` (0-d, bool or 0/1)
    is false the step is 0 and the buffers stay as they are, without a host sync; ``window``
    must then be finite (``0 * nan`` is nan).
    """
    step = keep * factor
    running_mean.lerp_(window[0].to(running_mean.dtype), step)
    unbiased = window[1] * (examples / max(examples - 1, 1))
    running_var.lerp_(unbiased.to(running_var.dtype), step)
