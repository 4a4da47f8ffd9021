"""One rank of the SyncCBN exactness runs of test_sync_cbn.py, and what they share with the
one-process reference: the configurations, the model, the data and the training loop.

``python sync_cbn_probe.py STORE OUT WORLD_SIZE RANK CONFIG...``: joins a gloo group through
the file store ``STORE``, trains each configuration under DDP and writes its per-step records
to ``OUT/{config}_rank{RANK}.pt`` as soon as it is done (a later failure keeps them).
"""
from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers

IMAGES_PER_RANK = 2


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: the CBN options, the model variant and the data schedule."""

    data_seed: int
    steps: int
    window_size: int = 3
    burnin_iters: int = 0
    compensation: str = 'taylor'
    detach_compensation: bool = False
    conv1_bias: bool = False
    conv2_groups: int = 1
    dtype: torch.dtype = torch.float64
    grad_nu_stride: int = 1
    call_sites: int = 1  # 2: the second block also runs on a pooled copy (a shared head)
    synced: bool = True  # False: plain CBN on every rank (the negative control)
    # {step: rank} steps where one rank has no image (-1: the last rank)
    empty_rank_at: tuple[tuple[int, int], ...] = ()

    def cbn_options(self) -> dict:
        return dict(window_size=self.window_size, burnin_iters=self.burnin_iters,
                    compensation=self.compensation, grad_nu_stride=self.grad_nu_stride,
                    detach_compensation=self.detach_compensation)


CONFIGS = {
    # burn-in of 2, then a window of 3 that fills over two steps; the exact gradient
    'burnin_exact': RunConfig(data_seed=1, steps=6, window_size=3, burnin_iters=2,
                              conv2_groups=2),
    # the authors' detached gradient, window 4 filling from the second step, conv biases
    'detached_window4': RunConfig(data_seed=2, steps=6, window_size=4, detach_compensation=True,
                                  conv1_bias=True),
    # Naive CBN (no compensation)
    'naive': RunConfig(data_seed=3, steps=5, compensation='none', conv1_bias=True,
                       conv2_groups=2),
    'float32': RunConfig(data_seed=4, steps=5, burnin_iters=1, conv2_groups=2,
                         dtype=torch.float32),
    # the negative control: 'burnin_exact' with plain, unsynchronized CBN on every rank
    'unsynced': RunConfig(data_seed=1, steps=6, window_size=3, burnin_iters=2, conv2_groups=2,
                          synced=False),
    # the second block shared by two inputs (two call sites, each its own history)
    'call_sites': RunConfig(data_seed=6, steps=5, window_size=3, call_sites=2, conv2_groups=2),
    # a sampled d var / d W: each rank draws its own positions (compared across ranks only)
    'sampled': RunConfig(data_seed=7, steps=4, window_size=3, grad_nu_stride=2),
    # rank 0 without images at step 1, the last rank at step 3 (window full)
    'empty_rank': RunConfig(data_seed=5, steps=5, window_size=3, conv1_bias=True,
                            empty_rank_at=((1, 0), (3, -1))),
}


class Net(nn.Module):
    """conv 3x3 -> CBN -> relu -> conv 1x1 -> CBN -> global mean -> linear. Returns the
    logits and the first CBN layer's output."""

    def __init__(self, norm: type[CrossIterationBatchNorm2d], config: RunConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=config.conv1_bias)
        self.norm1 = norm(6, **config.cbn_options())
        self.conv2 = nn.Conv2d(6, 8, 1, groups=config.conv2_groups)
        self.norm2 = norm(8, **config.cbn_options())
        self.fc = nn.Linear(8, 3)
        self.call_sites = config.call_sites

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.norm1(self.conv1(x))
        inputs = [features.relu(), nn.functional.avg_pool2d(features.relu(), 2)]
        pooled = sum(self.norm2(self.conv2(t)).mean((2, 3))
                     for t in inputs[:self.call_sites]) / self.call_sites
        return self.fc(pooled), features


