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
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    'ConvGeometry', 'SlotRecord', 'stat_dtype', 'mean_input_patch', 'grad_var_wrt_weight',
    'record_statistics', 'compensate', 'PastRecords', 'window_normalize', 'nonfinite',
    'update_running_stats', 'record_layout', 'RingState', 'StepOptions', 'training_step',
    'PooledMoments', 'pool_moments', 'gather_moments',
]


class ConvGeometry(NamedTuple):
    """The hyper-parameters of the 2-d convolution feeding a CBN layer (plain numbers: layers
    of one architecture share a handful of them, and so does compiled code)."""

    kernel_size: tuple[int, int]
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
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(padding),
                   tuple(conv.dilation), conv.groups)

    def weight_shape(self, in_channels: int, out_channels: int) -> tuple[int, int, int, int]:
        """``(C, C_in / g, kh, kw)``."""
        return (out_channels, in_channels // self.groups, *self.kernel_size)

    def depth(self, in_channels: int) -> int:
        """``D``: weights per output channel."""
        return in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]


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


def _conv_weight_grad(x: Tensor, grad_y: Tensor, weight_shape: tuple[int, ...],
                      geometry: ConvGeometry, stride: tuple[int, int],
                      padding: tuple[int, int], *, out: Tensor | None = None) -> Tensor:
    """The weight gradient of ``conv2d`` for output gradient ``grad_y``, ``(C, D)``: written
    into ``out`` (a contiguous ``(C, D)``) where the kernel can, else a new tensor. Compiled,
    an opaque operator: inductor's lowering of the conv would make the input's channel count
    a constant, one graph per channel count of a layer kind."""
    args = (x, grad_y, list(weight_shape), list(stride), list(padding),
            list(geometry.dilation), geometry.groups)
    if torch.compiler.is_compiling():
        return torch.ops.mmdet_cbn.conv_weight_grad(*args).reshape(weight_shape[0], -1)
    return _weight_grad_kernel(*args, out=out)


def _weight_grad_kernel(x: Tensor, grad_y: Tensor, weight_shape: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, *,
                        out: Tensor | None = None) -> Tensor:
    """``(C, D)``: the unfolded product where the output has few positions for its depth
    (:func:`_few_positions`), else the library's backward conv."""
    if _few_positions(x, grad_y, weight_shape, groups):
        return _unfolded_weight_grad(x, grad_y, weight_shape[2:], stride, padding, dilation,
                                     out=out)
    # gives the shape only; not an expanded tensor, which the kernel would first materialize
    weight = x.new_empty(weight_shape)
    _, grad_w, _ = torch.ops.aten.convolution_backward.default(
        grad_y, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [False, True, False])
    return grad_w.reshape(weight_shape[0], -1)


