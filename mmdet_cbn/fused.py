"""The CBN training step compiled into fused kernels, with the eager step as its fallback.

:func:`~mmdet_cbn.functional.training_step` issues some seventy small operations per call;
compiled by ``torch.compile`` (inductor: C++ on the CPU, Triton on CUDA) they become a few
kernels, forward and backward. The compiled code is the eager function itself, traced, and it
is shared by every layer of the same kind (the same :class:`StepOptions`, window or not):
shapes are dynamic, so a whole detector compiles a handful of graphs.

Where compiling is impossible (no dynamo for this Python, a device inductor does not
support, no C++ compiler, a compiler error) the step runs eager, after one log line.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .functional import RingState, StepOptions, training_step

__all__ = ['fused_step', 'fusion_unavailable', 'FUSED_DEVICES']

FUSED_DEVICES = ('cuda', 'cpu')  # inductor's; CPU and GPU kernels from one source
# graphs per layer kind (dynamo's default: 8 per function): room for the few a kind needs
# (batch 1, a map of 1 pixel, ...)
RECOMPILE_LIMIT = 32
logger = logging.getLogger('mmdet_cbn')

_compiled: dict[tuple, object] = {}
_broken: str | None = None  # a compiler error: the fused step is off for this process
_announced: set[str] = set()


def fusion_unavailable(device: torch.device) -> str | None:
    """Why the fused step cannot run on ``device`` in this process, or None if it can."""
    if _broken is not None:
        return _broken
    if device.type not in FUSED_DEVICES:
        return f'torch.compile (inductor) does not compile for {device.type!r} tensors'
    if not torch._dynamo.is_dynamo_supported():
        return 'torch.compile is not supported on this Python'
    if _get_current_dispatch_mode() is not None:
        return 'a TorchDispatchMode is active'
    return None


def _announce(reason: str) -> None:
    if reason not in _announced:
        _announced.add(reason)
        logger.warning(f'mmdet_cbn: the fused CBN training step is off ({reason}); CBN layers '
                       'run the eager step (the same results, more time per step). fused=False '
                       'chooses the eager step without this message.')


def _compiled_step(key: tuple):
    """The step compiled for one kind of layer: its own code object, so that each kind has
    its own dynamo cache (and recompile limit) and no kind evicts another. Without inductor's
    checks of the input sizes (about 1 us each, some thirty per step): dynamo's guards check
    the same before every call."""
    step = _compiled.get(key)
    if step is None:
        clone = types.FunctionType(training_step.__code__.replace(), training_step.__globals__,
                                   training_step.__name__, training_step.__defaults__,
                                   training_step.__closure__)
        clone.__kwdefaults__ = training_step.__kwdefaults__
        step = _compiled[key] = torch.compile(clone, dynamic=True, fullgraph=True,
                                              recompile_limit=RECOMPILE_LIMIT,
                                              options={'size_asserts': False})
    return step


class _SharedShapes:
    """Around a call of a compiled step, the settings under which dynamo compiles it: no
    "duck sizing" (sizes that happen to be equal, say a map's height and a channel count,
    would become one symbol, and the next layer, where they differ, a recompilation) and
    parameters with symbolic sizes like any tensor (dynamo's default gives them constant
    sizes: one graph per channel count). Set and restored per call (a few microseconds):
    nothing changes for other compiled code."""

    configs = None

    def __enter__(self) -> None:
        if self.configs is None:
            # imported here: importing torch._dynamo registers safe globals for torch.load
            import torch._dynamo.config as dynamo_config
            import torch.fx.experimental._config as fx_config
            type(self).configs = dynamo_config, fx_config
        dynamo_config, fx_config = self.configs
        self.saved = dynamo_config.force_parameter_static_shapes, fx_config.use_duck_shape
        dynamo_config.force_parameter_static_shapes = False
        fx_config.use_duck_shape = False

    def __exit__(self, *exc) -> None:
        dynamo_config, fx_config = self.configs
        dynamo_config.force_parameter_static_shapes, fx_config.use_duck_shape = self.saved


_shared_shapes = _SharedShapes()


def fused_step(y: Tensor, x: Tensor | None, gamma: Tensor | None, beta: Tensor | None,
               conv_weight: Tensor | None, conv_bias: Tensor | None, *, options: StepOptions,
               ring: RingState | None, record: bool, **kwargs) -> Tensor:
    """:func:`~mmdet_cbn.functional.training_step`, compiled; the eager step where it cannot
    be compiled (announced once per reason; after a compiler error, for the whole process)."""
    global _broken
    args = (x, gamma, beta, conv_weight, conv_bias)
    kwargs.update(options=options, ring=ring, record=record)
    reason = fusion_unavailable(y.device)
    if reason is None:
        step = _compiled_step((options, ring is None, record))
        try:
            # parameters as they are (not views): autograd then adds the conv's own weight
            # gradient into the step's in place, not into a new C x D tensor
            with _shared_shapes:
                return step(y, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the eager step tells whose error it is
            out = training_step(y, *args, **kwargs)  # raises it again if the input is at fault
            message = str(error).strip().splitlines()
            _broken = type(error).__name__ + (f': {message[0]}' if message else '')
            _announce(_broken)
            return out
    _announce(reason)
    return training_step(y, *args, **kwargs)
