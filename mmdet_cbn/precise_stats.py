"""Population statistics of a model's BatchNorm-like layers at its current weights.

"Precise BN" (Wu and Johnson, *Rethinking "Batch" in BatchNorm*, 2021; detectron2's
``PreciseBN``): forward training batches in train mode, every normalization layer normalizing
with its batch's own statistics (the plain BN rule, window 1 for CBN), and accumulate each
layer's exact per-channel mean and variance over all examples of all batches. The running
statistics, an average over past iterations, lag weights that move; these do not.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import gather_moments, stat_dtype
from .sync_cbn import SyncCrossIterationBatchNorm2d

__all__ = ['PopulationStatistics', 'population_statistics', 'load_population_statistics',
           'norm_layers_with_running_stats']


@dataclass
class PopulationStatistics:
    """One layer's statistics over every example it saw: ``mean`` and ``var`` ``(C,)`` in
    float64 (``var`` unbiased, ``n / (n - 1)``, as BN's running variance), ``count`` the
    examples per channel."""

    mean: Tensor
    var: Tensor
    count: int


class _Accumulator:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch with the
    parallel-variance rule (float64: no large moments cancel)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, batch_mean: Tensor, batch_var: Tensor, batch_count: int) -> None:
        """Merge a batch's mean and biased variance ``(C,)`` over ``batch_count`` examples."""
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * (batch_count / total)
        self.squares += batch_var * batch_count + delta.square() * (self.count * batch_count
                                                                    / total)
        self.count = total

    def pool(self, group) -> None:
        """Merge the accumulators of every rank of ``group`` (:func:`gather_moments`), so that
        all ranks hold the statistics of all their examples."""
        pooled = gather_moments(self.count, self.mean, self.squares / max(self.count, 1), group)
        self.count = int(pooled.count)
        if self.count:
            self.mean, self.squares = pooled.mean, pooled.var * self.count

    def result(self) -> PopulationStatistics:
        var = self.squares / max(self.count - 1, 1)
        return PopulationStatistics(self.mean.clone(), var, self.count)


def norm_layers_with_running_stats(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm-like layers of ``model`` (BN, SyncBN, CBN) that keep running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _batch_norm_accumulating(layer: _BatchNorm, accumulator: _Accumulator
                             ) -> Callable[[Tensor], Tensor]:
    """A forward for ``layer``: normalize with the batch's own statistics (plain BN) and add
    them to ``accumulator``; no buffer or state of the layer changes."""

    def forward(input: Tensor) -> Tensor:
        count = input.numel() // input.shape[1]
        if count == 0:  # e.g. a RoI head without RoIs
            return F.batch_norm(input, layer.running_mean, layer.running_var, layer.weight,
                                layer.bias, False, 0.0, layer.eps)
        dims = [0] + list(range(2, input.dim()))
        var, mean = torch.var_mean(input.to(torch.float64), dim=dims, correction=0)
        accumulator.add(mean, var, count)
        dtype = stat_dtype(input)  # float32 statistics for 16-bit inputs, as BN's buffers
        return F.batch_norm(input, mean.to(dtype), var.to(dtype), layer.weight, layer.bias,
                            False, 0.0, layer.eps)

    return forward


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global random states as they were before (a training run
    continues bit-identically although the forwards drew random numbers, e.g. RoI sampling)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@torch.no_grad()
def population_statistics(model: nn.Module, batches: Iterable, forward: Callable[[object], object]
                          ) -> dict[str, PopulationStatistics]:
    """Exact per-channel statistics of every BN-like layer's input over ``batches``.

    Every batch is passed to ``forward`` (which runs ``model`` on it, e.g. an mmdet training
    forward) with the model in train mode and every layer of
    :func:`norm_layers_with_running_stats` normalizing with its batch's own mean and variance.
    A layer called several times per batch (a head shared by pyramid levels) pools its calls;
    a synchronized SyncCBN layer pools the examples of every rank (each rank must forward
    as many batches).
    A layer that ``model.train()`` leaves in eval mode (frozen BN, ``norm_eval``) keeps its
    running statistics and is not measured. Nothing of the model changes: its buffers, CBN
    histories and counters, its train/eval modes, nor the global random states.

    Args:
        model: the module whose layers are measured.
        batches: the inputs, each handed to ``forward`` as is.
        forward: runs ``model`` on one batch; its result is discarded.

    Returns:
        ``{layer name: PopulationStatistics}`` for the layers that saw at least one example.
    """
    modes = {module: module.training for module in model.modules()}
    model.train()
    layers = [(name, layer) for name, layer in norm_layers_with_running_stats(model)
              if layer.training]
    accumulators = {name: _Accumulator(layer.num_features, layer.running_mean.device)
                    for name, layer in layers}
    for name, layer in layers:
        layer.forward = _batch_norm_accumulating(layer, accumulators[name])
    groups = {name: layer._synchronized_group() for name, layer in layers
              if isinstance(layer, SyncCrossIterationBatchNorm2d)}
    try:
        with _random_state_kept():
            for batch in batches:
                forward(batch)
        for name, group in groups.items():
            if group is not None:
                accumulators[name].pool(group)
    finally:
        for _, layer in layers:
            del layer.forward
        for module, training in modes.items():
            module.training = training
    return {name: acc.result() for name, acc in accumulators.items() if acc.count}


@torch.no_grad()
def load_population_statistics(model: nn.Module, stats: dict[str, PopulationStatistics]
                               ) -> None:
    """Write ``stats`` into the running mean and variance of the named layers of ``model``."""
    modules = dict(model.named_modules())
    for name, layer_stats in stats.items():
        layer = modules[name]
        layer.running_mean.copy_(layer_stats.mean)
        layer.running_var.copy_(layer_stats.var)