def _conv_weight_grad_op(x: Tensor, grad_y: Tensor, weight_shape: list[int], stride: list[int],
                         padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return _weight_grad_kernel(x, grad_y, weight_shape, stride, padding, dilation,
                               groups).reshape(weight_shape).contiguous()


def _conv_weight_grad_shape(x: Tensor, grad_y: Tensor, weight_shape: list[int], *args) -> Tensor:
    return x.new_empty(weight_shape)


# A plain operator library, not ``torch.library.custom_op``: its Python wrapper costs about
# 40 us per call against 15 (on this scale a tiny layer's whole step is ~1 ms). The operator
# takes no gradient.
_library = torch.library.Library('mmdet_cbn', 'DEF')
_library.define('conv_weight_grad(Tensor x, Tensor grad_y, SymInt[] weight_shape, int[] stride, '
                'int[] padding, int[] dilation, int groups) -> Tensor')
_library.impl('conv_weight_grad', _conv_weight_grad_op, 'CompositeExplicitAutograd')
torch.library.register_fake('mmdet_cbn::conv_weight_grad', _conv_weight_grad_shape, lib=_library)


def _tap_rows(size: int, out_size: int, kernel: int, stride: int, padding: int,
              dilation: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(kernel, size)`` 0/1 matrix: which input rows (or columns) kernel tap ``a`` reads over
    all output positions, i.e. ``q * stride + a * dilation - padding`` inside the input."""
    taps = torch.arange(kernel, device=device).unsqueeze(1) * dilation
    rows = torch.arange(out_size, device=device) * stride - padding + taps
    inside = (rows >= 0) & (rows < size)
    hits = torch.where(inside, rows, size).unsqueeze(2) == torch.arange(size, device=device)
    return hits.to(dtype).sum(1)


@functools.lru_cache(maxsize=256)
def _cached_tap_rows(*args) -> Tensor:
    """:func:`_tap_rows`, kept for eager calls: it depends on the geometry only."""
    with torch.inference_mode(False), torch.no_grad():
        return _tap_rows(*args)


def mean_input_patch(x: Tensor, geometry: ConvGeometry, out_hw: tuple[int, int]) -> Tensor:
    """``Xbar`` of Appendix B: the mean input patch, ``d mu_c / d W_c`` for every channel ``c``.

    ``Xbar[j, i, u] = 1/M sum_{n,p} x_patch(n, i, p + u)`` for the input channels of group ``j``.
    Because the output gradient is all ones it is the same for every image and separable in
    the two spatial directions: with ``R[a, h] = 1`` when tap row ``a`` reads input row ``h``
    for some output row (and ``S`` likewise for columns),
    ``Xbar[i, a, b] = 1/M sum_{n,h,w} R[a, h] x[n, i, h, w] S[b, w]``: two matrix products, the
    first one reading ``x`` once, exact for any stride, padding and dilation.

    Returns ``(g, D)`` in :func:`stat_dtype` of ``x``.
    """
    kh, kw = geometry.kernel_size
    dtype = stat_dtype(x)
    # many small maps (RoIs): sum the batch first; a few large ones (FPN levels): don't copy
    # (compiled: always the sum, which a fused kernel reads once, and no graph per branch)
    xf = (x.sum(0, keepdim=True, dtype=dtype) if torch.compiler.is_compiling() or x.shape[0] > 4
          else x.to(dtype))
    height, width = x.shape[2:]
    taps = _tap_rows if torch.compiler.is_compiling() else _cached_tap_rows
    rows = taps(height, out_hw[0], kh, geometry.stride[0], geometry.padding[0],
                geometry.dilation[0], xf.device, dtype)
    cols = taps(width, out_hw[1], kw, geometry.stride[1], geometry.padding[1],
                geometry.dilation[1], xf.device, dtype)
    xbar = torch.matmul(rows, torch.matmul(xf, cols.t()).sum(0))  # (c, a, b)
    m = x.shape[0] * out_hw[0] * out_hw[1]
    return xbar.reshape(geometry.groups, geometry.depth(x.shape[1])).div_(m)


def grad_var_wrt_weight(x: Tensor, y: Tensor, mean: Tensor, geometry: ConvGeometry, *,
                        stride: int = 1, offset: tuple[int, int] = (0, 0),
                        out: Tensor | None = None) -> Tensor:
    """``d var / d W``: the weight gradient of the conv for the output gradient ``2 (y - mu) / M``.

    ``grad_var[c, i, u] = 2/M sum_{n,p} (y(n, c, p) - mu_c) x_patch(n, i, p + u)``, ``(C, D)``.
    Centering ``y`` first keeps it free of the cancellation of ``d nu / d W - 2 mu Xbar``.

    With ``stride = s > 1`` only the output positions ``offset + s * q`` enter, weighted by
    ``s^2`` (their inverse probability of being drawn): the estimate is unbiased for every map
    size when ``offset`` is uniform in ``[0, s)^2``, and ``s^2`` times cheaper. In float32, or
    float64 for float64 inputs; written into ``out`` (a contiguous ``(C, D)``) if given.
    """
    dtype = stat_dtype(y)
    xf = x.to(dtype)
    centered = y.to(dtype) - mean.view(1, -1, 1, 1)
    (sh, sw), (ph, pw) = geometry.stride, geometry.padding
    m = y.shape[0] * y.shape[2] * y.shape[3]
    weight_shape = geometry.weight_shape(x.shape[1], y.shape[1])
    conv_stride, conv_padding = (sh, sw), (ph, pw)
    if stride > 1:
        oh, ow = offset
        centered = centered[:, :, oh::stride, ow::stride]
        if centered.numel() == 0:  # a map smaller than the offset: nothing drawn this time
            return (y.new_zeros(y.shape[1], geometry.depth(x.shape[1]), dtype=dtype)
                    if out is None else out.zero_())
        if geometry.kernel_size == (1, 1) and (ph, pw) == (0, 0):
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
    centered = centered.contiguous()
    # the factor 2 / M on the smaller of the two: the output gradient or d var / d W
    factor = 2.0 / m
    scale_output = torch.compiler.is_compiling() or centered.numel() < math.prod(weight_shape)
    if scale_output:
        centered.mul_(factor)
    grad_w = _conv_weight_grad(xf.contiguous(), centered, weight_shape, geometry, conv_stride,
                               conv_padding, out=out)
    if out is not None and grad_w is not out:  # one pass: the copy, scaled on the way if needed
        return out.copy_(grad_w) if scale_output else torch.mul(grad_w, factor, out=out)
    return grad_w if scale_output else grad_w.mul_(factor)


DEPTH_PER_POSITION = 16  # the unfolded weight gradient from D >= 16 N H' W' (CPU)


def _on_host(t: Tensor) -> bool:
    """Whether reading a value of ``t`` is free: a CPU tensor outside compiled code (no
    device sync, no graph break)."""
    return not torch.compiler.is_compiling() and t.device.type == 'cpu'


def _few_positions(x: Tensor, grad_y: Tensor, weight_shape: list[int], groups: int) -> bool:
    """Whether the weight gradient is cheaper as an unfolded product: on the CPU, for an
    ungrouped conv whose output has few positions for its depth (a backbone's last stages at
    low resolution: 7 x 7 or smaller maps, 256-512 channels), where oneDNN's weight-gradient
    kernel is 1.4-4x slower than the product. Decided where the sizes are numbers: eager, or
    inside the compiled code's opaque operator."""
    if x.device.type != 'cpu' or groups != 1:
        return False
    positions = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3]
    return 0 < positions * DEPTH_PER_POSITION <= math.prod(weight_shape[1:])


def _unfolded_weight_grad(x: Tensor, grad_y: Tensor, kernel_size: list[int], stride: list[int],
                          padding: list[int], dilation: list[int], *,
                          out: Tensor | None = None) -> Tensor:
    """The weight gradient of an ungrouped conv as ``grad_y (C, N L) @ patches (N L, D)``,
    ``(C, D)`` (into ``out`` if given): ``x`` unfolded into its ``L`` patches per image."""
    patches = torch.nn.functional.unfold(x, kernel_size, dilation, padding, stride)  # (N, D, L)
    images, depth, positions = patches.shape
    channels = grad_y.shape[1]
    return torch.mm(grad_y.reshape(images, channels, positions).transpose(0, 1)
                    .reshape(channels, images * positions),
                    patches.transpose(1, 2).reshape(images * positions, depth), out=out)


@functools.lru_cache(maxsize=64)
def _constant(shape: tuple[int, ...], value: float, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    """A cached constant tensor (read, never written)."""
    with torch.inference_mode(False):
        return torch.full(shape, value, device=device, dtype=dtype)


def _flat_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The conv weight as ``(C, D)`` rows in ``dtype``; compiled, read through an identity
    ``as_strided``. Inductor's layout optimization gives a tensor that feeds a convolution a
    channels-last copy for all its readers (the slot dots would then index each row with a
    division per element), except a tensor that an ``as_strided`` reads. For reads autograd
    does not track (inside :class:`_WindowNormalize`, without grad): its backward scatters."""
    if torch.compiler.is_compiling():
        weight = weight.as_strided(weight.shape, weight.stride())  # its own storage offset
    return weight.reshape(weight.shape[0], -1).to(dtype)


def record_statistics(x: Tensor | None, y: Tensor, mean: Tensor, var: Tensor,
                      weight: Tensor | None, geometry: ConvGeometry | None, *,
                      grad_stride: int = 1, draw: tuple[int, int] = (0, 0),
                      grad_var_out: Tensor | None = None) -> SlotRecord:
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
        grad_var_out: where ``grad_var`` is written (a contiguous ``(C, D)``: the ring's free
            slot), or None for a new tensor.

    Without examples (an empty ``y``: a rank without RoIs) ``Xbar`` and ``grad_var`` are 0.
    """
    if geometry is None:
        return SlotRecord(mean, var, None, None)
    step = grad_stride ** 2
    if y.numel() == 0:
        depth = geometry.depth(x.shape[1])
        xbar = mean.new_zeros(geometry.groups, depth)
        grad_var = (mean.new_zeros(y.shape[1], depth) if grad_var_out is None
                    else grad_var_out.zero_())
    elif grad_stride > 1 and y.shape[0] >= 4 * step:
        # every s^2-th image (RoI): a stride-1 conv; inverse inclusion probability s^2
        xbar = mean_input_patch(x, geometry, y.shape[2:])
        first = draw[0] % step
        grad_var = grad_var_wrt_weight(x[first::step], y[first::step], mean, geometry,
                                       out=grad_var_out)
        grad_var.mul_(y[first::step].shape[0] * step / y.shape[0])
    else:
        xbar = mean_input_patch(x, geometry, y.shape[2:])
        grad_var = grad_var_wrt_weight(x, y, mean, geometry, stride=grad_stride,
                                       offset=(draw[0] % grad_stride, draw[1] % grad_stride),
                                       out=grad_var_out)
    var_intercept = var - _slot_dot(grad_var.unsqueeze(0), _flat_weight(weight, grad_var.dtype))[0]
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
    flat = _flat_weight(weight, xbar.dtype)
    if groups == 1:  # (S, D) @ (D, C), plus the bias, in one product
        mu_hat = (torch.mm(xbar[:, 0], flat.t()) if bias is None
                  else torch.addmm(bias.to(xbar.dtype), xbar[:, 0], flat.t()))
    else:  # per group (g, c, D) @ (g, D, S) -> (S, C)
        mu_hat = torch.bmm(flat.view(groups, -1, depth), xbar.permute(1, 2, 0))
        mu_hat = mu_hat.reshape(-1, slots).t()
        if bias is not None:
            mu_hat = mu_hat + bias.to(xbar.dtype)
    delta = mu_hat - mean
    var_hat = torch.addcmul(var_intercept + _slot_dot(grad_var, flat), delta, delta, value=-1)
    return mu_hat, var_hat, delta


def _slot_dot(grad_var: Tensor, flat: Tensor) -> Tensor:
    """``grad_var_j . W`` per slot and channel, ``(S, C)``. Eager: one batched product over
    the channels, ``(C, 1, D) @ (C, D, S)``, which reads the slots where they lie in the ring
    (an elementwise product would copy ``S x C x D`` first); compiled: the product and sum,
    which inductor fuses."""
    if torch.compiler.is_compiling():
        return torch.linalg.vecdot(grad_var, flat)
    return torch.bmm(flat.unsqueeze(1), grad_var.permute(1, 2, 0)).squeeze(1).t()


def _batch_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` in one stable pass of BatchNorm's own
    statistics kernel; ``var_mean`` where that kernel has no implementation (meta tensors,
    ``torch.compile`` tracing)."""
    if y.device.type == 'meta' or torch.compiler.is_compiling():
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        return mean, var
    return torch.batch_norm_update_stats(y, None, None, 0.0)


class PooledMoments(NamedTuple):
    """The current batch's per-channel moments over all ranks of a process group (SyncCBN)."""

    mean: Tensor  # (C,)
    var: Tensor  # (C,) biased
    count: Tensor  # () examples per channel over all ranks, M = sum_r M_r
    group: object  # the torch.distributed process group


def pool_moments(y: Tensor, group) -> PooledMoments:
    """Mean and biased variance of ``y``'s channels over every rank of ``group``, as SyncBN
    (:func:`gather_moments`). A rank with an empty ``y`` contributes ``M_r = 0``."""
    dtype = stat_dtype(y)
    channels = y.shape[1]
    if y.numel() == 0:
        mean = var = torch.zeros(channels, dtype=dtype, device=y.device)
    else:
        mean, var = _batch_moments(y if y.dtype == dtype else y.to(dtype))
    return gather_moments(y.numel() // channels, mean, var, group)


def gather_moments(count: int, mean: Tensor, var: Tensor, group) -> PooledMoments:
    """Every rank's ``(M_r, mu_r, var_r)`` (``mean``, biased ``var``: ``(C,)``) gathered in one
    collective and combined by the parallel-variance rule ``var = sum_r M_r (var_r + (mu_r -
    mu)^2) / M``, which no large moment cancels in. Not finite if no rank has an example."""
    channels = mean.shape[0]
    local = torch.cat([mean.new_full((1,), count), mean, var])
    ranks = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, local, group=group)
    counts, means, variances = torch.stack(ranks).split([1, channels, channels], dim=1)
    total = counts.sum()
    share = counts / total  # (R, 1)
    pooled_mean = (share * means).sum(0)
    pooled_var = (share * (variances + (means - pooled_mean).square())).sum(0)
    return PooledMoments(pooled_mean, pooled_var, total, group)


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
    def forward(ctx, y, gamma, beta, weight, bias, past, eps, pooled):
        dtype = stat_dtype(y)
        if pooled is None:
            mean, var = _batch_moments(y if y.dtype == dtype else y.to(dtype))
        else:  # the moments of every rank's batch: outputs of this node, hence copies
            mean, var = pooled.mean.clone(), pooled.var.clone()
        if past is None:  # k = 1: the batch is the window
            k, mu_bar, var_bar = None, mean, var
            clamped = torch.zeros((), dtype=torch.long, device=y.device)
        else:
            mu_hat, var_hat, delta = compensate(
                weight, bias, mean=past.mean, var_intercept=past.var_intercept,
                xbar=past.xbar, grad_var=past.grad_var)
            w, k = past.slot_weight, past.window
            clamped = torch.count_nonzero(var_hat.lt(0).logical_and_(w.gt(0).unsqueeze(1)))
            mu_bar = torch.addmv(mean, mu_hat.t(), w).div_(k)
            spread, gap = mu_hat - mu_bar, mean - mu_bar
            var_bar = torch.addmv(torch.addcmul(var, gap, gap),
                                  torch.addcmul(var_hat.clamp_min_(0), spread, spread).t(),
                                  w).div_(k)
            if weight is not None and weight.requires_grad:
                ctx.past, ctx.slot_terms = past, (spread, var_hat, delta)
        if y.dtype != dtype:
            # 16-bit y: BN's kernels take the float32 statistics only with float32 affine
            # parameters (CPU: all of y's dtype or all float32; cuDNN: all of one dtype)
            gamma, beta = (None if p is None else p.to(dtype) for p in (gamma, beta))
        out = torch.batch_norm(y, gamma, beta, mu_bar, var_bar, False, 0.0, eps, True)
        ctx.save_for_backward(y, gamma, mu_bar, var_bar)
        ctx.eps, ctx.k, ctx.pooled = eps, k, pooled
        ctx.weight_shape = None if weight is None else weight.shape
        window = torch.stack([mu_bar, var_bar])
        ctx.mark_non_differentiable(mean, var, window, clamped)
        ctx.set_materialize_grads(False)
        return out, mean, var, window, clamped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused):
        if grad_out is None:  # only the (non-differentiable) statistics were used
            return (None,) * 8
        y, gamma, mu_bar, var_bar = ctx.saved_tensors
        inv_std = (var_bar + ctx.eps).rsqrt_()
        if gamma is None:
            gamma = torch.ones_like(inv_std)
        elif gamma.dtype != inv_std.dtype:
            gamma = gamma.to(inv_std.dtype)
        if ctx.pooled is not None:
            return _pooled_backward(ctx, grad_out, y, gamma, mu_bar, inv_std)
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
            grad_var_bar_2=gamma_inv_std.mul_(inv_std).mul_(grad_gamma),
            weight_shape=ctx.weight_shape)
        return _input_grads(ctx, grad_y, grad_gamma, g_sum, grad_weight, grad_bias)


def _pooled_backward(ctx, grad_out: Tensor, y: Tensor, gamma: Tensor, mu_bar: Tensor,
                     inv_std: Tensor) -> tuple[Tensor | None, ...]:
    """The backward with the batch's moments pooled across ranks (SyncCBN).

    With ``a = gamma inv_std`` and the sums over every rank's examples ``G = sum(g)``,
    ``Q = sum(g (y - mu_bar)) inv_std`` (one all-reduce of ``(2, C)``), the input gradient is
    ``a (g - G / (k M) - (y - mu_bar) inv_std Q / (k M))`` with ``M`` the pooled count, i.e.
    Eq. 9-11 of the pooled objective. ``gamma``, ``beta`` and the conv weight (through the
    compensation) get this rank's share only, from its own sums: DDP sums the ranks' shares.
    """
    channels = y.shape[1]
    if y.numel() == 0:
        own_q = own_g = inv_std.new_zeros(channels)
    else:  # BN's kernel for the two sums only: sum(g (y - m)) inv_std, sum(g)
        _, own_q, own_g = torch.ops.aten.native_batch_norm_backward.default(
            grad_out, y, gamma, None, None, mu_bar, inv_std, True, ctx.eps,
            [False, True, True])
    both = torch.stack([own_g, own_q]).to(inv_std.dtype)
    dist.all_reduce(both, group=ctx.pooled.group)
    k_count = ctx.pooled.count * (1 if ctx.k is None else ctx.k)
    a = gamma * inv_std
    slope = (a * inv_std * both[1]).div_(-k_count)  # per channel, times y
    offset = torch.addcmul(a * both[0] / -k_count, slope, mu_bar, value=-1)
    grad_y = torch.addcmul(offset.view(1, -1, 1, 1), grad_out.to(a.dtype), a.view(1, -1, 1, 1))
    grad_y = grad_y.addcmul_(y.to(a.dtype), slope.view(1, -1, 1, 1)).to(y.dtype)
    if not hasattr(ctx, 'slot_terms'):
        return _input_grads(ctx, grad_y, own_q, own_g)
    grad_weight, grad_bias = _grad_through_compensation(
        ctx.past, *ctx.slot_terms, neg_grad_mu_bar=a * own_g.to(a.dtype),
        grad_var_bar_2=a * inv_std * own_q.to(a.dtype), weight_shape=ctx.weight_shape)
    return _input_grads(ctx, grad_y, own_q, own_g, grad_weight, grad_bias)


def _input_grads(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients of ``_WindowNormalize``'s inputs: None where an input needs none."""
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (
        len(needs) - len(grads))


def _grad_through_compensation(past: PastRecords, spread: Tensor, var_hat: Tensor,
                               delta: Tensor, *, neg_grad_mu_bar: Tensor, grad_var_bar_2: Tensor,
                               weight_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """``d L / d W`` (in ``weight_shape``) and ``d L / d b`` through the compensated past slots
    (Eq. 7, 8).

    With ``a = -d L / d mu_bar`` and ``q = -2 d L / d var_bar`` (``grad_var_bar_2``):
    ``d L / d mu_hat_j = -w_j / k (a + q (mu_hat_j - mu_bar))`` and
    ``d L / d var_hat_j = -w_j / k q / 2 [var_hat_j > 0]``; ``mu_hat`` is linear in ``W`` with
    slope ``Xbar`` and ``var_hat`` has slope ``grad_var - 2 delta Xbar``, so the slope of
    ``Xbar`` is ``-(w_j / k (a + q spread_j) - [var_hat_j > 0] w_j / k q delta_j)``.

    ``d L / d W`` is a tensor of its own, not a view: autograd then adds the conv's own weight
    gradient into it in place instead of allocating the sum.
    """
    w = (past.slot_weight / past.window).unsqueeze(1)  # (S, 1): w_j / k
    half_var = (w * (var_hat > 0)).mul_(grad_var_bar_2)  # -2 d L / d var_hat_j; var_hat >= 0
    neg_slope = torch.addcmul(neg_grad_mu_bar, grad_var_bar_2, spread).mul_(w)
    neg_slope.addcmul_(half_var, delta, value=-1)
    slots, groups, depth = past.xbar.shape
    channels = neg_slope.shape[1]
    if torch.compiler.is_compiling():
        # both sums in one pass over the slots, which inductor fuses into one kernel (a sum
        # over a tensor's first dimension would materialize the S x C x D products first);
        # the slot count is fixed per window size
        xbar = (past.xbar if groups == 1 else past.xbar.unsqueeze(2).expand(
            slots, groups, channels // groups, depth).reshape(slots, channels, depth))
        grad_weight = sum(half_var[j].unsqueeze(1) * past.grad_var[j] * -0.5
                          - neg_slope[j].unsqueeze(1) * xbar[j] for j in range(slots))
        return grad_weight.view(weight_shape), neg_slope.sum(0).neg_()
    grad_weight = past.xbar.new_empty(weight_shape)
    flat = _weighted_slot_sum(half_var, past.grad_var, out=grad_weight.view(channels, depth),
                              slot_weight=past.slot_weight)
    if groups == 1:
        flat.addmm_(neg_slope.t(), past.xbar[:, 0], beta=-0.5, alpha=-1)
    else:
        from_xbar = torch.bmm(neg_slope.t().reshape(groups, channels // groups, slots),
                              past.xbar.transpose(0, 1)).reshape(channels, depth)
        flat.mul_(-0.5).sub_(from_xbar)
    return grad_weight, neg_slope.sum(0).neg_()


def _weighted_slot_sum(weights: Tensor, grad_var: Tensor, *, out: Tensor,
                       slot_weight: Tensor) -> Tensor:
    """``sum_j weights_j grad_var_j`` into ``out`` ``(C, D)``, from ``(S, C)`` and
    ``(S, C, D)``; ``weights_j`` is 0 where ``slot_weight`` ``(S,)`` is. Small: one broadcast
    product and sum. Large: slot by slot (no ``S x C x D`` temporary; 2-4x
    faster from ``C D`` = 32k on the CPU), on the host only the slots in the window."""
    if grad_var[0].numel() < 32768:
        return torch.sum(torch.mul(weights.unsqueeze(2), grad_var), 0, out=out)
    slots = ([j for j, w in enumerate(slot_weight.tolist()) if w] if _on_host(slot_weight)
             else range(grad_var.shape[0]))
    if not slots:
        return out.zero_()
    torch.mul(grad_var[slots[0]], weights[slots[0]].unsqueeze(1), out=out)
    for slot in slots[1:]:
        out.addcmul_(grad_var[slot], weights[slot].unsqueeze(1))
    return out


def window_normalize(y: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, *,
                     weight: Tensor | None = None, bias: Tensor | None = None,
                     past: PastRecords | None = None, pooled: PooledMoments | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``y`` with the statistics of the window (Eq. 7-11).

    Args:
        y: ``(N, C, H, W)`` the current conv output.
        gamma, beta: ``(C,)`` the affine parameters, or None.
        eps: added to the variance.
        weight, bias: the current conv weight and bias the past slots are compensated to.
            The gradient flows through the compensation into them unless they are detached.
        past: the past slots, or None (then this is BatchNorm's training forward).
        pooled: the batch's moments over all ranks (:func:`pool_moments`), or None for this
            process's own: then the backward all-reduces its per-channel sums (SyncBN's rule).

    Returns:
        ``(out, mean, var, window, clamped)``: the normalized ``y`` (dtype of ``y``) and,
        detached, the batch's mean and variance ``(C,)`` and the window's ``(2, C)``
        (``mu_bar``, ``var_bar``), float32, or float64 for float64 ``y``; and ``()`` long, how
        many compensated past variances (slots in the window x channels) came out below 0
        and were clamped (Eq. 10's ``max``): a sign that the weights moved too far for the
        Taylor step.
    """
    return _WindowNormalize.apply(y, gamma, beta, weight, bias, past, eps, pooled)


def nonfinite(t: Tensor) -> Tensor:
    """0-d bool tensor: some element of ``t`` is NaN or infinite, without a host sync.

    ``0 * t`` is 0 for finite elements and NaN otherwise, so the dot product of the elements
    with zeros is exactly 0 iff all are finite, else NaN (a sum of the values could overflow).
    """
    flat = t.reshape(-1)
    zeros = (torch.zeros_like(flat) if torch.compiler.is_compiling()
             else _constant(flat.shape, 0.0, flat.device, flat.dtype))
    return torch.dot(flat, zeros).isnan()


def update_running_stats(running_mean: Tensor, running_var: Tensor, window: Tensor, *,
                         examples: Tensor | int, factor: Tensor | float, keep: Tensor) -> None:
    """BatchNorm's running-average step, in place: ``r <- r + factor (stat - r)``.

    ``window`` is ``(2, C)``: the mean and the biased variance, which enters unbiased,
    ``var * n / (n - 1)`` with ``n = examples`` per channel. Where ``keep`` (0-d, bool or 0/1)
    is false the step is 0 and the buffers stay as they are, without a host sync; ``window``
    must then be finite (``0 * nan`` is nan). The step is float64 for float64 buffers, else
    float32 (a bool times a Python float would be a float32 momentum for every dtype).
    """
    step = keep.to(stat_dtype(running_mean)) * factor
    running_mean.lerp_(window[0].to(running_mean.dtype), step)
    unbiased = window[1] * (examples / (examples - 1).clamp(min=1) if isinstance(
        examples, Tensor) else examples / max(examples - 1, 1))
    running_var.lerp_(unbiased.to(running_var.dtype), step)


def record_layout(channels: int, groups: int, depth: int) -> dict[str, int]:
    """Widths of the fields of one packed record (a row of :class:`RingState` ``records``):
    ``mean``, ``var_intercept`` (``C``), ``valid`` (1), ``xbar`` (``g D``), ``grad_var``
    (``C D``); ``D = 0`` without compensation."""
    return dict(mean=channels, var_intercept=channels, valid=1, xbar=groups * depth,
                grad_var=channels * depth)


class RingState(NamedTuple):
    """The history of one call site as a training step reads and writes it (all tensors)."""

    records: Tensor  # (P, R): P = S + 1 packed records (record_layout); one is free
    cursor: Tensor  # (3,) long: [free slot, committed records, free slot written]
    slot_weight: Tensor  # (P,) 1 for a valid committed record, else 0 (the free slot too)
    window: Tensor  # (1,) k = 1 + sum(slot_weight)


class StepOptions(NamedTuple):
    """A layer's constants for its training step: plain numbers, fixed per model, so that
    layers alike share compiled code."""

    eps: float
    momentum: float | None
    track_running_stats: bool
    geometry: ConvGeometry | None  # the conv's, for the Taylor compensation; None: Naive CBN
    detach_compensation: bool
    grad_stride: int
    burnin_iters: int  # records of iterations up to this one stay out of the window


def training_step(y: Tensor, x: Tensor | None, gamma: Tensor | None, beta: Tensor | None,
                  conv_weight: Tensor | None, conv_bias: Tensor | None, *,
                  ring: RingState | None, running_mean: Tensor | None,
                  running_var: Tensor | None, num_batches_tracked: Tensor | None,
                  nonfinite_batches: Tensor, clamped_variances: Tensor, iteration: Tensor,
                  options: StepOptions, draw: tuple[int, int] = (0, 0), record: bool = True,
                  group: object | None = None, in_flight: list | None = None) -> Tensor:
    """One training call of a CBN layer (Eq. 7-11), its record and the running statistics.

    Normalizes ``y = conv(x; conv_weight, conv_bias)`` with the statistics of the window of
    ``ring`` (None: of ``y`` alone, BatchNorm's), writes this call's record into the ring's
    free slot and updates the running statistics from the window's mean and variance; a call
    whose window statistics are not finite changes neither (it counts in
    ``nonfinite_batches``). All state changes in place, nothing is read back to the host, and
    nothing but tensors changes from call to call, so ``torch.compile`` traces it whole.

    Args:
        y: ``(N, C, H, W)`` the conv output; x: its input (used with compensation only).
        gamma, beta: ``(C,)`` affine parameters or None.
        conv_weight, conv_bias: the conv's current parameters (compensation only).
        ring: the call site's history, or None for window 1.
        running_mean, running_var, num_batches_tracked: BatchNorm's buffers, or None.
        nonfinite_batches: ``()`` long, calls kept out so far.
        clamped_variances: ``(2,)`` long, ``[clamped, all]`` compensated past variances so
            far (a diagnostic, :meth:`CrossIterationBatchNorm2d.clamped_variances`).
        iteration: ``()`` long, the 1-based training iteration of this call.
        options: the layer's constants.
        draw: offsets for a sampled ``d var / d W`` (``options.grad_stride > 1``).
        record: False for a gradient-checkpointing recomputation: normalize, change nothing.
        group: a process group of more than one rank: the batch's moments and the record
            are pooled over its ranks (SyncCBN; every rank makes the same calls), which keep
            identical rings and running statistics. None: this process's batch alone.
        in_flight: with ``group`` and compensation, where the pooled record is left as
            ``(work, row)`` while its all-reduce runs, to be written into the free slot
            before the ring is next read (:meth:`~mmdet_cbn.history.History.settle`), so that
            the communication overlaps the rest of the iteration. None: wait here.

    Returns:
        The normalized ``y``.
    """
    geometry = options.geometry if ring is not None else None
    past, weight, bias = None, None, None
    if ring is not None:
        groups = 1 if geometry is None else geometry.groups
        depth = 0 if geometry is None else geometry.depth(x.shape[1])
        layout = record_layout(y.shape[1], groups, depth)
        mean, var_intercept, _, xbar, grad_var = ring.records.split(list(layout.values()), 1)
        slots = ring.records.shape[0]
        past = PastRecords(mean, var_intercept, ring.slot_weight, ring.window[0],
                           None if geometry is None else xbar.view(slots, groups, depth),
                           None if geometry is None else grad_var.view(slots, -1, depth))
        if geometry is not None:
            weight, bias = conv_weight, conv_bias
            if options.detach_compensation:
                weight, bias = weight.detach(), None if bias is None else bias.detach()
    pooled = None if group is None else pool_moments(y, group)
    out, mean, var, window, clamped = window_normalize(
        y, gamma, beta, options.eps, weight=weight, bias=bias, past=past, pooled=pooled)
    if not record:
        return out
    with torch.no_grad():
        bad = nonfinite(window)
        nonfinite_batches.add_(bad)
        if past is not None and geometry is not None:
            compensated = ring.slot_weight.gt(0).sum() * y.shape[1]
            clamped_variances.add_(torch.stack([clamped, compensated]))
        if ring is not None:
            _write_record(ring, x, y, mean, var, conv_weight, bad, iteration, options, draw,
                          pooled=pooled, in_flight=in_flight)
            ring.cursor[2:].fill_(1)
        if options.track_running_stats:
            num_batches_tracked.add_(1)
            factor = (options.momentum if options.momentum is not None
                      else 1.0 / num_batches_tracked.to(window.dtype))
            count = y.numel() // y.shape[1] if pooled is None else pooled.count
            update_running_stats(running_mean, running_var, window.masked_fill_(bad, 0),
                                 examples=count if ring is None else ring.window[0] * count,
                                 factor=factor, keep=bad.logical_not())
    return out


def _write_record(ring: RingState, x: Tensor | None, y: Tensor, mean: Tensor, var: Tensor,
                  conv_weight: Tensor | None, bad: Tensor, iteration: Tensor,
                  options: StepOptions, draw: tuple[int, int], *,
                  pooled: PooledMoments | None, in_flight: list | None) -> None:
    """This call's record into the ring's free slot, a non-finite window's as zeros (the slot
    stays in the ring, empty).

    On the host (:func:`_on_host`) the free slot and ``bad`` are read here, so ``d var / d W``
    is computed in place in the slot and a non-finite window's record not at all. Otherwise
    one packed row is written at the cursor (compiled, inductor fuses the packing into its
    in-place store; SyncCBN pools the row first); eager, ``d var / d W`` is copied into the
    slot directly.
    """
    geometry = options.geometry
    free = int(ring.cursor[0]) if pooled is None and _on_host(y) else None
    if free is not None and bool(bad):
        ring.records[free].zero_()
        return
    channels = y.shape[1]
    depth = 0 if geometry is None else geometry.depth(x.shape[1])
    head = ring.records.shape[1] - channels * depth  # the fields before grad_var
    grad_var_out = (None if free is None or geometry is None
                    else ring.records[free, head:].view(channels, depth))
    slot = record_statistics(x, y, mean, var, conv_weight, geometry,
                             grad_stride=options.grad_stride, draw=draw,
                             grad_var_out=grad_var_out)
    valid = (torch.ones(1, dtype=mean.dtype, device=mean.device) if options.burnin_iters == 0
             else (iteration > options.burnin_iters).to(mean.dtype).view(1))
    fields = [slot.mean, slot.var_intercept, valid]
    if geometry is not None:
        fields.append(slot.xbar.reshape(-1))
    if free is not None:
        torch.cat(fields, out=ring.records[free, :head])
        return
    rows = ring.records
    if geometry is not None and pooled is None and not torch.compiler.is_compiling():
        rows = ring.records[:, :head]
        ring.records[:, head:].index_copy_(
            0, ring.cursor[:1], slot.grad_var.view(1, -1).masked_fill_(bad, 0))
    elif geometry is not None:
        fields.append(slot.grad_var.reshape(-1))
    packed = torch.cat(fields).masked_fill_(bad, 0).unsqueeze(0)
    work = None
    if pooled is not None and geometry is not None:
        work = _pool_record(packed, y, pooled, wait=in_flight is None)
    if work is None:
        rows.index_copy_(0, ring.cursor[:1], packed)
    else:
        in_flight.append((work, packed))


def _pool_record(packed: Tensor, y: Tensor, pooled: PooledMoments, *, wait: bool):
    """Turn this rank's packed record (about the pooled mean) into the whole batch's, in place.

    ``Xbar`` and ``d var / d W`` are means over the examples, so the batch's are the ranks'
    weighted by ``M_r / M``; since these weights sum to 1, so are ``var_intercept = var -
    grad_var . W`` and the fields every rank has alike (``mean``, ``valid``): one all-reduce
    of the row. Returns its handle, or None if it was waited for here (``wait``).
    """
    packed.mul_(y.numel() // y.shape[1] / pooled.count)
    work = dist.all_reduce(packed, group=pooled.group, async_op=not wait)
    return None if wait else work
