"""The records of past iterations at one call site of a CBN layer, in one flat ring buffer."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .functional import PastRecords, SlotRecord

__all__ = ['History']

FIELDS = ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var')


class History:
    """The :class:`~mmdet_cbn.functional.SlotRecord` of the last ``S`` iterations, and a free
    slot where the running iteration writes its own.

    All ``S + 1`` slots live in one ``(S + 1, R)`` tensor; the fields are named views of it
    (``mean`` ``(S + 1, C)``, ``var_intercept`` ``(S + 1, C)``, ``valid`` ``(S + 1,)``,
    ``xbar`` ``(S + 1, g, D)``, ``grad_var`` ``(S + 1, C, D)``; ``D = 0`` without
    compensation). Empty and discarded (non-finite) slots have ``valid = 0``; they and the
    free slot weigh 0 in the window.

    The record of the running iteration waits in the free slot until the next iteration starts
    (:meth:`commit`): until then the window is the same for every forward of this iteration,
    so a gradient-checkpointing recomputation sees what the first forward saw.
    """

    def __init__(self, slots: int, channels: int, groups: int, depth: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shape = (channels, groups, depth)
        self.records = torch.zeros(slots + 1, self.record_size, device=device, dtype=dtype)
        self.free = 0  # the slot the running iteration writes
        self.filled = 0  # committed records, at most ``slots``
        self.written = False  # the free slot holds the running iteration's record
        self._make_views()
        self._weigh()

    @property
    def record_size(self) -> int:
        channels, groups, depth = self.shape
        return 2 * channels + 1 + groups * depth + channels * depth

    @property
    def slots(self) -> int:
        """``S``: the past iterations the window holds."""
        return self.records.shape[0] - 1

    def _make_views(self) -> None:
        channels, groups, depth = self.shape
        physical = self.records.shape[0]
        sizes = (channels, channels, 1, groups * depth, channels * depth)
        shapes = ((channels,), (channels,), (), (groups, depth), (channels, depth))
        for name, part, shape in zip(FIELDS, self.records.split(sizes, dim=1), shapes):
            setattr(self, name, part.view(physical, *shape))

    def _weigh(self) -> None:
        """The slots' weights in the window: their validity, the free slot's 0 (a copy: the
        running iteration writes its own validity into the free slot)."""
        self.slot_weight = self.valid.clone()
        self.slot_weight[self.free].zero_()  # not `= 0`: a copy from the host
        self.window = 1 + self.slot_weight.sum()

    def past(self, compensated: bool) -> PastRecords:
        """The slots as the window normalization reads them (the free one weighs 0)."""
        return PastRecords(self.mean, self.var_intercept, self.slot_weight, self.window,
                           self.xbar if compensated else None,
                           self.grad_var if compensated else None)

    def free_slot(self) -> SlotRecord:
        """The free slot's fields, where the running iteration writes its record (then
        :meth:`settle` it)."""
        self.written = True
        free = self.free
        compensated = self.shape[2] > 0
        return SlotRecord(self.mean[free], self.var_intercept[free],
                          self.xbar[free] if compensated else None,
                          self.grad_var[free] if compensated else None)

    def settle(self, bad: Tensor) -> None:
        """Mark the running iteration's record valid, or, where ``bad`` (0-d bool), all zeros
        and invalid, so that it stays out of the window (no host sync)."""
        self.valid[self.free].fill_(1)
        self.records[self.free].masked_fill_(bad, 0)

    def commit(self) -> None:
        """The running iteration's record joins the window, the oldest leaves (no host sync)."""
        if not self.written:
            return
        self.written = False
        self.free = (self.free + 1) % self.records.shape[0]
        self.filled = min(self.filled + 1, self.slots)
        self._weigh()

    def resized(self, slots: int) -> 'History':
        """A history with ``slots`` slots holding the newest records of this one (and the
        running iteration's, if written)."""
        new = History(slots, *self.shape, self.records.device, self.records.dtype)
        physical = self.records.shape[0]
        newest = [(self.free - 1 - j) % physical for j in range(min(slots, self.filled))]
        for j, i in enumerate(reversed(newest)):
            new.records[j] = self.records[i]
        new.free, new.filled = len(newest), len(newest)
        if self.written:
            new.records[new.free] = self.records[self.free]
            new.written = True
        new._weigh()
        return new

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a conversion to the tensors, keeping the records in :attr:`records`' dtype
        unless it becomes float64 (a device move follows ``fn``, a cast to 16 bits does not)."""
        probe = fn(torch.zeros((), dtype=self.records.dtype, device=self.records.device))
        dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
        self.records = self.records.to(probe.device, dtype)
        self._make_views()
        self._weigh()

    def state(self) -> dict[str, Tensor]:
        """The named fields and the ring position ``[free, filled, written]`` (checkpoints)."""
        state = {name: getattr(self, name).clone() for name in FIELDS}
        state['cursor'] = torch.tensor([self.free, self.filled, int(self.written)])
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> 'History':
        """The inverse of :meth:`state`."""
        mean, xbar = state['mean'], state['xbar']
        history = cls(mean.shape[0] - 1, mean.shape[1], xbar.shape[1], xbar.shape[2], device,
                      mean.dtype)
        for name in FIELDS:
            getattr(history, name).copy_(state[name])
        history.free, history.filled, written = (int(v) for v in state['cursor'])
        history.written = bool(written)
        history._weigh()
        return history