def build_model(config: RunConfig, norm: type[CrossIterationBatchNorm2d]) -> Net:
    """The model with the same initial weights for every rank and the reference, paired."""
    model = Net(norm, config).double()
    generator = torch.Generator().manual_seed(100 + config.data_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=generator, dtype=torch.float64)
            if name.startswith('norm'):  # affine scale in [0.5, 1.5], shift in [-0.5, 0.5]
                param.copy_(noise + (0.5 if name.endswith('weight') else -0.5))
            elif name.endswith('weight'):
                param.copy_((2 * noise - 1) / param[0].numel() ** 0.5)
            else:
                param.copy_(0.2 * noise - 0.1)
    model = model.to(config.dtype)
    pair_cbn_layers(model)
    return model


def image_counts(config: RunConfig, step: int, world_size: int) -> list[int]:
    counts = [IMAGES_PER_RANK] * world_size
    for empty_step, rank in config.empty_rank_at:
        if empty_step == step:
            counts[rank] = 0
    return counts


def step_batch(config: RunConfig, step: int, world_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All ranks' images and targets of ``step`` (rank-major), and the images per rank. Each
    image has its own offset, so the ranks' means differ."""
    counts = image_counts(config, step, world_size)
    total = sum(counts)
    generator = torch.Generator().manual_seed(1000 * config.data_seed + step)
    images = (torch.randn(total, 3, 8, 8, generator=generator, dtype=torch.float64)
              + 2 * torch.randn(total, 3, 1, 1, generator=generator, dtype=torch.float64)
              + torch.linspace(-1, 1, total, dtype=torch.float64).view(-1, 1, 1, 1))
    targets = torch.randn(total, 3, generator=generator, dtype=torch.float64)
    return images.to(config.dtype), targets.to(config.dtype), counts


def train(config: RunConfig, world_size: int, rank: int | None = None,
          norm: type[CrossIterationBatchNorm2d] | None = None) -> list[dict]:
    """SGD steps of ``config``; ``rank=None``: one process with plain CBN on all ranks' images
    and loss = mean over them (the reference); else this rank's images under DDP with loss =
    ``world_size / images`` x the sum over its own (= the mean over its own when no rank is
    empty), so that DDP's average of the gradients is the reference's gradient.

    ``norm`` overrides the norm layer class (SyncCBN under DDP, else plain CBN).

    Returns per step: the logits and the first CBN layer's output (this rank's images), the
    parameters' gradients, and the model's state dict after the step.
    """
    if norm is None:
        norm = SyncCrossIterationBatchNorm2d() if rank is not None and config.synced else (
            CrossIterationBatchNorm2d)
    model = build_model(config, norm)
    net = model if rank is None else nn.parallel.DistributedDataParallel(
        model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    for step in range(config.steps):
        images, targets, counts = step_batch(config, step, world_size)
        scale = 1 / sum(counts)
        if rank is not None:
            start = sum(counts[:rank])
            images, targets = (t[start:start + counts[rank]] for t in (images, targets))
            scale *= world_size
        logits, features = net(images)
        loss = scale * (logits - targets).square().sum()
        optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        records.append(dict(logits=logits.detach().clone(), features=features.detach().clone(),
                            grads=grads, state={k: v.detach().clone()
                                                for k, v in model.state_dict().items()}))
    return records


def SyncCrossIterationBatchNorm2d() -> type[CrossIterationBatchNorm2d]:  # noqa: N802
    """The class under test (imported late: the reference needs only plain CBN)."""
    from mmdet_cbn import SyncCrossIterationBatchNorm2d as sync_cbn
    return sync_cbn


def main(store: str, out: str, world_size: str, rank: str, *configs: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same seed on every rank (as mmengine's): the layers' samplers
    world, me = int(world_size), int(rank)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=me, world_size=world,
                            timeout=timedelta(seconds=60))
    for name in configs:
        records = train(CONFIGS[name], world, me)
        torch.save(records, Path(out) / f'{name}_rank{me}.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(*sys.argv[1:])
