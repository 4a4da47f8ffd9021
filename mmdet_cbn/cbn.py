"""``CrossIterationBatchNorm2d``: the CBN layer (history, running statistics, forward)."""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import (ConvGeometry, all_finite, compensate, grad_nu_wrt_weight,
                         mean_input_patch, past_sums, stat_dtype, window_normalize)

COMPENSATIONS = ('taylor', 'none')


@dataclass
class History:
    """The statistics of the last ``S = window - 1`` iterations, kept in a ring buffer.

    Per slot only what the compensation needs (``CBN_MATH.md``, "An identity that removes the
    weight history"): no copy of old weights. Shapes, with ``g`` conv groups and
    ``D = C_in / g * kh * kw``:

    - ``xbar`` ``(S, g, D)``: mean input patch ``d mu / d W`` (empty for ``compensation='none'``);
    - ``grad_nu`` ``(S, C, D)``: ``d nu / d W`` (empty for ``compensation='none'``);
    - ``stats`` ``(S, 4, C)``: ``mu``, ``nu``, ``s = G . W`` and the conv bias at that time;
    - ``count`` ``(S,)``: examples per channel ``M``; ``valid`` ``(S,)``: written and finite.
    """

    xbar: Tensor
    grad_nu: Tensor
    stats: Tensor
    count: Tensor
    valid: Tensor
    cursor: int = 0
    written: int = 0

    @classmethod
    def empty(cls, slots: int, channels: int, groups: int, depth: int, device: torch.device,
              dtype: torch.dtype) -> 'History':
        """Zero-filled, all-invalid history; ``depth = 0`` stores no weight-shaped tensors."""
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)
        return cls(zeros(slots, groups, depth), zeros(slots, channels, depth),
                   zeros(slots, 4, channels), zeros(slots),
                   torch.zeros(slots, device=device, dtype=torch.bool))

    @property
    def slots(self) -> int:
        return self.valid.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` (e.g. a device move) to every tensor, keeping the dtypes."""
        for name, tensor in self.tensors().items():
            setattr(self, name, fn(tensor).to(tensor.dtype))

    @torch.no_grad()
    def push(self, mu: Tensor, nu: Tensor, xbar: Tensor | None, grad_nu: Tensor | None,
             grad_dot_weight: Tensor | None, conv_bias: Tensor | None, count: int,
             valid: Tensor) -> None:
        """Overwrite the oldest slot with the current iteration's record (no host sync)."""
        i = self.cursor
        stats = self.stats[i]
        stats[0].copy_(mu)
        stats[1].copy_(nu)
        for row, value in ((2, grad_dot_weight), (3, conv_bias)):
            if value is None:
                stats[row].zero_()
            else:
                stats[row].copy_(value)
        if xbar is not None:
            self.xbar[i].copy_(xbar)
            self.grad_nu[i].copy_(grad_nu)
        self.count[i].fill_(count)  # a kernel argument: no host-to-device copy
        self.valid[i] = valid
        self.cursor = (i + 1) % self.slots
        self.written = min(self.written + 1, self.slots)

    def resized(self, slots: int) -> 'History':
        """A history with ``slots`` slots holding the newest records of this one."""
        order = [(self.cursor - 1 - j) % self.slots
                 for j in range(min(slots, self.written))]
        new = History(*(t.new_zeros((slots,) + t.shape[1:]) for t in self.tensors().values()))
        for j, i in enumerate(reversed(order)):
            for name, tensor in new.tensors().items():
                tensor[j] = getattr(self, name)[i]
        new.cursor = len(order) % slots
        new.written = min(self.written, slots)
        return new


def _unknown_arguments_message(unknown: dict) -> str:
    valid = [p for p in inspect.signature(CrossIterationBatchNorm2d.__init__).parameters
             if p not in ('self', 'unknown')]
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f'{key!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
    return (f"CBN (CrossIterationBatchNorm2d) got unknown argument(s) {', '.join(hints)}; "
            f"valid keys of norm_cfg=dict(type='CBN', ...) are {', '.join(valid)} and "
            'requires_grad')


class _ConvTap:
    """Forward hook on the conv paired with a CBN layer: hands it the conv's input and output.

    A callable object rather than a closure so that ``copy.deepcopy`` of a model (EMA, model
    soups) re-targets the hook to the copied CBN layer.
    """

    def __init__(self, cbn: 'CrossIterationBatchNorm2d') -> None:
        self.cbn = cbn

    def __call__(self, conv: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.cbn._conv_io = (inputs[0], output)


class CrossIterationBatchNorm2d(_BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) over a 4-d input.

    In training the statistics of the current batch are aggregated with those of the previous
    ``window_size - 1`` iterations, each moved to the current weights of the preceding conv by
    a first-order Taylor step (Eq. 7-10), then used as BatchNorm's (Eq. 11). Gradients flow only
    through the current iteration (with ``backprop_past_stats=True`` also through the
    compensation). With a window of 1 (and during burn-in) it *is* ``BatchNorm2d``; in eval
    mode it normalizes with the running statistics, exactly as BN.

    The layer needs the conv that produces its input: :func:`mmdet_cbn.pair_cbn_layers` (called
    by :class:`mmdet_cbn.CBNBurnInHook` and :func:`mmdet_cbn.convert_cbn`) finds it.

    Running statistics are updated, with ``momentum`` as in BN, from the *window-aggregated*
    mean and variance, the variance unbiased by ``n / (n - 1)`` with ``n`` the number of
    examples per channel over all aggregated iterations. Statistics and history are float32
    (float64 for float64 inputs) whatever the input dtype.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``.
        eps, momentum, affine, track_running_stats: as in ``torch.nn.BatchNorm2d``.
        window_size: iterations aggregated, the current one included (``k``, paper default 4).
        compensation: ``'taylor'`` (CBN) or ``'none'`` (the paper's Naive CBN).
        burnin_iters: training iterations with window 1 before the full window is used; ignored
            while a hook sets the window (:meth:`set_window`).
        backprop_past_stats: also back-propagate through the compensated past statistics, i.e.
            through their dependence on the current conv weight ``W(t)`` (Eq. 7, 8: ``mu_hat =
            W(t) . Xbar + b(t)``, ``d nu_hat / d W(t) = G``). The paper and the authors' code
            treat them as constants (default ``False``); then directions of ``W`` that the
            compensated forward ignores (e.g. a shift of a channel's mean) still get gradient,
            and at a high learning rate the conv output can drift away from the running
            statistics that eval mode uses. ``True`` gives the exact gradient of the forward
            (past inputs fixed) at the cost of one small batched product per layer and a copy
            of the history per step. Without compensation (Naive CBN) there is nothing to
            differentiate and it has no effect.
        grad_nu_stride: ``s > 1`` estimates ``d nu / d W`` from ``1 / s^2`` of the examples
            with a random offset per iteration (unbiased, ``s^2`` times cheaper): every
            ``s^2``-th image or RoI when there are at least ``4 s^2`` of them (RoI heads), else
            every ``s``-th output position in each direction (FPN levels).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window_size: int = 4,
                 compensation: str = 'taylor', burnin_iters: int = 0, grad_nu_stride: int = 1,
                 backprop_past_stats: bool = False, device=None, dtype=None, **unknown) -> None:
        if unknown:
            raise TypeError(_unknown_arguments_message(unknown))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f'CBN window_size must be an integer >= 1 (1 = plain BN), got '
                             f'{window_size!r}')
        if compensation not in COMPENSATIONS:
            raise ValueError(f'CBN compensation must be one of {COMPENSATIONS} '
                             f"('none' = Naive CBN), got {compensation!r}")
        if not isinstance(burnin_iters, int) or burnin_iters < 0:
            raise ValueError(f'CBN burnin_iters must be an integer >= 0, got {burnin_iters!r}')
        if not isinstance(grad_nu_stride, int) or grad_nu_stride < 1:
            raise ValueError(f'CBN grad_nu_stride must be an integer >= 1, got '
                             f'{grad_nu_stride!r}')
        self.window_size = window_size
        self.compensation = compensation
        self.burnin_iters = burnin_iters
        self.grad_nu_stride = grad_nu_stride
        self.backprop_past_stats = bool(backprop_past_stats)
        self.window_override: int | None = None
        self.steps = 0
        self.history: History | None = None
        self.nonfinite_batches = torch.zeros((), dtype=torch.long, device=device)
        self.layer_name = type(self).__name__
        self._conv: nn.Conv2d | None = None
        self._conv_io: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ configuration
    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window_size={self.window_size}, '
                f'compensation={self.compensation!r}, burnin_iters={self.burnin_iters}'
                + (f', grad_nu_stride={self.grad_nu_stride}' if self.grad_nu_stride > 1 else '')
                + (', backprop_past_stats=True' if self.backprop_past_stats else ''))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'{self.layer_name}: expected a 4-d input (N, C, H, W), got '
                             f'{input.dim()}-d')

    @property
    def window(self) -> int:
        """The window in use: the hook's if set, else 1 during ``burnin_iters``, else k."""
        if self.window_override is not None:
            return self.window_override
        return 1 if self.steps < self.burnin_iters else self.window_size

    def set_window(self, window: int | None) -> None:
        """Fix the window in use (a burn-in hook calls this); None returns to ``burnin_iters``."""
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f'{self.layer_name}: window must be an integer >= 1, got {window!r}')
        self.window_override = window

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
        ConvGeometry.of(conv)
        if name is not None:
            self.layer_name = name
        if self._conv is conv:
            return
        if self._conv is not None:
            raise RuntimeError(f'{self.layer_name} is already paired with another conv')
        conv.register_forward_hook(_ConvTap(self))
        object.__setattr__(self, '_conv', conv)  # a reference, not a child module

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.nonfinite_batches = fn(self.nonfinite_batches)
        if self.history is not None:
            self.history.map(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + 'cbn_steps'] = torch.tensor(self.steps)
        if self.history is not None:
            for name, tensor in self.history.tensors().items():
                destination[f'{prefix}cbn_history.{name}'] = tensor.clone()
            destination[prefix + 'cbn_history.cursor'] = torch.tensor(
                [self.history.cursor, self.history.written])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        steps = state_dict.pop(prefix + 'cbn_steps', None)
        names = [f.name for f in fields(History) if f.name != 'written']
        stored = {n: state_dict.pop(f'{prefix}cbn_history.{n}') for n in names
                  if f'{prefix}cbn_history.{n}' in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if steps is not None:
            self.steps = int(steps)
        if len(stored) == len(names):
            cursor, written = (int(v) for v in stored.pop('cursor'))
            device = self.nonfinite_batches.device
            self.history = History(**{n: t.to(device) for n, t in stored.items()},
                                   cursor=cursor, written=written)
        elif stored:
            error_msgs.append(f'{prefix}: incomplete CBN history in the state dict '
                              f'(has {sorted(stored)})')
        else:
            self.history = None

    # ------------------------------------------------------------------ forward
    def _take_conv_io(self, y: Tensor) -> tuple[Tensor, Tensor] | None:
        io, self._conv_io = self._conv_io, None
        if io is not None and io[1] is y:
            return io
        return None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        conv_io = self._take_conv_io(input)
        if not self.training:
            return self._batch_norm(input)
        if input.numel() == 0:
            return self._empty_forward(input)
        self.steps += 1
        window = self.window
        if window == 1:
            self.history = None
            return self._guarded_batch_norm(input)
        if self.compensation == 'taylor' and conv_io is None:
            raise RuntimeError(self._unpaired_message())
        with torch.autocast(input.device.type, enabled=False):  # statistics in float32
            return self._cross_iteration_forward(input, conv_io, window)

    def _batch_norm(self, input: Tensor) -> Tensor:
        """Exactly ``BatchNorm2d.forward`` (the window-1 and eval path)."""
        return super().forward(input)

    def _empty_forward(self, input: Tensor) -> Tensor:
        """An empty batch (e.g. a RoI head with no RoIs): keep the graph, touch no statistic."""
        if not self.affine:
            return input.clone()
        return input * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def _guarded_batch_norm(self, input: Tensor) -> Tensor:
        """``BatchNorm2d``'s training forward, but a non-finite batch leaves the running stats.

        BN updates the running statistics in place inside the kernel; here it updates copies,
        which are committed only where finite (no host sync).
        """
        if not self.track_running_stats:
            return self._batch_norm(input)
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(input, mean, var, self.weight, self.bias, True, factor, self.eps)
        self._commit_running_stats(mean, var, all_finite(mean, var))
        return out

    @torch.no_grad()
    def _commit_running_stats(self, mean: Tensor, var: Tensor, finite: Tensor) -> None:
        self.running_mean.copy_(torch.where(finite, mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, var, self.running_var))
        self.nonfinite_batches.add_(~finite)

    def _unpaired_message(self) -> str:
        return (f"CBN layer '{self.layer_name}' did not receive the input and weight of the "
                'convolution that produces its input, which the Taylor compensation needs. '
                'Fix: call mmdet_cbn.pair_cbn_layers(model) once after building the model (the '
                "CBNBurnInHook does it in mmengine runs: custom_hooks=[dict(type='CBNBurnInHook'"
                ', ...)]), and make sure the layer directly follows an nn.Conv2d; or use '
                "compensation='none' (Naive CBN), which needs no conv.")

    def _cross_iteration_forward(self, y: Tensor, conv_io: tuple[Tensor, Tensor] | None,
                                 window: int) -> Tensor:
        count = y.numel() // self.num_features
        taylor = self.compensation == 'taylor'
        conv = self._conv
        geometry = ConvGeometry.of(conv) if taylor else None
        groups = geometry.groups if taylor else 1
        depth = math.prod(geometry.weight_shape[1:]) if taylor else 0
        history = self._history_for(window, groups, depth, y.device, stat_dtype(y))
        if count == 1 and history.written == 0:
            raise ValueError(f'{self.layer_name}: expected more than 1 value per channel when '
                             f'training with no past statistics yet (input {tuple(y.shape)}); '
                             'use a larger batch or feature map, or GroupNorm')
        weight = conv.weight.detach() if taylor else None
        conv_bias = conv.bias.detach() if taylor and conv.bias is not None else None
        xbar, grad_nu, stats, valid = history.xbar, history.grad_nu, history.stats, history.valid
        live_weight, live_bias = weight, conv_bias  # detached: the paper's constant past stats
        if taylor and self.backprop_past_stats and history.written > 0:
            # Copies, as autograd keeps them and this step's record overwrites a slot; invalid
            # (non-finite) records are zeroed, so that no NaN * 0 reaches the weight gradient.
            keep = valid.view(-1, 1, 1)
            xbar, grad_nu, stats = (torch.where(keep, t, 0) for t in (xbar, grad_nu, stats))
            valid = valid.clone()
            live_weight, live_bias = conv.weight, conv.bias
        if taylor:
            mu_hat, nu_hat = compensate(live_weight, live_bias, xbar, grad_nu,
                                        stats[:, 1], stats[:, 0], stats[:, 2], stats[:, 3])
        else:
            mu_hat, nu_hat = stats[:, 0], stats[:, 1]
        past_mu, past_nu, k = past_sums(mu_hat, nu_hat, valid)
        out, mu, nu, mu_bar, var_bar = window_normalize(
            y, self.weight, self.bias, past_mu, past_nu, k, self.eps)
        finite = all_finite(mu, nu)
        total = count + (history.count * history.valid).sum()
        self._update_running_stats(mu_bar, var_bar, total, finite)
        self._record(history, conv_io, y, mu, nu, weight, conv_bias, geometry, count, finite)
        return out

    def _history_for(self, window: int, groups: int, depth: int, device: torch.device,
                     dtype: torch.dtype) -> History:
        slots = window - 1
        history = self.history
        if history is None or history.xbar.shape[1:] != (groups, depth):
            history = History.empty(slots, self.num_features, groups, depth, device, dtype)
        elif history.slots != slots:
            history = history.resized(slots)
        self.history = history
        return history

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: Tensor,
                              finite: Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum  # a Python number: no host-to-device copy
        unbiased = var * total / (total - 1).clamp_min(1)
        new_mean = torch.lerp(self.running_mean.to(mean.dtype), mean, factor)
        new_var = torch.lerp(self.running_var.to(mean.dtype), unbiased, factor)
        self._commit_running_stats(new_mean, new_var, finite)

    @torch.no_grad()
    def _record(self, history: History, conv_io: tuple[Tensor, Tensor] | None, y: Tensor,
                mu: Tensor, nu: Tensor, weight: Tensor | None, conv_bias: Tensor | None,
                geometry: ConvGeometry | None, count: int, finite: Tensor) -> None:
        """Store this iteration's statistics (and their weight gradients) for the next ones."""
        xbar = grad_nu = grad_dot_weight = None
        if geometry is not None:
            x = conv_io[0]
            xbar = mean_input_patch(x, geometry, y.shape[2:])
            stride = self.grad_nu_stride
            if stride > 1 and y.shape[0] >= 4 * stride ** 2:
                # many examples (RoIs): every s^2-th one, random offset; a stride-1 conv
                step = stride ** 2
                first = int(torch.randint(step, ()))
                grad_nu = grad_nu_wrt_weight(x[first::step], y[first::step], geometry)
            else:
                offset = (0, 0)
                if stride > 1:
                    offset = tuple(int(v) for v in torch.randint(stride, (2,)))
                grad_nu = grad_nu_wrt_weight(x, y, geometry, stride, offset)
            flat_weight = weight.reshape(weight.shape[0], -1, 1).to(grad_nu.dtype)
            grad_dot_weight = torch.bmm(grad_nu.unsqueeze(1), flat_weight).view(-1)
            finite = finite & all_finite(xbar, grad_dot_weight)
        history.push(mu, nu, xbar, grad_nu, grad_dot_weight, conv_bias, count, finite)
