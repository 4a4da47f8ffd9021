"""``CrossIterationBatchNorm2d``: the CBN layer (state, call sites, forward)."""
from __future__ import annotations

import difflib
import inspect
import itertools
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import (ConvGeometry, nonfinite, record_statistics, stat_dtype,
                         update_running_stats, window_normalize)
from .history import FIELDS, History

__all__ = ['CrossIterationBatchNorm2d']

COMPENSATIONS = ('taylor', 'none')
_RENAMED = {'backprop_past_stats': "the exact gradient is now the default; the authors' "
                                   'detached variant is detach_compensation=True'}
_layer_numbers = itertools.count()  # gives each layer's sampler its own seed
_MANY_CALL_SITES = 64  # per iteration: more is probably a loop without backward


def _unknown_arguments_message(unknown: dict) -> str:
    valid = [p for p in inspect.signature(CrossIterationBatchNorm2d.__init__).parameters
             if p not in ('self', 'unknown')]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = _RENAMED.get(key) or (f'did you mean {close[0]!r}?' if close else None)
        hints.append(f'{key!r}' + (f' ({hint})' if hint else ''))
    return (f"CBN (CrossIterationBatchNorm2d) got unknown argument(s) {', '.join(hints)}; "
            f"valid keys of norm_cfg=dict(type='CBN', ...) are {', '.join(valid)} and "
            'requires_grad')


@dataclass
class _Calls:
    """Where a layer is within the training iteration (a plain object: cheap to update)."""

    index: int = 0  # the call site of the next call
    iteration_ended: bool = True  # the next training call starts an iteration
    explicit: bool = False  # iterations are marked by new_iteration() only
    shapes: list = field(default_factory=list)  # input shape of each call site this iteration
    conv_io: tuple | None = None  # the paired conv's last (input, output)


