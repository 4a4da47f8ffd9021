"""torchvision stand-ins for mmcv's compiled ops, for timing where mmcv has no ops built.

A Faster R-CNN training step calls two of mmcv's compiled ops: ``RoIAlign`` (box head) and
``nms`` (RPN proposals). Where mmcv is installed without its compiled extension ``mmcv._ext``
(``mmcv-lite``, e.g. on a lent GPU machine whose torch differs from the pinned one, where the
CUDA ops cannot be built in the time at hand), :func:`install` puts a module in its place whose
``roi_align_forward``, ``roi_align_backward`` and ``nms`` call torchvision's kernels with the same
semantics (average pooling, ``aligned``, adaptive ``sampling_ratio`` for ``0``, IoU without the
``+1`` offset). Every other op of the extension raises ``NotImplementedError`` naming itself when
called, so nothing runs silently on a stand-in. Both arms of a timing use the same kernels, so
ratios stay comparable; the benchmarks record which kernels ran.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable

import torch
from torch import Tensor


def roi_align_forward(input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor,
                      argmax_x: Tensor, aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int, pool_mode: int,
                      aligned: bool) -> None:
    """mmcv's ``roi_align_forward``: fill ``output`` (K, C, h, w) from ``input`` (B, C, H, W) and
    ``rois`` (K, 5) = (batch index, x1, y1, x2, y2). Average pooling (``pool_mode == 1``) only."""
    _require_average_pooling(pool_mode)
    import torchvision

    output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width),
                                           spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_output: Tensor, rois: Tensor, argmax_y: Tensor, argmax_x: Tensor,
                       grad_input: Tensor, aligned_height: int, aligned_width: int,
                       spatial_scale: float, sampling_ratio: int, pool_mode: int,
                       aligned: bool) -> None:
    """mmcv's ``roi_align_backward``: fill ``grad_input`` (B, C, H, W) from ``grad_output``."""
    _require_average_pooling(pool_mode)
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    batch, channels, height, width = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, spatial_scale, aligned_height, aligned_width, batch, channels, height,
        width, sampling_ratio, aligned))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int) -> Tensor:
    """mmcv's ``nms``: indices of the kept boxes (N, 4), by decreasing score."""
    import torchvision

    if offset != 0:
        raise NotImplementedError('mmcv_ops_fallback.nms: only offset=0 (mmdet 3 default)')
    return torchvision.ops.nms(boxes, scores, iou_threshold)


def _require_average_pooling(pool_mode: int) -> None:
    if pool_mode != 1:
        raise NotImplementedError("mmcv_ops_fallback: RoIAlign with pool_mode='max' has no "
                                  'torchvision kernel; build mmcv with its ops')


def _missing(name: str) -> Callable[..., None]:
    if name.startswith('__'):
        raise AttributeError(name)

    def op(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f'mmcv op {name!r} is not compiled here and has no torchvision '
                                  'stand-in; build mmcv with MMCV_WITH_OPS=1')
    return op


def install() -> str:
    """Register the stand-ins as ``mmcv._ext`` unless the compiled extension is there.

    Returns the kernels a step will run: ``'mmcv'`` or ``'torchvision (mmcv has no ops)'``.
    Call before anything imports ``mmcv.ops``.
    """
    if importlib.util.find_spec('mmcv._ext') is not None:
        return 'mmcv'
    if importlib.util.find_spec('torchvision') is None:
        raise SystemExit('mmcv has no compiled ops and torchvision is not installed: build mmcv '
                         'with MMCV_WITH_OPS=1 (see README) or install torchvision')
    module = types.ModuleType('mmcv._ext', __doc__)
    module.roi_align_forward = roi_align_forward
    module.roi_align_backward = roi_align_backward
    module.nms = nms
    module.__getattr__ = _missing
    sys.modules['mmcv._ext'] = module
    return 'torchvision (mmcv has no ops)'
