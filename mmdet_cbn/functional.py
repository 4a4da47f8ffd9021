"""Pure tensor math of Cross-Iteration Batch Normalization (paper Eq. 7-11, Appendix B).

Nothing here knows about modules, registries or mmdet: every function takes tensors and
returns tensors, so each piece can be checked against an independent reference.

Notation (see ``CBN_MATH.md``): a CBN layer normalizes ``y = conv(x; W, b)`` with
``W`` of shape ``(C, C_in / g, kh, kw)``, ``x`` of shape ``(N, C_in, H, W)`` and ``y`` of
shape ``(N, C, H', W')``; ``M = N * H' * W'`` examples per channel; ``D = C_in / g * kh * kw``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    'ConvGeometry', 'mean_input_patch', 'grad_nu_wrt_weight', 'compensate', 'past_sums',
    'all_finite', 'window_normalize', 'stat_dtype',
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


def stat_dtype(t: Tensor) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 tensors, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _conv_weight_grad(x: Tensor, grad_y: Tensor, weight_shape: tuple[int, ...],
                      stride: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int], groups: int) -> Tensor:
    """The weight gradient of ``conv2d`` for output gradient ``grad_y`` (one backward conv)."""
    dummy = x.new_zeros(()).expand(weight_shape)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, x, dummy, None, list(stride), list(padding), list(dilation), False, [0, 0],
        groups, [False, True, False])
    return grad_w


@functools.lru_cache(maxsize=256)
def _tap_rows(size: int, out_size: int, kernel: int, stride: int, padding: int,
              dilation: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(kernel, size)`` 0/1 matrix: which input rows (or columns) kernel tap ``a`` reads over
    all output positions, i.e. ``q * stride + a * dilation - padding`` inside the input.

    Cached: it depends on the geometry only, and building it costs a dozen small kernels.
    """
    with torch.inference_mode(False), torch.no_grad():
        taps = torch.arange(kernel, device=device).unsqueeze(1) * dilation
        rows = torch.arange(out_size, device=device) * stride - padding + taps
        inside = (rows >= 0) & (rows < size)
        out = torch.zeros(kernel, size + 1, device=device, dtype=dtype)
        out.scatter_(1, torch.where(inside, rows, size), 1.0)
        return out[:, :size]