class _ConvTap:
    """Forward hook on the conv paired with a CBN layer: hands it the conv's input and output.

    A callable object rather than a closure so that ``copy.deepcopy`` of a model (EMA, model
    soups) re-targets the hook to the copied CBN layer.
    """

    def __init__(self, cbn: 'CrossIterationBatchNorm2d') -> None:
        self.cbn = cbn

    def __call__(self, conv: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.cbn._calls.conv_io = (inputs[0], output)


class CrossIterationBatchNorm2d(_BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) over a 4-d input.

    In training the statistics of the current batch are aggregated with those of the previous
    ``window_size - 1`` iterations, each moved to the current weights of the preceding conv by
    a first-order Taylor step (Eq. 7-10), then used as BatchNorm's (Eq. 11). With a window of
    1 (and during burn-in) it *is* ``BatchNorm2d``; in eval mode it normalizes with the running
    statistics, exactly as BN. The math, in the form implemented: ``docs/math.md``.

    **Gradient.** By default the exact gradient of this forward: through the current batch and
    through the compensated past statistics' dependence on the current conv weight and bias
    (``mu_hat = W(t) . Xbar + b(t)``, ``d var_hat / d W(t) = grad_var - 2 delta Xbar``); past
    inputs and weights are constants. ``detach_compensation=True`` holds the compensated
    statistics constant instead, as the authors' code does (``weight.data``).

    **Pairing.** The layer needs the conv that produces its input:
    :func:`mmdet_cbn.pair_cbn_layers` (called by :class:`mmdet_cbn.CBNBurnInHook` and
    :func:`mmdet_cbn.convert_cbn`) finds it. At the first windowed step the layer checks once
    that the conv's output is ``conv2d(input, weight, bias)`` with its geometry, so a conv that
    transforms its weight or input (weight standardization, adaptive padding) is an error.

    **Iterations and call sites.** A layer may run several times per iteration (a head shared
    by the FPN levels); its n-th call of an iteration is aggregated with the n-th calls of the
    previous iterations only, each call site with its own history. An iteration starts at the
    first training call after :meth:`new_iteration` (``CBNBurnInHook`` calls it before every
    training iteration); without that, after a backward pass has run through the layer, or
    after a call whose output needs no gradient. Every micro-batch of gradient accumulation is
    an iteration: with unchanged weights the compensation is exact, and the window pools the
    micro-batches. A gradient-checkpointing recomputation (detected as a forward inside a
    backward pass) reproduces its first forward and changes no state. ``steps``,
    ``burnin_iters`` and the window count iterations.

    **Running statistics** are updated at every call, as BN does, with ``momentum``, from the
    window's mean and variance, the variance unbiased by ``n / (n - 1)`` with ``n`` the examples
    per channel over the window. A call with non-finite statistics changes neither them nor the
    history (it counts in ``nonfinite_batches``). History and statistics of the window are
    float32 (float64 for float64 inputs) whatever the input or module dtype.
    ``clamped_variances`` counts ``[clamped, all]`` compensated past variances since its last
    reset (``CBNBurnInHook`` logs and resets it): those that came out below 0 and were clamped
    are a sign that the weights moved too far for the Taylor step.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``.
        eps, momentum, affine, track_running_stats: as in ``torch.nn.BatchNorm2d``.
        window_size: iterations aggregated, the current one included (``k``, paper default 4).
        compensation: ``'taylor'`` (CBN) or ``'none'`` (the paper's Naive CBN).
        burnin_iters: the first iterations use window 1; ignored while a hook sets the window
            (:meth:`set_window`).
        grad_nu_stride: ``s > 1`` estimates ``d var / d W`` from ``1 / s^2`` of the examples,
            drawn by the layer's own generator (unbiased, ``s^2`` times cheaper): every
            ``s^2``-th image or RoI when there are at least ``4 s^2`` of them (RoI heads), else
            every ``s``-th output position in each direction (FPN levels).
        detach_compensation: hold the compensated past statistics constant in the backward
            (the authors' code) instead of the exact gradient. No effect without compensation.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window_size: int = 4,
                 compensation: str = 'taylor', burnin_iters: int = 0, grad_nu_stride: int = 1,
                 detach_compensation: bool = False, device=None, dtype=None,
                 **unknown) -> None:
        if unknown:
            raise TypeError(_unknown_arguments_message(unknown))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        for name, value, low in (('window_size', window_size, 1),
                                 ('burnin_iters', burnin_iters, 0),
                                 ('grad_nu_stride', grad_nu_stride, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f'CBN {name} must be an integer >= {low}, got {value!r}')
        if compensation not in COMPENSATIONS:
            raise ValueError(f'CBN compensation must be one of {COMPENSATIONS} '
                             f"('none' = Naive CBN), got {compensation!r}")
        self.window_size = window_size
        self.compensation = compensation
        self.burnin_iters = burnin_iters
        self.grad_nu_stride = grad_nu_stride
        self.detach_compensation = bool(detach_compensation)
        self.window_override: int | None = None
        self.steps = 0
        self.nonfinite_batches = torch.zeros((), dtype=torch.long, device=device)
        # [clamped, all] compensated past variances since the last reset (a diagnostic)
        self.clamped_variances = torch.zeros(2, dtype=torch.long, device=device)
        self.layer_name = type(self).__name__
        self.histories: list[History | None] = []
        self._calls = _Calls()
        self._sampler: torch.Generator | None = None
        if grad_nu_stride > 1:
            self._sampler = torch.Generator().manual_seed(
                torch.initial_seed() + next(_layer_numbers))
        self._conv: nn.Conv2d | None = None
        self._geometry: ConvGeometry | None = None
        self._conv_verified = False
        _keep_training_forward_eager()

    # ------------------------------------------------------------------ configuration
    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window_size={self.window_size}, '
                f'compensation={self.compensation!r}, burnin_iters={self.burnin_iters}'
                + (f', grad_nu_stride={self.grad_nu_stride}' if self.grad_nu_stride > 1 else '')
                + (', detach_compensation=True' if self.detach_compensation else ''))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'{self.layer_name}: expected a 4-d input (N, C, H, W), got '
                             f'{input.dim()}-d')

    def window_at(self, iteration: int) -> int:
        """The window of the (1-based) training iteration: the hook's if set, else 1 during
        ``burnin_iters``, else ``window_size``."""
        if self.window_override is not None:
            return self.window_override
        return 1 if iteration <= self.burnin_iters else self.window_size

    @property
    def window(self) -> int:
        """The window the next training call uses."""
        return self.window_at(self.steps + self._calls.iteration_ended)

    def set_window(self, window: int | None) -> None:
        """Fix the window in use (a burn-in hook calls this); None returns to ``burnin_iters``."""
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f'{self.layer_name}: window must be an integer >= 1, got {window!r}')
        self.window_override = window

    def new_iteration(self) -> None:
        """Start a new iteration at the next training call; from now on only this does.

        ``CBNBurnInHook`` calls it before every training iteration of an mmengine run."""
        self._calls.explicit = True
        self._calls.iteration_ended = True

    @property
    def num_call_sites(self) -> int:
        """How many times the layer ran in its last training iteration."""
        return len(self._calls.shapes)

    @property
    def paired_conv(self) -> nn.Conv2d | None:
        """The conv whose output this layer normalizes (set by ``pair_cbn_layers``)."""
        return self._conv

    def pair(self, conv: nn.Conv2d, name: str | None = None) -> None:
        """Feed this layer the weight and input of ``conv``, whose output it normalizes."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f'{self.layer_name}: can only pair with an nn.Conv2d, got '
                            f'{type(conv).__name__}')
        if conv.out_channels != self.num_features:
            raise ValueError(f'{self.layer_name}: conv has {conv.out_channels} output channels, '
                             f'CBN has {self.num_features}')
        geometry = ConvGeometry.of(conv)
        if name is not None:
            self.layer_name = name
        if self._conv is conv:
            return
        if self._conv is not None:
            raise RuntimeError(f'{self.layer_name} is already paired with another conv')
        conv.register_forward_hook(_ConvTap(self))
        object.__setattr__(self, '_conv', conv)  # a reference, not a child module
        self._geometry = geometry

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            self._calls.conv_io = None  # holds no activation past its use
            return super().forward(input)
        if torch.compiler.is_compiling():  # a graph break: the state lives in Python
            return self._training_forward_eager(input)
        return self._training_forward(input)

    def _training_forward(self, input: Tensor) -> Tensor:
        """The training forward; ``torch.compile`` runs it eager (:meth:`forward`)."""
        calls = self._calls
        conv_io, calls.conv_io = calls.conv_io, None
        if conv_io is not None and conv_io[1] is not input:
            conv_io = None
        recomputing = torch._C._current_graph_task_id() != -1
        site, steps = self._call_site(input, recomputing)
        window = self.window_at(steps)
        if input.numel() == 0:  # e.g. a RoI head without RoIs: touch no statistic
            out = self._empty_forward(input)
        elif window == 1:
            self.histories.clear()
            out = self._forward_window(input, None, None, recomputing)
        else:
            if self.compensation == 'taylor' and not recomputing:
                self._verify_conv(conv_io)
            out = self._forward_window(input, conv_io, self._history(site, window, input),
                                       recomputing)
        if not recomputing:
            self._end_call(site, steps, input, out)
        return out

    def _call_site(self, input: Tensor, recomputing: bool) -> tuple[int, int]:
        """``(call site, iteration)`` of this call; commits the records of the last iteration
        when this call starts a new one (nothing else changes until the call succeeds)."""
        if recomputing:
            shapes = self._calls.shapes
            sites = [i for i, shape in enumerate(shapes) if shape == input.shape]
            if len(sites) != 1:
                raise RuntimeError(
                    f'{self.layer_name}: a gradient-checkpointing recomputation of a CBN layer '
                    f'called {len(shapes)} times per iteration, {len(sites)} of them '
                    f'with input shape {tuple(input.shape)}: its call site is ambiguous. Fix: '
                    'keep this layer out of the checkpointed segment, or use BN/GN there.')
            return sites[0], self.steps
        if not self._calls.iteration_ended:
            return self._calls.index, self.steps
        for history in self.histories:
            if history is not None:
                history.commit()
        return 0, self.steps + 1

    def _end_call(self, site: int, steps: int, input: Tensor, out: Tensor) -> None:
        calls = self._calls
        if site == 0:
            calls.shapes.clear()
            calls.iteration_ended = False
            self.steps = steps
        calls.shapes.append(input.shape)
        calls.index = site + 1
        if calls.index == _MANY_CALL_SITES:
            warnings.warn(
                f'CBN layer {self.layer_name!r} ran {_MANY_CALL_SITES} times in one iteration '
                'without a backward pass: every call is a call site with a history of its own. '
                'If these calls are separate iterations, run them under torch.no_grad(), call '
                'backward, or mark iterations with new_iteration() (CBNBurnInHook does).',
                stacklevel=3)
        if not out.requires_grad and not calls.explicit:
            calls.iteration_ended = True  # no backward will come to tell

    def _on_backward(self) -> None:
        if not self._calls.explicit:
            self._calls.iteration_ended = True

    def _empty_forward(self, input: Tensor) -> Tensor:
        if not self.affine:
            return input.clone()
        out = input * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if out.requires_grad:
            out.register_hook(lambda grad: self._on_backward())
        return out

    def _history(self, site: int, window: int, input: Tensor) -> History:
        taylor = self.compensation == 'taylor'
        shape = (self.num_features, self._geometry.groups if taylor else 1,
                 self._geometry.depth if taylor else 0)
        if len(self.histories) <= site:  # extend, not +=: Module.__setattr__ costs per call
            self.histories.extend([None] * (site + 1 - len(self.histories)))
        history = self.histories[site]
        if history is None or history.shape != shape:
            history = History(window - 1, *shape, input.device, stat_dtype(input))
        elif history.slots != window - 1:
            history = history.resized(window - 1)
        self.histories[site] = history
        return history

    def _forward_window(self, y: Tensor, conv_io: tuple[Tensor, Tensor] | None,
                        history: History | None, recomputing: bool) -> Tensor:
        """Eq. 7-11 with the window of ``history`` (None: plain BN), then the call's record."""
        count = y.numel() // y.shape[1]
        if count == 1 and (history is None or history.filled == 0):
            raise ValueError(f'{self.layer_name}: expected more than 1 value per channel when '
                             f'training with no past statistics yet (input {tuple(y.shape)}); '
                             'use a larger batch or feature map, or GroupNorm')
        taylor = history is not None and self.compensation == 'taylor'
        weight = bias = None
        if taylor:
            weight, bias = self._conv.weight, self._conv.bias
            if self.detach_compensation:
                weight, bias = weight.detach(), None if bias is None else bias.detach()
        past = history.past(taylor) if history is not None and history.filled else None
        with torch.autocast(y.device.type, enabled=False) if _autocast_on(y) else _nothing():
            out, mean, var, window = window_normalize(
                y, self.weight, self.bias, self.eps, weight=weight, bias=bias, past=past,
                on_backward=self._on_backward,
                clamped=None if recomputing else self.clamped_variances)
            if not recomputing:
                self._commit(y, conv_io, history, mean, var, window, count)
        return out

    @torch.no_grad()
    def _commit(self, y: Tensor, conv_io: tuple[Tensor, Tensor] | None,
                history: History | None, mean: Tensor, var: Tensor, window: Tensor,
                count: int) -> None:
        """Record this call for the next iterations and update the running statistics from the
        ``window``'s mean and variance; a call with a non-finite window changes neither (no
        host sync). A finite window means a finite batch and record: ``y = conv(x; W)`` is
        non-finite wherever an input or weight it reads is."""
        bad = nonfinite(window)
        self.nonfinite_batches.add_(bad)
        if history is not None:
            taylor = self.compensation == 'taylor'
            record_statistics(
                conv_io[0] if taylor else None, y, mean, var,
                self._conv.weight if taylor else None, self._geometry if taylor else None,
                grad_stride=self.grad_nu_stride, draw=self._draw(), out=history.free_slot())
            history.settle(bad)
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = (self.momentum if self.momentum is not None
                  else 1.0 / self.num_batches_tracked.to(window.dtype))
        # examples per channel over the window (past batches taken as large as this one)
        examples = count * (1 + (history.filled if history is not None else 0))
        update_running_stats(self.running_mean, self.running_var,
                             window.masked_fill_(bad, 0), examples=examples, factor=factor,
                             keep=bad.logical_not())

    def _draw(self) -> tuple[int, int]:
        """Offsets for the sampled ``d var / d W`` from the layer's own generator."""
        if self._sampler is None:
            return (0, 0)
        high = self.grad_nu_stride ** 2
        return tuple(int(v) for v in torch.randint(high, (2,), generator=self._sampler))

    # ------------------------------------------------------------------ checks
    def _unpaired_message(self) -> str:
        return (f"CBN layer '{self.layer_name}' did not receive the input and weight of the "
                'convolution that produces its input, which the Taylor compensation needs. '
                'Fix: call mmdet_cbn.pair_cbn_layers(model) once after building the model (the '
                "CBNBurnInHook does it in mmengine runs: custom_hooks=[dict(type='CBNBurnInHook'"
                ', ...)]), and make sure the layer directly follows an nn.Conv2d; or use '
                "compensation='none' (Naive CBN), which needs no conv.")

    def _verify_conv(self, conv_io: tuple[Tensor, Tensor] | None) -> None:
        """Once: the paired conv's output is ``conv2d(input, weight, bias)`` (one image)."""
        if conv_io is None:
            raise RuntimeError(self._unpaired_message())
        if self._conv_verified or conv_io[1].device.type == 'meta':  # meta: no values
            return
        x, y = conv_io
        conv, geometry = self._conv, self._geometry
        with torch.no_grad():
            expected = F.conv2d(x[:1].float(), conv.weight.float(),
                                None if conv.bias is None else conv.bias.float(),
                                geometry.stride, geometry.padding, geometry.dilation,
                                geometry.groups)
            got = y[:1].float()
            tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(y.dtype, 3e-2)
            same = expected.shape == got.shape and bool(
                (expected - got).abs().max() <= tolerance * (got.abs().max() + 1e-6))
        if not same:
            raise RuntimeError(
                f"CBN layer '{self.layer_name}' follows {type(conv).__name__} "
                f"'{conv.__class__.__module__}.{type(conv).__qualname__}', whose output is not "
                'conv2d(input, weight, bias) with its stride, padding, dilation and groups (it '
                'transforms its weight or input, e.g. weight standardization or padding inside '
                "forward). The Taylor compensation would use the wrong weight. Fix: "
                "compensation='none' (Naive CBN) for this layer, or BN/GN here, or a plain "
                'nn.Conv2d.')
        self._conv_verified = True

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.nonfinite_batches = fn(self.nonfinite_batches)
        self.clamped_variances = fn(self.clamped_variances)
        for history in self.histories:
            if history is not None:
                history.map(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + 'cbn_steps'] = torch.tensor(self.steps)
        destination[prefix + 'cbn_nonfinite_batches'] = self.nonfinite_batches.clone()
        for site, history in enumerate(self.histories):
            if history is not None:
                for name, tensor in history.state().items():
                    destination[f'{prefix}cbn_history.{site}.{name}'] = tensor
        if self._sampler is not None:
            destination[prefix + 'cbn_sampler'] = self._sampler.get_state()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        steps = state_dict.pop(prefix + 'cbn_steps', None)
        nonfinite = state_dict.pop(prefix + 'cbn_nonfinite_batches', None)
        sampler = state_dict.pop(prefix + 'cbn_sampler', None)
        pattern = re.compile(re.escape(prefix) + r'cbn_history\.(\d+)\.(\w+)$')
        stored: dict[int, dict[str, Tensor]] = {}
        for key in [k for k in state_dict if pattern.match(k)]:
            site, name = pattern.match(key).groups()
            stored.setdefault(int(site), {})[name] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if steps is not None:
            self.steps = int(steps)
        if nonfinite is not None:
            self.nonfinite_batches.copy_(nonfinite)
        if sampler is not None and self._sampler is not None:
            self._sampler.set_state(sampler)
        device = self.nonfinite_batches.device
        self.histories = [None] * (max(stored) + 1 if stored else 0)
        for site, fields in stored.items():
            if 'pending' in fields or ('cursor' in fields and fields['cursor'].numel() == 2):
                warnings.warn(f'{prefix}: the CBN history of call site {site} was saved by an '
                              'earlier mmdet-cbn in another layout; it is dropped and the '
                              'window refills in window_size - 1 iterations')
            elif set(FIELDS) | {'cursor'} <= set(fields):
                self.histories[site] = History.from_state(fields, device)
            else:
                error_msgs.append(f'{prefix}: incomplete CBN history of call site {site} in the '
                                  f'state dict (has {sorted(fields)})')
        self._calls.shapes = []
        self._calls.iteration_ended = True


def _keep_training_forward_eager() -> None:
    """The training forward ``torch.compiler.disable``-d, once, when the first layer is built:
    done at import it would import ``torch._dynamo``, which changes torch's safe globals. Only
    a compiled forward calls it: the wrapper costs every eager call several microseconds."""
    cls = CrossIterationBatchNorm2d
    if not hasattr(cls, '_training_forward_eager'):
        cls._training_forward_eager = torch.compiler.disable(cls._training_forward)


def _autocast_on(t: Tensor) -> bool:
    """Whether autocast is on for the device of ``t`` (statistics are kept out of it)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


class _nothing:
    """A context manager that does nothing (cheaper than ``contextlib.nullcontext()``)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None
