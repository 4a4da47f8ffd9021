"""A test-only hook: each rank saves its CBN state after training (for test_distributed.py)."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from mmdet_cbn import cbn_layers


@HOOKS.register_module()
class CBNStateProbe(Hook):
    """Save ``{layer: history fields + running statistics}`` of this rank to the work dir."""

    def after_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {name: dict(layer.histories[0].state(), running_mean=layer.running_mean.clone(),
                            steps=layer.steps)
                 for name, layer in cbn_layers(model)}
        torch.save(state, osp.join(runner.work_dir, f'cbn_rank{get_rank()}.pt'))
