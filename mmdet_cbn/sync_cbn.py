"""``SyncCrossIterationBatchNorm2d``: CBN whose statistics are pooled across GPUs as well."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .cbn import CrossIterationBatchNorm2d

__all__ = ['SyncCrossIterationBatchNorm2d']


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """Cross-Iteration Batch Normalization over the batches of every rank (SyncCBN).

    CBN (:class:`~mmdet_cbn.CrossIterationBatchNorm2d`, same arguments and state) whose
    training statistics pool the ranks of a process group, as ``torch.nn.SyncBatchNorm``
    pools them: a window of ``k`` iterations over ``R`` ranks with ``n`` images each
    normalizes with ``k R n`` images. With DDP every rank holds the same weights, so the
    current batch's mean and variance and each iteration's record (``Xbar``, ``d var / d W``
    about the pooled mean, the variance intercept) are count-weighted sums over the ranks:
    one gather of ``2C + 1`` numbers per rank, and one all-reduce of the record's ``2C + 1 +
    (g + C) D``, which runs while the iteration goes on (it is waited for when the window next
    needs it). Every rank then keeps the same history and running statistics (a checkpoint
    saves them once, and they stay valid with another number of ranks). The backward all-reduces the
    per-channel sums, as SyncBN does, and gives each rank its share of the gradients of
    ``gamma``, ``beta`` and the conv weight, so that DDP's average is the gradient of the
    pooled objective, exact (default) or detached.

    Every rank must call the layer the same number of times per iteration; a rank without
    examples (a RoI head without RoIs) takes part with none. With ``grad_nu_stride > 1`` each
    rank uses its own draw of the layer's generator (the ``R`` draws of a call are taken on
    every rank, which keeps the generators alike where they were seeded alike): the pooled
    estimate stays unbiased. Outside a process group of more than one rank, and in eval mode,
    it is CBN. A synchronized step runs eager (``fused`` applies where it is not).

    Args:
        process_group: the ranks to pool (default: all, ``torch.distributed``'s world group).
        others: as :class:`~mmdet_cbn.CrossIterationBatchNorm2d`.
    """

    def __init__(self, num_features: int, *args, process_group: object | None = None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _synchronized_group(self) -> object | None:
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _draw(self) -> tuple[int, int]:
        group = self._synchronized_group()
        if self._sampler is None or group is None or torch.compiler.is_compiling():
            return super()._draw()
        high = self.grad_nu_stride ** 2
        draws = torch.randint(high, (dist.get_world_size(group), 2), generator=self._sampler)
        return tuple(int(v) for v in draws[dist.get_rank(group)])
