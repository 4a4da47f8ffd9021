"""``CrossIterationBatchNorm2d``: the CBN layer (state, call sites, forward)."""
from __future__ import annotations

import difflib
import inspect
import itertools
import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import ConvGeometry, StepOptions, stat_dtype, training_step
from .fused import fused_step
from .history import FIELDS, History
from .iterations import BackwardTap, CallSites, ConvTap, watch_backward

__all__ = ['CrossIterationBatchNorm2d']

COMPENSATIONS = ('taylor', 'none')
_RENAMED = {'backprop_past_stats': "the exact gradient is now the default; the authors' "
                                   'detached variant is detach_compensation=True',
            'process_group': "statistics pooled across GPUs are type='SyncCBN'"}
_layer_numbers = itertools.count()  # gives each layer's sampler its own seed


def _unknown_arguments_message(layer: type, unknown: dict) -> str:
    valid = list(dict.fromkeys(
        p for cls in reversed(layer.__mro__) if '__init__' in vars(cls)
        and issubclass(cls, CrossIterationBatchNorm2d)
        for p, spec in inspect.signature(cls.__init__).parameters.items()
        if p not in ('self', 'unknown') and spec.kind not in (spec.VAR_POSITIONAL,
                                                              spec.VAR_KEYWORD)))
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = _RENAMED.get(key) or (f'did you mean {close[0]!r}?' if close else None)
        hints.append(f'{key!r}' + (f' ({hint})' if hint else ''))
    short = 'SyncCBN' if layer.__name__.startswith('Sync') else 'CBN'
    return (f"{short} ({layer.__name__}) got unknown argument(s) {', '.join(hints)}; "
            f"valid keys of norm_cfg=dict(type='{short}', ...) are {', '.join(valid)} and "
            'requires_grad')


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
    training iteration); without that, after a backward pass has reached the parameters of
    the layer or its conv (gradient hooks), or after a call whose output needs no gradient.
    Every micro-batch of gradient accumulation is an iteration: with unchanged weights the
    compensation is exact, and the window pools the micro-batches. A gradient-checkpointing
    recomputation (detected as a forward inside a backward pass) reproduces its first forward
    and changes no state. ``steps``, ``burnin_iters`` and the window count iterations.

    **Compiled.** Everything that changes from one step to the next (iteration count, ring
    cursors, slot weights) is a tensor, so ``torch.compile(model, fullgraph=True)`` traces the
    layer whole and does not recompile from one iteration to the next (a new window size or
    call site recompiles once). With ``fused`` (by default on CUDA) the layer runs its own
    step compiled by inductor: a few fused kernels instead of some seventy operations, shared
    by every layer of the same kind (:mod:`mmdet_cbn.fused`); the eager step where compiling
    is impossible. Inside a compiled model the conv check of the first windowed step is
    skipped (it reads a value): run one step eager first to have it.

    **Running statistics** are updated at every call, as BN does, with ``momentum``, from the
    window's mean and variance, the variance unbiased by ``n / (n - 1)`` with ``n`` the examples
    per channel over the window. A call with non-finite statistics changes neither them nor the
    history (it counts in ``nonfinite_batches``). :meth:`reset_running_stats` empties the
    window's history too. History and statistics of the window are
    float32 (float64 for float64 inputs) whatever the input or module dtype.
    ``clamped_variances`` counts ``[clamped, all]`` compensated past variances since its last
    reset (``CBNBurnInHook`` logs and resets it): those that came out below 0 and were clamped
    are a sign that the weights moved too far for the Taylor step.

    Args:
        num_features: channels ``C`` of the input ``(N, C, H, W)``.
        eps, momentum, affine, track_running_stats, bias: as in ``torch.nn.BatchNorm2d``
            (``bias=False``: an affine scale without shift).
        window_size: iterations aggregated, the current one included (``k``, paper default 4).
        compensation: ``'taylor'`` (CBN) or ``'none'`` (the paper's Naive CBN).
        burnin_iters: the first iterations use window 1 (their records stay out of the
            window); ignored while a hook sets the window (:meth:`set_window`).
        grad_nu_stride: ``s > 1`` estimates ``d var / d W`` from ``1 / s^2`` of the examples,
            drawn by the layer's own generator (unbiased, ``s^2`` times cheaper): every
            ``s^2``-th image or RoI when there are at least ``4 s^2`` of them (RoI heads), else
            every ``s``-th output position in each direction (FPN levels).
        detach_compensation: hold the compensated past statistics constant in the backward
            (the authors' code) instead of the exact gradient. No effect without compensation.
        fused: the training step compiled into fused kernels (True), eager (False), or
            automatic (None: fused on CUDA, eager elsewhere). The same results either way.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window_size: int = 4,
                 compensation: str = 'taylor', burnin_iters: int = 0, grad_nu_stride: int = 1,
                 detach_compensation: bool = False, fused: bool | None = None, device=None,
                 dtype=None, *, bias: bool = True, **unknown) -> None:
        if unknown:
            raise TypeError(_unknown_arguments_message(type(self), unknown))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        for name, value, low in (('window_size', window_size, 1),
                                 ('burnin_iters', burnin_iters, 0)):
            _check_integer(name, value, low)
        if compensation not in COMPENSATIONS:
            raise ValueError(f'CBN compensation must be one of {COMPENSATIONS} '
                             f"('none' = Naive CBN), got {compensation!r}")
        if fused not in (None, True, False):
            raise ValueError(f'CBN fused must be None (automatic), True or False, got {fused!r}')
        self.window_size = window_size
        self.compensation = compensation
        self.burnin_iters = burnin_iters
        self.detach_compensation = bool(detach_compensation)
        self.fused = fused
        self.window_override: int | None = None
        self.iterations = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite_batches = torch.zeros((), dtype=torch.long, device=device)
        # [clamped, all] compensated past variances since the last reset (a diagnostic)
        self.clamped_variances = torch.zeros(2, dtype=torch.long, device=device)
        self.layer_name = type(self).__name__
        self.histories: list[History | None] = []
        self._call_sites = CallSites()
        self._sampler: torch.Generator | None = None
        self._next_draw = (0, 0)
        self.grad_nu_stride = grad_nu_stride
        self._conv: nn.Conv2d | None = None
        self._geometry: ConvGeometry | None = None
        self._conv_verified = False
        self._backward_watched = False

    # ------------------------------------------------------------------ configuration
    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window_size={self.window_size}, '
                f'compensation={self.compensation!r}, burnin_iters={self.burnin_iters}'
                + (f', grad_nu_stride={self.grad_nu_stride}' if self.grad_nu_stride > 1 else '')
                + (', detach_compensation=True' if self.detach_compensation else '')
                + (f', fused={self.fused}' if self.fused is not None else ''))

    def _check_input_dim(self, input: Tensor) -> None:
        if isinstance(input, torch.fx.Proxy):  # FX symbolic tracing: no shape to check
            if self.training:
                raise RuntimeError(
                    f'{self.layer_name}: a CBN layer in training mode cannot be FX-traced (its '
                    'window of past iterations lives in Python). Fix: trace the model in eval '
                    'mode, where CBN normalizes with the running statistics, as BN does.')
            return
        if input.dim() != 4:
            raise ValueError(f'{self.layer_name}: expected a 4-d input (N, C, H, W), got '
                             f'{input.dim()}-d')

    @property
    def grad_nu_stride(self) -> int:
        """``s``: ``d var / d W`` from ``1 / s^2`` of the examples (settable on a built layer)."""
        return self._grad_nu_stride

    @grad_nu_stride.setter
    def grad_nu_stride(self, stride: int) -> None:
        _check_integer('grad_nu_stride', stride, 1)
        self._grad_nu_stride = stride
        if stride == 1:
            self._sampler = None
        elif self._sampler is None:  # the layer's own generator draws the offsets
            self._sampler = torch.Generator().manual_seed(
                torch.initial_seed() + next(_layer_numbers))

    @property
    def steps(self) -> int:
        """Training iterations so far (reads a tensor: a host sync on a GPU)."""
        return int(self.iterations)

    def window_at(self, iteration: int) -> int:
        """The window of the (1-based) training iteration: the hook's if set, else 1 during
        ``burnin_iters``, else ``window_size``."""
        if self.window_override is not None:
            return self.window_override
        return 1 if iteration <= self.burnin_iters else self.window_size

    @property
    def window(self) -> int:
        """The window the next training call uses."""
        if self.window_override is not None:
            return self.window_override
        return self.window_at(self.steps + self._call_sites.ended)

    def set_window(self, window: int | None) -> None:
        """Fix the window in use (a burn-in hook calls this); None returns to ``burnin_iters``."""
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f'{self.layer_name}: window must be an integer >= 1, got {window!r}')
        self.window_override = window

    def new_iteration(self) -> None:
        """Start a new iteration at the next training call; from now on only this does.

        ``CBNBurnInHook`` calls it before every training iteration of an mmengine run."""
        self._call_sites.new_iteration()
        if self._sampler is not None:
            self._next_draw = self._draw()

    @property
    def num_call_sites(self) -> int:
        """How many times the layer ran in its last training iteration."""
        return self._call_sites.next_site

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
        conv.register_forward_hook(ConvTap(self))
        object.__setattr__(self, '_conv', conv)  # a reference, not a child module
        self._geometry = geometry
        self._watch_backward()

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        calls = self._call_sites
        conv_io, calls.conv_io = calls.conv_io, None  # holds no activation past its use
        if not self.training:
            return super().forward(input)
        if conv_io is not None and conv_io[1] is not input:
            conv_io = None
        site, recomputing, starts = calls.enter(input, self.layer_name)
        window = self.window_override if self.window_override is not None else (
            self.window_size)  # the layer's own burn-in: its records stay out of the window
        group = self._synchronized_group()
        if input.numel() > 0:
            self._check_call(input, conv_io, site, window, starts, recomputing, group)
        if starts:
            self._start_iteration()
        if input.numel() == 0 and group is None:  # e.g. no RoIs: touch no statistic
            out = self._empty_forward(input)
        else:
            history = None if window == 1 else self._history(site, window, input)
            out = self._training_step(input, conv_io, history, recomputing, group)
        if not recomputing:
            calls.leave(site, input, out, self.layer_name)
            if out.requires_grad and not self._backward_watched and (
                    not torch.compiler.is_compiling()):
                out.register_hook(BackwardTap(self))  # nothing of its own gets a gradient
        return out

    def _check_call(self, y: Tensor, conv_io: tuple[Tensor, Tensor] | None, site: int,
                    window: int, starts: bool, recomputing: bool, group: object | None) -> None:
        """Refuse a call that cannot be normalized, before anything changes."""
        if window > 1 and self.compensation == 'taylor' and not recomputing:
            self._verify_conv(conv_io)
        if y.numel() == y.shape[1] and group is None and not torch.compiler.is_compiling():
            history = self.histories[site] if window > 1 and site < len(self.histories) else None
            in_burnin = self.window_override is None and self.burnin_iters >= self.steps + starts
            if in_burnin or history is None or history.filled + (
                    starts and history.written) == 0:
                raise ValueError(f'{self.layer_name}: expected more than 1 value per channel '
                                 f'when training with no past statistics yet (input '
                                 f'{tuple(y.shape)}); use a larger batch or feature map, or '
                                 'GroupNorm')

    def _start_iteration(self) -> None:
        """The records of the last iteration join the windows; the iteration count moves on."""
        for history in self.histories:
            if history is not None:
                history.commit()
        self.iterations.add_(1)
        if not torch.compiler.is_compiling():
            self._watch_backward()

    def _watch_backward(self) -> None:
        params = [self.weight, self.bias]
        if self._conv is not None:
            params += [self._conv.weight, self._conv.bias]
        watch_backward(self, params)
        self._backward_watched = any(p is not None and p.requires_grad for p in params)

    def _empty_forward(self, input: Tensor) -> Tensor:
        if not self.affine:
            return input.clone()
        out = input * self.weight.view(1, -1, 1, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def _history(self, site: int, window: int, input: Tensor) -> History:
        taylor = self.compensation == 'taylor'
        shape = (self.num_features, self._geometry.groups if taylor else 1,
                 self._geometry.depth(self._conv.in_channels) if taylor else 0)
        if len(self.histories) <= site:  # extend, not +=: Module.__setattr__ costs per call
            self.histories.extend([None] * (site + 1 - len(self.histories)))
        history = self.histories[site]
        if history is None or history.shape != shape:
            history = History(window - 1, *shape, input.device, stat_dtype(input))
        elif history.slots != window - 1:
            history = history.resized(window - 1)
        self.histories[site] = history
        return history

    def _synchronized_group(self) -> object | None:
        """The process group whose ranks pool their statistics (SyncCBN), or None."""
        return None

    def _training_step(self, y: Tensor, conv_io: tuple[Tensor, Tensor] | None,
                       history: History | None, recomputing: bool,
                       group: object | None) -> Tensor:
        """Read the state, run :func:`~mmdet_cbn.functional.training_step` (fused where it
        pays), which writes the record and the running statistics in place."""
        if history is None:
            self.histories.clear()
        taylor = self.compensation == 'taylor' and history is not None
        conv = self._conv
        options = StepOptions(
            self.eps, self.momentum, self.track_running_stats,
            self._geometry if taylor else None, self.detach_compensation,
            self.grad_nu_stride, self.burnin_iters if self.window_override is None else 0)
        step = fused_step if group is None and self._use_fused(y) else training_step
        with torch.autocast(y.device.type, enabled=False) if _autocast_on(y) else _nothing():
            return step(y, None if conv_io is None else conv_io[0], self.weight, self.bias,
                        conv.weight if taylor else None, conv.bias if taylor else None,
                        ring=None if history is None else history.ring(),
                        running_mean=self.running_mean, running_var=self.running_var,
                        num_batches_tracked=self.num_batches_tracked,
                        nonfinite_batches=self.nonfinite_batches,
                        clamped_variances=self.clamped_variances, iteration=self.iterations,
                        options=options, record=not recomputing,
                        draw=self._draw() if taylor and not recomputing else (0, 0), group=group,
                        in_flight=None if group is None or history is None else history.in_flight)

    def _use_fused(self, y: Tensor) -> bool:
        """The compiled step: where asked for, by default on CUDA; never inside a model that
        is being compiled (its graph takes the step in whole)."""
        if torch.compiler.is_compiling():
            return False
        return self.fused if self.fused is not None else y.device.type == 'cuda'

    def _draw(self) -> tuple[int, int]:
        """Offsets for the sampled ``d var / d W`` from the layer's own generator: a new draw
        per call, except inside a model being compiled (a traced draw would be a constant),
        where it is the one drawn when the last iteration ended."""
        if self._sampler is None:
            return (0, 0)
        if torch.compiler.is_compiling():
            return self._next_draw
        high = self.grad_nu_stride ** 2
        return tuple(int(v) for v in torch.randint(high, (2,), generator=self._sampler))

    def _iteration_ended(self) -> None:
        """A backward pass ran through the layer (eager: from a gradient hook)."""
        self._call_sites.backward_ran()
        if self._sampler is not None:
            self._next_draw = self._draw()

    # ------------------------------------------------------------------ checks
    def _unpaired_message(self) -> str:
        return (f"CBN layer '{self.layer_name}' did not receive the input and weight of the "
                'convolution that produces its input, which the Taylor compensation needs. '
                'Fix: call mmdet_cbn.pair_cbn_layers(model) once after building the model (the '
                "CBNBurnInHook does it in mmengine runs: custom_hooks=[dict(type='CBNBurnInHook'"
                ', ...)]), and make sure the layer directly follows an nn.Conv2d; or use '
                "compensation='none' (Naive CBN), which needs no conv.")

    def _verify_conv(self, conv_io: tuple[Tensor, Tensor] | None) -> None:
        """Once: the paired conv's output is ``conv2d(input, weight, bias)`` (one image). Not
        inside a model being compiled (the check reads a value): run one step eager first."""
        if conv_io is None:
            raise RuntimeError(self._unpaired_message())
        if self._conv_verified or conv_io[1].device.type == 'meta' or (
                torch.compiler.is_compiling()):
            return
        x, y = conv_io
        conv, geometry = self._conv, self._geometry
        dtype = stat_dtype(y)  # the input's precision, float32 for 16 bits
        geometry_args = (geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        with torch.no_grad():
            image, weight = x[:1].to(dtype), conv.weight.to(dtype)
            bias = None if conv.bias is None else conv.bias.to(dtype)
            expected = F.conv2d(image, weight, bias, *geometry_args)
            got = y[:1].to(dtype)
            same = expected.shape == got.shape
            if same:
                # An output is a sum of D products and the bias; summed in any order with unit
                # roundoff u it is within lambda sqrt(D) u S of the exact value, S = sum |x W|
                # + |b|, but for a probability below 2 exp(-lambda^2 / 2) (Higham and Mary,
                # SIAM J. Sci. Comput. 41(5), 2019). lambda = 32 leaves room for fast
                # algorithms (Winograd, FFT), whose errors spread over the positions: hence
                # the largest S of the image. CUDA float32 convs may run in TF32, which rounds
                # x and W to 10 bits (2^-10 S more); a 16-bit y is rounded to its dtype (by at
                # most eps |y| / 2; eps |y| allowed). The tolerance is twice that bound, as
                # `expected` and `got` both err; a conv that transforms its weight or input is
                # off by about |y| or more.
                magnitude = F.conv2d(image.abs(), weight.abs(),
                                     None if bias is None else bias.abs(), *geometry_args)
                depth = geometry.depth(conv.in_channels)
                relative = 32 * math.sqrt(depth) * torch.finfo(dtype).eps / 2
                if y.is_cuda and y.dtype == torch.float32:
                    relative += 2 ** -10
                tolerance = 2 * (relative * magnitude.amax()
                                 + torch.finfo(y.dtype).eps * got.abs().amax())
                same = bool((expected - got).abs().amax() <= tolerance)
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
    def reset_running_stats(self) -> None:
        """BN's reset of the running statistics, and the window forgets the past iterations
        (it refills over the next ``window_size - 1``): no statistic seen before the reset
        enters a later one, as in BN (``torch.optim.swa_utils.update_bn`` resets, then
        re-estimates). ``steps`` (the burn-in schedule) and ``nonfinite_batches`` stay."""
        super().reset_running_stats()
        self.histories = []

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.iterations = fn(self.iterations)
        self.nonfinite_batches = fn(self.nonfinite_batches)
        self.clamped_variances = fn(self.clamped_variances)
        for history in self.histories:
            if history is not None:
                history.map(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + 'cbn_steps'] = self.iterations.clone()
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
            self.iterations.copy_(steps)
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
        self._call_sites.reset()


def _check_integer(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f'CBN {name} must be an integer >= {low}, got {value!r}')


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
