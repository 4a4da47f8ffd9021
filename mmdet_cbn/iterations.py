"""Where a CBN layer is within the training iteration: call sites, iteration boundaries, the
paired conv's activations and gradient-checkpointing recomputations.

Plain Python numbers that are the same at the start of every iteration, so that
``torch.compile`` traces their updates as side effects without recompiling; everything that
changes from one iteration to the next (the iteration count, the rings) lives in tensors.
"""
from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import Tensor, nn

__all__ = ['CallSites', 'ConvTap', 'BackwardTap']

MANY_CALL_SITES = 64  # per iteration: more is probably a loop without backward


class ConvTap:
    """Forward hook on the conv paired with a CBN layer: hands the layer the conv's input and
    output while the layer is in training mode.

    It holds the layer weakly and stores nothing for a layer in eval mode, so a conv whose
    layer is gone holds no activations: ``mmcv.cnn.fuse_conv_bn`` replaces the layer by an
    ``Identity`` (the layer is freed with its history), ``fuse_conv_bn_eval`` copies the conv.
    ``copy.deepcopy`` of a model (EMA, model soups) re-targets the hook to the copied layer;
    pickling keeps it.
    """

    def __init__(self, cbn: nn.Module | None) -> None:
        self.cbn = _dead if cbn is None else weakref.ref(cbn)

    def __call__(self, conv: nn.Module, inputs: tuple, output: Tensor) -> None:
        cbn = self.cbn()
        if cbn is not None and cbn.training:
            cbn._call_sites.conv_io = (inputs[0], output)

    def __deepcopy__(self, memo: dict) -> 'ConvTap':
        return type(self)(copy.deepcopy(self.cbn(), memo))

    def __reduce__(self) -> tuple:
        return type(self), (self.cbn(),)


class BackwardTap(ConvTap):
    """Gradient hook on the parameters of a CBN layer and its conv: a backward pass through
    the layer ends its iteration. Hooks on leaf parameters run outside compiled graphs, so
    this works the same in eager and compiled models. Holds the layer weakly, as
    :class:`ConvTap`."""

    def __call__(self, grad: Tensor) -> None:
        cbn = self.cbn()
        if cbn is not None:
            cbn._iteration_ended()


def _dead() -> None:
    """The target of a tap whose layer is gone."""
    return None


def watch_backward(cbn: nn.Module, params: list[nn.Parameter | None]) -> None:
    """Put a :class:`BackwardTap` of ``cbn`` on each parameter that has none yet (a copied or
    replaced parameter has none)."""
    for param in params:
        if param is None or not param.requires_grad:
            continue
        hooks = param._backward_hooks or {}
        if not any(isinstance(h, BackwardTap) and h.cbn() is cbn for h in hooks.values()):
            param.register_hook(BackwardTap(cbn))


class CallSites:
    """The call-site and iteration bookkeeping of one CBN layer.

    The ``n``-th training call of an iteration is call site ``n``. An iteration starts at the
    first training call after :meth:`new_iteration`; unless iterations are marked that way
    (``explicit``), also after a backward pass through the layer or after a call whose output
    needs no gradient. A call inside a backward pass is a gradient-checkpointing
    recomputation: it is matched to its call site by its input shape and changes nothing.
    """

    def __init__(self) -> None:
        self.next_site = 0  # the call site of the next call = calls so far this iteration
        self.ended = True  # the next training call starts an iteration
        self.explicit = False  # iterations are marked by new_iteration() only
        self.shapes: list[torch.Size] = []  # input shape per call site (eager: recomputation)
        self.conv_io: tuple[Tensor, Tensor] | None = None  # the paired conv's last (x, y)

    def new_iteration(self) -> None:
        self.explicit = True
        self.ended = True

    def backward_ran(self) -> None:
        if not self.explicit:
            self.ended = True

    def enter(self, input: Tensor, name: str) -> tuple[int, bool, bool]:
        """``(call site, recomputing, starts an iteration)`` of a training call."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            sites = [i for i, shape in enumerate(self.shapes) if shape == input.shape]
            if len(sites) != 1:
                raise RuntimeError(
                    f'{name}: a gradient-checkpointing recomputation of a CBN layer called '
                    f'{len(self.shapes)} times per iteration, {len(sites)} of them with input '
                    f'shape {tuple(input.shape)}: its call site is ambiguous. Fix: keep this '
                    'layer out of the checkpointed segment, or use BN/GN there.')
            return sites[0], True, False
        if self.ended:
            return 0, False, True
        return self.next_site, False, False

    def leave(self, site: int, input: Tensor, out: Tensor, name: str) -> None:
        """Record a finished (not recomputed) training call."""
        if site == 0:
            self.shapes.clear()
            self.ended = False
        if not torch.compiler.is_compiling():
            self.shapes.append(input.shape)
        self.next_site = site + 1
        if self.next_site == MANY_CALL_SITES:
            warnings.warn(
                f'CBN layer {name!r} ran {MANY_CALL_SITES} times in one iteration without a '
                'backward pass: every call is a call site with a history of its own. If these '
                'calls are separate iterations, run them under torch.no_grad(), call backward, '
                'or mark iterations with new_iteration() (CBNBurnInHook does).', stacklevel=4)
        if not out.requires_grad and not self.explicit:
            self.ended = True  # no backward will come to tell

    def reset(self) -> None:
        """Forget the running iteration (a state dict was loaded)."""
        self.shapes = []
        self.ended = True