def mean_input_patch(x: Tensor, geometry: ConvGeometry, out_hw: tuple[int, int]) -> Tensor:
    """``Xbar`` of Appendix B: the mean input patch, ``d mu_c / d W_c`` for every channel ``c``.

    ``Xbar[j, i, u] = 1/M sum_{n,p} x_patch(n, i, p + u)`` for the input channels of group ``j``.
    Because the output gradient is all ones it is the same for every image and separable in
    the two spatial directions: with ``R[a, h] = 1`` when tap row ``a`` reads input row ``h``
    for some output row (and ``S`` likewise for columns),
    ``Xbar[i, a, b] = 1/M sum_{n,h,w} R[a, h] x[n, i, h, w] S[b, w]``: two matrix products, the
    first one reading ``x`` once, exact for any stride, padding and dilation.

    Returns a tensor of shape ``(g, D)`` in the dtype of ``x`` promoted to at least float32.
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
    return xbar.reshape(g, c_in_g * kh * kw) / m


def grad_nu_wrt_weight(x: Tensor, y: Tensor, geometry: ConvGeometry, stride: int = 1,
                       offset: tuple[int, int] = (0, 0)) -> Tensor:
    """``G = d nu / d W`` of Appendix B: the weight-gradient of the conv for ``2 y / M``.

    ``G[c, i, u] = 2/M sum_{n,p} y(n, c, p) x_patch(n, i, p + u)`` with shape ``(C, D)``.

    With ``stride = s > 1`` it is estimated from the output positions ``offset + s * q`` only
    (``s^2`` times cheaper; unbiased when the offset is drawn uniformly in ``[0, s)^2``).
    Computed in float32 (or float64 when the inputs are float64).
    """
    dtype = stat_dtype(y)
    xf, yf = x.to(dtype), y.to(dtype)
    (sh, sw), (ph, pw) = geometry.stride, geometry.padding
    if stride == 1:
        grad_y = yf
        conv_stride, conv_padding = (sh, sw), (ph, pw)
    else:
        oh, ow = offset
        grad_y = yf[:, :, oh::stride, ow::stride]
        if geometry.weight_shape[2:] == (1, 1) and (ph, pw) == (0, 0):
            # a 1x1 conv sees one input pixel per output position: gather those, then a
            # stride-1 weight gradient (oneDNN's strided one is slower than the exact G here)
            hs, ws = grad_y.shape[2:]
            xf = xf[:, :, oh * sh::stride * sh, ow * sw::stride * sw][:, :, :hs, :ws].contiguous()
            conv_stride = (1, 1)
        else:
            # zero padding, less what the offset skips (negative: a crop), in one copy
            xf = torch.nn.functional.pad(xf, (pw - ow * sw, pw, ph - oh * sh, ph))
            conv_stride = (sh * stride, sw * stride)
        conv_padding = (0, 0)
    m = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    grad_w = _conv_weight_grad(xf, grad_y.contiguous(), geometry.weight_shape, conv_stride,
                               conv_padding, geometry.dilation, geometry.groups)
    return grad_w.reshape(grad_w.shape[0], -1).mul_(2.0 / m)


def compensate(weight: Tensor, bias: Tensor | None, xbar: Tensor, grad_nu: Tensor, nu: Tensor,
               mu: Tensor, grad_dot_weight: Tensor, old_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Taylor compensation of past statistics to the current weights (Eq. 7, 8), all slots at once.

    Uses the history identity of ``CBN_MATH.md``: with ``s_c = G_c . W_c`` recorded with the
    slot, ``mu_hat_c = W_c(t) . Xbar + b_c(t)`` (exact, ``mu`` is linear in ``W``) and
    ``nu_hat_c = nu_c + G_c . W_c(t) - s_c + 2 mu_c (b_c(t) - b_c)``, which equals Eq. 8 for the
    exact ``G`` and needs no copy of old weights.

    Args:
        weight: current conv weight ``(C, C_in/g, kh, kw)`` (detached by the caller).
        bias: current conv bias ``(C,)`` or None.
        xbar: ``(S, g, D)`` mean input patches of ``S`` past iterations.
        grad_nu: ``(S, C, D)`` their ``d nu / d W``.
        nu, mu: ``(S, C)`` their raw moments.
        grad_dot_weight: ``(S, C)`` ``s_c = G_c . W_c`` at the time of each slot.
        old_bias: ``(S, C)`` the conv bias at the time of each slot (zeros without bias).

    Returns:
        ``(mu_hat, nu_hat)``, each ``(S, C)``.
    """
    groups = xbar.shape[1]
    w = weight.reshape(groups, weight.shape[0] // groups, -1).to(xbar.dtype)
    # batched matrix products rather than einsum, whose set-up costs more than these small sums
    mu_hat = torch.bmm(w, xbar.permute(1, 2, 0)).reshape(-1, xbar.shape[0]).t()  # (g,c,S)->(S,C)
    flat_w = w.reshape(weight.shape[0], 1, -1)
    nu_hat = nu + torch.bmm(flat_w, grad_nu.permute(1, 2, 0)).squeeze(1).t()  # (C,1,S)->(S,C)
    nu_hat = nu_hat - grad_dot_weight
    if bias is not None:
        b = bias.to(xbar.dtype)
        mu_hat = mu_hat + b
        nu_hat = nu_hat + 2 * mu * (b - old_bias)
    return mu_hat, nu_hat


def past_sums(mu_hat: Tensor, nu_hat: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The past iterations' share of the window aggregation (Eq. 9, 10).

    Args:
        mu_hat, nu_hat: ``(S, C)`` compensated past moments (detached).
        valid: ``(S,)`` bool, which slots hold a finite record; invalid ones are ignored.

    Returns:
        ``(sum mu_hat, sum max(nu_hat, mu_hat^2), k)`` over the valid slots, each ``(C,)``,
        and ``k = 1 + #valid``, the number of aggregated iterations (0-d tensor).
    """
    moments = torch.stack([mu_hat, torch.maximum(nu_hat, mu_hat.square())])
    sums = torch.where(valid.view(1, -1, 1), moments, 0).sum(1)
    return sums[0], sums[1], 1 + valid.sum(dtype=mu_hat.dtype)


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool tensor: no element of ``tensors`` is NaN or infinite, without a host sync.

    ``t - t`` is 0 for finite elements and NaN otherwise, so its sum is exactly 0 iff all are
    finite. The (small) tensors are concatenated first: four kernels in all, where
    ``isfinite(t).all()`` takes five per tensor.
    """
    flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0]
    return (flat - flat).sum(dtype=stat_dtype(flat)) == 0


@functools.lru_cache(maxsize=256)
def _zeros_and_ones(channels: int, device: torch.device, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
    """Constant ``(C,)`` zeros and ones for :func:`_channel_sums` (read, never written)."""
    with torch.inference_mode(False):
        return (torch.zeros(channels, device=device, dtype=dtype),
                torch.ones(channels, device=device, dtype=dtype))


def _channel_sums(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum y, sum y^2)`` per channel in one pass of BatchNorm's backward reduction kernel.

    ``native_batch_norm_backward`` in eval mode returns ``grad_bias = sum(g)`` and
    ``grad_weight = sum(g * (y - mean) * invstd)``; with ``g = y``, ``mean = 0``,
    ``invstd = 1`` (``var = 1``, ``eps = 0``) these are the two raw sums. One fused read of
    ``y``, where ``y.mean`` + ``y.square().mean`` (or ``var_mean``) take 3-10x longer on CPU.
    The CPU kernel reads mean and variance from the running-stat arguments, the CUDA kernel from
    the saved-stat ones (and needs a weight), so all get the same zeros and ones.
    """
    zeros, ones = _zeros_and_ones(y.shape[1], y.device, stat_dtype(y))
    _, sum_sq, sum_ = torch.ops.aten.native_batch_norm_backward(
        y, y, ones, zeros, ones, zeros, ones, False, 0.0, [False, True, True])
    return sum_, sum_sq


class _WindowNormalize(torch.autograd.Function):
    """Eq. 9-11 for the current batch with fixed past sums, forward and backward in closed form.

    Built on BatchNorm's own CPU/CUDA kernels. Forward: one reduction pass for the raw sums, then
    BN's eval-mode kernel with the window statistics. Backward: BN's *training-mode* backward
    kernel, whose input gradient ``g*A + (y - mu)*B + C`` has the right shape; fed the window
    mean, ``inv_std / sqrt(k)`` and ``gamma * sqrt(k)``, it gives Eq. 9-11's ``A`` and ``B``
    (the moments' paths carry weight ``1/k``) and misses ``C`` by a per-channel constant, added
    in one pass.

    The clamp of ``sigma2_bar`` at 0 only guards rounding: by Cauchy-Schwarz the aggregated
    variance is non-negative in exact arithmetic (every aggregated ``nu >= mu^2``), so the
    backward is that of the unclamped expression.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, past_mu, past_nu, k, eps):
        count = y.numel() // y.shape[1]
        sum_, sum_sq = _channel_sums(y)
        mu, nu = sum_ / count, sum_sq / count
        mu_bar = (mu + past_mu) / k
        var_bar = ((nu + past_nu) / k - mu_bar.square()).clamp_min(0)
        out = torch.nn.functional.batch_norm(y, mu_bar, var_bar, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(y, weight, mu_bar, var_bar, k)
        ctx.count, ctx.eps = count, eps
        ctx.mark_non_differentiable(mu, nu, mu_bar, var_bar)
        return out, mu, nu, mu_bar, var_bar

    @staticmethod
    def backward(ctx, grad_out, *unused):
        y, weight, mu_bar, var_bar, k = ctx.saved_tensors
        inv_std = torch.rsqrt(var_bar + ctx.eps)
        gamma = torch.ones_like(inv_std) if weight is None else weight.to(inv_std.dtype)
        k = k.to(inv_std.dtype)
        root_k = k.sqrt()
        # BN's training backward with batch mean m, inverse std s and weight w returns
        # (g - sum(g)/M - (y - m) s^2 sum(g (y - m))/M) s w,  sum(g (y - m)) s,  sum(g).
        grad_y, grad_w, g_sum = torch.ops.aten.native_batch_norm_backward(
            grad_out, y, gamma * root_k, None, None, mu_bar, inv_std / root_k, True, ctx.eps,
            [True, True, True])
        # Eq. 9-11 subtract sum(g)/(k M) where the kernel subtracted sum(g)/M.
        shift = gamma * inv_std * g_sum * ((k - 1) / (k * ctx.count))
        grad_y.add_(shift.to(grad_y.dtype).view(1, -1, *([1] * (y.dim() - 2))))
        grad_gamma = grad_w * root_k  # sum(g (y - mu_bar)) * inv_std
        grad_past_mu = grad_past_nu = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            d_var = -0.5 * inv_std.square() * gamma * grad_gamma
            grad_past_nu = d_var / k
            grad_past_mu = (-gamma * inv_std * g_sum - 2 * mu_bar * d_var) / k
        return (grad_y, grad_gamma if ctx.needs_input_grad[1] else None,
                g_sum if ctx.needs_input_grad[2] else None, grad_past_mu, grad_past_nu, None, None)


def window_normalize(y: Tensor, weight: Tensor | None, bias: Tensor | None, past_mu: Tensor,
                     past_nu: Tensor, k: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``y`` with the statistics aggregated over the window (Eq. 9-11).

    Args:
        y: ``(N, C, H, W)`` the current conv output; gradients flow through its moments.
        weight, bias: ``(C,)`` the affine parameters, or None.
        past_mu: ``(C,)`` sum of the valid compensated past means ``mu_hat``.
        past_nu: ``(C,)`` sum of the valid ``max(nu_hat, mu_hat^2)``. Both are constants in the
            paper; if they require grad, their gradients are returned too.
        k: number of aggregated iterations, the current one included (0-d tensor).
        eps: added to the variance.

    Returns:
        ``(out, mu, nu, mu_bar, sigma2_bar)``: the normalized ``y`` (dtype of ``y``), the
        current raw moments and the aggregated mean and variance (detached, float32 or float64).
    """
    return _WindowNormalize.apply(y, weight, bias, past_mu, past_nu, k, eps)
