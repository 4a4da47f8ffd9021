"""The records of past iterations at one call site of a CBN layer, in one flat ring buffer."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .functional import RingState, record_layout

__all__ = ['History']

FIELDS = ('mean', 'var_intercept', 'valid', 'xbar', 'grad_var')


class History:
    """The :class:`~mmdet_cbn.functional.SlotRecord` of the last ``S`` iterations, and a free
    slot where the running iteration writes its own.

    All ``S + 1`` slots live in one ``(S + 1, R)`` tensor (``records``); the fields are named
    views of it (``mean`` ``(S + 1, C)``, ``var_intercept`` ``(S + 1, C)``, ``valid``
    ``(S + 1,)``, ``xbar`` ``(S + 1, g, D)``, ``grad_var`` ``(S + 1, C, D)``; ``D = 0``
    without compensation). Empty and discarded slots have ``valid = 0``; they and the free
    slot weigh 0 in the window. The ring position lives in the tensor ``cursor = [free,
    filled, written]`` and the slots' weights in ``slot_weight`` / ``window``, so that a step
    changes no Python number (``torch.compile`` does not recompile from one iteration to the
    next) and reads nothing back to the host.

    The record of the running iteration waits in the free slot until the next iteration starts
    (:meth:`commit`): until then the window is the same for every forward of this iteration,
    so a gradient-checkpointing recomputation sees what the first forward saw.
    """

    def __init__(self, slots: int, channels: int, groups: int, depth: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shape = (channels, groups, depth)
        self.records = torch.zeros(slots + 1, self.record_size, device=device, dtype=dtype)
        self.cursor = torch.zeros(3, dtype=torch.long, device=device)
        self.cursor_moves = _cursor_moves(slots + 1, device)
        self.slot_weight = torch.zeros(slots + 1, device=device, dtype=dtype)
        self.window = torch.ones(1, device=device, dtype=dtype)
        self.in_flight: list = []  # SyncCBN: (work, row) of a pooled record being all-reduced
        self._make_views()

    @property
    def record_size(self) -> int:
        return sum(record_layout(*self.shape).values())

    @property
    def slots(self) -> int:
        """``S``: the past iterations the window holds."""
        return self.records.shape[0] - 1

    @property
    def free(self) -> int:
        """The slot the running iteration writes (reads the cursor: a host sync)."""
        return int(self.cursor[0])

    @property
    def filled(self) -> int:
        """Committed records, at most ``S`` (a host sync)."""
        return int(self.cursor[1])

    @property
    def written(self) -> bool:
        """Whether the free slot holds the running iteration's record (a host sync)."""
        return bool(self.cursor[2])

    def _make_views(self) -> None:
        channels, groups, depth = self.shape
        physical = self.records.shape[0]
        layout = record_layout(channels, groups, depth)
        shapes = ((channels,), (channels,), (), (groups, depth), (channels, depth))
        for (name, part), shape in zip(zip(FIELDS, self.records.split(list(layout.values()),
                                                                      dim=1)), shapes):
            setattr(self, name, part.view(physical, *shape))

    def ring(self) -> RingState:
        """The tensors a training step reads and writes."""
        return RingState(self.records, self.cursor, self.slot_weight, self.window)

    def settle(self) -> None:
        """Write the pooled record whose all-reduce was in flight into the free slot (SyncCBN;
        the step leaves it in :attr:`in_flight` so that the communication overlaps)."""
        while self.in_flight:
            work, row = self.in_flight.pop(0)
            work.wait()
            self.records.index_copy_(0, self.cursor[:1], row)

    def commit(self) -> None:
        """The running iteration's record joins the window, the oldest leaves (no host sync)."""
        self.settle()
        _commit(self._valid_column(), self.cursor, self.cursor_moves, self.slot_weight,
                self.window)

    def __getstate__(self) -> dict:
        self.settle()
        return self.__dict__.copy()

    def _valid_column(self) -> Tensor:
        """``valid`` as a view made here of ``records``: a compiled graph must not get two
        views of one storage as inputs when it writes one of them (aot_autograd refuses)."""
        return self.records[:, 2 * self.shape[0]]

    def resized(self, slots: int) -> 'History':
        """A history with ``slots`` slots holding the newest records of this one (and the
        running iteration's, if written). Reads the cursor (a host sync): not for every step."""
        self.settle()
        new = History(slots, *self.shape, self.records.device, self.records.dtype)
        physical = self.records.shape[0]
        free, filled, written = (int(v) for v in self.cursor)
        newest = [(free - 1 - j) % physical for j in range(min(slots, filled))]
        for j, i in enumerate(reversed(newest)):
            new.records[j] = self.records[i]
        if written:
            new.records[len(newest)] = self.records[free]
        new.cursor.copy_(torch.tensor([len(newest), len(newest), written]))
        new._weigh()
        return new

    def _weigh(self) -> None:
        """The slots' weights from their validity and the cursor (after a direct change)."""
        _weigh(self._valid_column(), self.cursor, self.slot_weight, self.window)

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a conversion to the tensors, keeping the records in :attr:`records`' dtype
        unless it becomes float64 (a device move follows ``fn``, a cast to 16 bits does not)."""
        self.settle()
        probe = fn(torch.zeros((), dtype=self.records.dtype, device=self.records.device))
        dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
        self.records = self.records.to(probe.device, dtype)
        self.cursor = self.cursor.to(probe.device)
        self.cursor_moves = self.cursor_moves.to(probe.device)
        self.slot_weight = self.slot_weight.to(probe.device, dtype)
        self.window = self.window.to(probe.device, dtype)
        self._make_views()

    def state(self) -> dict[str, Tensor]:
        """The named fields and the ring position ``[free, filled, written]`` (checkpoints)."""
        self.settle()
        state = {name: getattr(self, name).clone() for name in FIELDS}
        state['cursor'] = self.cursor.clone()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> 'History':
        """The inverse of :meth:`state`."""
        mean, xbar = state['mean'], state['xbar']
        history = cls(mean.shape[0] - 1, mean.shape[1], xbar.shape[1], xbar.shape[2], device,
                      mean.dtype)
        for name in FIELDS:
            getattr(history, name).copy_(state[name])
        history.cursor.copy_(state['cursor'])
        history._weigh()
        return history


def _weigh(valid: Tensor, cursor: Tensor, slot_weight: Tensor, window: Tensor) -> None:
    """``slot_weight = valid`` except the free slot's 0; ``window = 1 + sum(slot_weight)``
    (shape ``(1,)``: dynamo drops an in-place copy into a 0-d input, torch 2.13)."""
    slots = torch.arange(valid.shape[0], device=valid.device)
    torch.mul(valid, slots.ne(cursor[0]), out=slot_weight)
    torch.sum(slot_weight, 0, keepdim=True, out=window).add_(1)


def _cursor_moves(physical: int, device: torch.device) -> Tensor:
    """``(2, 3)`` long: how a commit moves ``[free, filled, written]`` (:func:`_commit`)."""
    return torch.tensor([[1, 1, -1], [physical, 1, 0]], device=device)


def _commit(valid: Tensor, cursor: Tensor, moves: Tensor, slot_weight: Tensor,
            window: Tensor) -> None:
    """Advance the ring past a written free slot, ``[free, filled, written] <- [(free + w) %
    P, min(filled + w, P - 1), 0]`` with ``w = written``, then weigh the slots.

    In one expression over the whole cursor: add ``w moves[0] = w [1, 1, -1]``, then take
    ``moves[1] = [P, 1, 0]`` from the positions that reached ``P`` (free wraps to 0, filled
    stays at ``P - 1``). Compiled into a model, the ring's free slot is then a short
    expression of the cursor, not one that every element of the record's write recomputes
    through a chain of slice updates."""
    moved = torch.addcmul(cursor, cursor[2], moves[0])
    cursor.copy_(torch.addcmul(moved, moved.eq(valid.shape[0]), moves[1], value=-1))
    _weigh(valid, cursor, slot_weight, window)
