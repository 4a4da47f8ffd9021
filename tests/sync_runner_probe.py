"""A test-only hook for test_sync_cbn_runner.py: each rank saves its CBN state and metrics.

Files in the work dir, per rank ``r``:

- ``start_rank{r}.pt``: the state at ``before_train`` (after a resume loaded its checkpoint);
- ``trained_rank{r}.pt``: the state at the end of the last training epoch, before
  ``CBNBurnInHook`` re-estimates the running statistics (this hook runs before it);
- ``end_rank{r}.pt``: the state at ``after_train`` (re-estimated running statistics);
- ``metrics_rank{r}.json``: the metrics of the last validation.

A state is ``{layer: {'type', 'steps', 'history' (call site 0's fields, or None),
'running_mean', 'running_var', 'num_batches_tracked'}}`` for every CBN layer.
"""
import json
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from mmdet_cbn import cbn_layers


def cbn_state(model) -> dict:
    """Every CBN layer's class, steps, first call site's history and running statistics."""
    state = {}
    for name, layer in cbn_layers(model):
        history = layer.histories[0] if layer.histories else None
        state[name] = dict(type=type(layer).__name__, steps=layer.steps,
                           history=None if history is None else history.state(),
                           running_mean=layer.running_mean.clone(),
                           running_var=layer.running_var.clone(),
                           num_batches_tracked=layer.num_batches_tracked.clone())
    return state


@HOOKS.register_module()
class SyncCBNStateProbe(Hook):
    """Save this rank's CBN state at the start and end of training, and its val metrics."""

    priority = 'ABOVE_NORMAL'  # after_train_epoch: before CBNBurnInHook's re-estimation

    def _save(self, runner, when: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save(cbn_state(model), osp.join(runner.work_dir, f'{when}_rank{get_rank()}.pt'))

    def before_train(self, runner) -> None:
        self._save(runner, 'start')

    def after_train_epoch(self, runner) -> None:
        if self.is_last_train_epoch(runner):
            self._save(runner, 'trained')

    def after_train(self, runner) -> None:
        self._save(runner, 'end')

    def after_val_epoch(self, runner, metrics=None) -> None:
        with open(osp.join(runner.work_dir, f'metrics_rank{get_rank()}.json'), 'w') as f:
            json.dump({k: float(v) for k, v in (metrics or {}).items()}, f)
