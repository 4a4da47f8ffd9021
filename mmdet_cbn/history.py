"""The records of past iterations at one call site of a CBN layer, in one flat ring buffer."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .functional import SlotRecord, PastRecords

__all__ = ['History']

FIELDS = ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var')


class History:
    """The :class:`~mmdet_cbn.functional.SlotRecord` of the last ``S`` iterations.

    All slots live in one ``(S, R)`` tensor, so that committing a record is one copy; the
    fields are named views of it (``mean`` ``(S, C)``, ``var_intercept`` ``(S, C)``, ``valid``
    ``(S,)``, ``xbar`` ``(S, g, D)``, ``grad_var`` ``(S, C, D)``; ``D = 0`` without
    compensation). Empty and discarded (non-finite) slots are zeros, ``valid = 0``.

    The record of the running iteration waits in :attr:`pending` until the next iteration
    starts (:meth:`commit`): until then the window is the same for every forward of this
    iteration, so a gradient-checkpointing recomputation sees what the first forward saw.
    """

    def __init__(self, slots: int, channels: int, groups: int, depth: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shape = (channels, groups, depth)
        self.records = torch.zeros(slots, self.record_size, device=device, dtype=dtype)
        self.cursor = 0
        self.filled = 0
        self.pending: Tensor | None = None
        self._make_views()

    @property
    def record_size(self) -> int:
        channels, groups, depth = self.shape
        return 2 * channels + 1 + groups * depth + channels * depth

    @property
    def slots(self) -> int:
        return self.records.shape[0]

    def _make_views(self) -> None:
        channels, groups, depth = self.shape
        sizes = (channels, channels, 1, groups * depth, channels * depth)
        shapes = ((channels,), (channels,), (), (groups, depth), (channels, depth))
        parts = self.records.split(sizes, dim=1)
        for name, part, shape in zip(FIELDS, parts, shapes):
            setattr(self, name, part.view(self.slots, *shape))
        self._weigh_slots()

    def _weigh_slots(self) -> None:
        """The window the slots make: 1 + the valid ones (it changes at commits)."""
        self.window = 1 + self.valid.sum()

    def pack(self, record: SlotRecord, *also: Tensor) -> Tensor:
        """One flat tensor of ``record`` in this history's layout (its first ``R`` values),
        followed by ``also`` (checked for finiteness with it in one pass)."""
        parts = [record.mean, record.var_intercept, record.valid]
        if record.xbar is not None:
            parts += [record.xbar.reshape(-1), record.grad_var.reshape(-1)]
        return torch.cat(parts + list(also))

    def past(self, compensated: bool) -> PastRecords:
        """The slots as the window normalization reads them."""
        return PastRecords(self.mean, self.var_intercept, self.valid, self.window,
                            self.xbar if compensated else None,
                            self.grad_var if compensated else None)

    @torch.no_grad()
    def commit(self) -> None:
        """Move the pending record into the oldest slot (no host sync)."""
        if self.pending is None:
            return
        self.records[self.cursor].copy_(self.pending[:self.record_size])
        self.pending = None
        self._weigh_slots()
        self.cursor = (self.cursor + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def resized(self, slots: int) -> 'History':
        """A history with ``slots`` slots holding the newest records of this one."""
        self.commit()
        new = History(slots, *self.shape, self.records.device, self.records.dtype)
        newest = [(self.cursor - 1 - j) % self.slots for j in range(min(slots, self.filled))]
        for j, i in enumerate(reversed(newest)):
            new.records[j] = self.records[i]
        new._weigh_slots()
        new.cursor = len(newest) % slots
        new.filled = len(newest)
        return new

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a conversion to the tensors, keeping the records in :attr:`records`' dtype
        unless it becomes float64 (a device move follows ``fn``, a cast to 16 bits does not)."""
        probe = fn(torch.zeros((), dtype=self.records.dtype, device=self.records.device))
        dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
        self.records = self.records.to(probe.device, dtype)
        if self.pending is not None:
            self.pending = self.pending.to(probe.device, dtype)
        self._make_views()

    def state(self) -> dict[str, Tensor]:
        """The named fields, pending record included (for checkpoints)."""
        state = {name: getattr(self, name).clone() for name in FIELDS}
        state['cursor'] = torch.tensor([self.cursor, self.filled])
        if self.pending is not None:
            state['pending'] = self.pending.clone()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> 'History':
        """The inverse of :meth:`state`."""
        mean, xbar = state['mean'], state['xbar']
        history = cls(mean.shape[0], mean.shape[1], xbar.shape[1], xbar.shape[2], device,
                      mean.dtype)
        for name in FIELDS:
            getattr(history, name).copy_(state[name])
        history._weigh_slots()
        history.cursor, history.filled = (int(v) for v in state['cursor'])
        if 'pending' in state:
            history.pending = state['pending'].to(device)
        return history
