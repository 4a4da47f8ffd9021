"""Run by test_distributed.py under ``torchrun --nproc_per_node 2``: train the small CBN net of
test_reliability.py for ``MAX_EPOCHS`` epochs (``--resume``: from its last checkpoint) and
write each rank's losses to ``WORK_DIR/losses_rank{r}.json``."""
import argparse
import json
import os.path as osp

import torch
import torch.distributed as dist
from mmengine.dist import get_rank
from mmengine.runner import Runner
from test_reliability import LossRecorder, RandomData, SmallNet

from mmdet_cbn.compat import end_distributed_process, runner_checkpoint_globals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('work_dir')
    parser.add_argument('max_epochs', type=int)
    parser.add_argument('--resume', action='store_true')
    args = parser.parse_args()
    dist.init_process_group('gloo')
    torch.manual_seed(0)
    recorder = LossRecorder()
    wrapper = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
    runner = Runner(
        model=SmallNet(), work_dir=args.work_dir, launcher='pytorch',
        cfg=dict(model_wrapper_cfg=wrapper),
        train_dataloader=dict(dataset=RandomData(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=True, seed=0),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=args.max_epochs),
        custom_hooks=[dict(type='CBNBurnInHook', burnin_epochs=1), recorder],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        randomness=dict(seed=0), resume=args.resume, log_level='WARNING')
    with runner_checkpoint_globals():
        runner.train()
    with open(osp.join(args.work_dir, f'losses_rank{get_rank()}.json'), 'w') as f:
        json.dump(recorder.losses, f)
    end_distributed_process()


if __name__ == '__main__':
    main()
