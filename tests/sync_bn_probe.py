"""One rank of a 2-process gloo mmengine run with ``sync_bn='torch'`` and CBN (test_dropin.py).

torch's DDP refuses SyncBatchNorm layers in CPU modules when it wraps the model; the wrapper
here skips that refusal, as DDP does on GPUs, so that the Runner gets as far as a GPU run:
training with the SyncBN layers mmengine converted the CBN layers to.
"""
import sys

import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner

from test_hook import ToyData, ToyNet


@MODEL_WRAPPERS.register_module()
class GPULikeDDP(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` without the CPU refusal of SyncBatchNorm layers."""

    def _passing_sync_batchnorm_handle(self, module) -> None:
        pass


if __name__ == '__main__':
    dist.init_process_group('gloo')
    runner = Runner(
        model=ToyNet(), work_dir=sys.argv[1], launcher='pytorch',
        train_dataloader=dict(dataset=ToyData(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=2),
        custom_hooks=[dict(type='CBNBurnInHook', burnin_iters=0)],
        default_hooks=dict(checkpoint=None),
        cfg=dict(sync_bn='torch', model_wrapper_cfg=dict(type='GPULikeDDP', device_ids=None)))
    runner.train()
