"""SyncCBN (issue 25) against one process with plain CBN on the concatenated batch.

R gloo processes x 2 images under DDP (per-rank loss = mean over its own images) must equal
one process with ``CrossIterationBatchNorm2d`` on the R x 2 images (loss = mean over all):
per step the outputs, the gradients, and the whole state after the step (parameters,
running statistics, ``num_batches_tracked``, the history). One launch per world size runs
every configuration of ``sync_cbn_probe.CONFIGS``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmdet_cbn import CrossIterationBatchNorm2d, convert_cbn
from sync_cbn_probe import CONFIGS, build_model, image_counts, step_batch, train

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FLOAT64 = dict(rtol=0.0, atol=1e-10)
FLOAT32 = dict(rtol=1e-4, atol=1e-5)
LAUNCH_TIMEOUT_S = 240


def sync_cbn_class():
    import mmdet_cbn
    return mmdet_cbn.SyncCrossIterationBatchNorm2d


class Launch:
    """The per-rank records of one launch of ``sync_cbn_probe.py`` on ``world_size`` ranks."""

    def __init__(self, out: Path, world_size: int, log: str) -> None:
        self.out, self.world_size, self.log = out, world_size, log

    def records(self, config: str) -> list[list[dict]]:
        """``[rank][step]`` records of ``config``; fails with the ranks' log if missing."""
        files = [self.out / f'{config}_rank{rank}.pt' for rank in range(self.world_size)]
        missing = [f.name for f in files if not f.exists()]
        assert not missing, f'no records {missing}; ranks said:\n{self.log[-6000:]}'
        return [torch.load(f) for f in files]


@pytest.fixture(scope='module', params=[2, 3], ids=['2ranks', '3ranks'])
def launch(request, tmp_path_factory) -> Launch:
    """All configurations in one launch of ``world_size`` processes (file store, gloo)."""
    world_size = request.param
    tmp = tmp_path_factory.mktemp(f'sync_cbn_{world_size}')
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    logs = [tmp / f'rank{rank}.log' for rank in range(world_size)]
    procs = [subprocess.Popen([sys.executable, str(TESTS / 'sync_cbn_probe.py'), str(tmp / 'store'),
                               str(tmp), str(world_size), str(rank), *CONFIGS],
                              cwd=TESTS, env=env, stdout=log.open('w'),
                              stderr=subprocess.STDOUT)
             for rank, log in enumerate(logs)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
    hung = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
    for rank in hung:
        procs[rank].kill()
        procs[rank].wait()
    log = ''.join(f'--- rank {rank} (exit {proc.returncode}{", hung" if rank in hung else ""})'
                  f'\n{path.read_text()[-3000:]}\n'
                  for rank, (proc, path) in enumerate(zip(procs, logs)))
    return Launch(tmp, world_size, log)


@functools.lru_cache(maxsize=None)
def reference(config: str, world_size: int) -> list[dict]:
    """One process, plain CBN, all ``world_size`` ranks' images."""
    return train(CONFIGS[config], world_size)


def category(key: str) -> str:
    for part in ('running_mean', 'running_var', 'num_batches_tracked', 'cbn_history'):
        if part in key:
            return part
    return 'cbn_steps' if 'cbn_' in key else 'params'


def compare(got: torch.Tensor, want: torch.Tensor, what: str, errors: dict, rtol: float,
            atol: float) -> None:
    """Assert ``|got - want| <= atol + rtol |want|`` (exact for integers); keep the largest
    absolute error per kind in ``errors``."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f'{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}')
    if not want.is_floating_point():
        assert torch.equal(got, want), f'{what}: {got.tolist()} != {want.tolist()}'
        return
    diff = (got - want).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    kind = what.split(':')[0]
    errors[kind] = max(errors.get(kind, 0.0), worst)
    allowed = atol + rtol * want.abs()
    assert bool((diff <= allowed).all()), f'{what}: max error {worst:.3g}'


def assert_matches_reference(ranks: list[list[dict]], config: str, tolerance: dict) -> dict:
    """Every rank, every step: its slice of the outputs, the (DDP-averaged) gradients and the
    state after the step equal the reference's. Returns the largest error per kind."""
    world_size = len(ranks)
    want = reference(config, world_size)
    errors: dict[str, float] = {}
    for step, expected in enumerate(want):
        counts = image_counts(CONFIGS[config], step, world_size)
        for rank, records in enumerate(ranks):
            got = records[step]
            where = f'step {step} rank {rank}'
            start = sum(counts[:rank])
            for name in ('logits', 'features'):
                compare(got[name], expected[name][start:start + counts[rank]],
                        f'{name}: {where}', errors, **tolerance)
            assert got['grads'].keys() == expected['grads'].keys()
            for name, grad in expected['grads'].items():
                compare(got['grads'][name], grad, f'grad: {name} {where}', errors, **tolerance)
            assert got['state'].keys() == expected['state'].keys(), where
            for key, value in expected['state'].items():
                compare(got['state'][key], value, f'{category(key)}: {key} {where}', errors,
                        **tolerance)
    return errors


@pytest.mark.parametrize('config', ['burnin_exact', 'detached_window4', 'naive', 'call_sites'])
def test_ddp_sync_cbn_equals_one_process_cbn_on_the_concatenated_batch(launch, config):
    """Burn-in, a filling window, both gradient modes, Naive CBN: float64, <= 1e-10."""
    ranks = launch.records(config)
    assert len(ranks[0]) == CONFIGS[config].steps
    history_keys = [k for k in ranks[0][-1]['state'] if 'cbn_history.0.' in k]
    assert len(history_keys) == 2 * 6  # two layers, five fields and the cursor each
    errors = assert_matches_reference(ranks, config, FLOAT64)
    print(f'\n{config} x{launch.world_size}: max abs errors {errors}')


def test_a_rank_without_images_takes_part(launch):
    """A rank with 0 images (rank 0 at step 1, the last rank at step 3): no deadlock, and the
    others' images equal one process on them alone."""
    ranks = launch.records('empty_rank')
    assert ranks[0][1]['logits'].shape == (0, 3)
    assert ranks[-1][3]['features'].shape == (0, 6, 8, 8)
    errors = assert_matches_reference(ranks, 'empty_rank', FLOAT64)
    print(f'\nempty_rank x{launch.world_size}: max abs errors {errors}')


def test_float32_matches_within_float32_roundoff(launch):
    errors = assert_matches_reference(launch.records('float32'), 'float32', FLOAT32)
    print(f'\nfloat32 x{launch.world_size}: max abs errors {errors}')


def test_unsynchronized_cbn_per_rank_does_not_match(launch):
    """The negative control: plain CBN on every rank (per-GPU statistics, as before SyncCBN)
    fails the comparison, in outputs, running statistics and history."""
    ranks = launch.records('unsynced')
    with pytest.raises(AssertionError, match='logits: step 0'):
        assert_matches_reference(ranks, 'unsynced', FLOAT64)
    want = reference('unsynced', launch.world_size)[-1]
    got = ranks[0][-1]
    assert (got['logits'] - want['logits'][:2]).abs().max() > 1e-3
    for key in ('norm1.running_mean', 'norm2.running_var', 'norm1.cbn_history.0.xbar',
                'norm2.cbn_history.0.grad_var'):
        assert (got['state'][key] - want['state'][key]).abs().max() > 1e-3, key


def test_every_rank_holds_the_same_state_and_it_resumes_in_one_process(launch):
    """After every step the state is bitwise the same on every rank; the state after 4 steps
    loaded into one process (plain CBN, or SyncCBN without a process group) gives the 5th
    step of the R-process run: outputs, gradients, running statistics and history."""
    config, resume_at = 'burnin_exact', 4
    ranks = launch.records(config)
    for step, rank0 in enumerate(ranks[0]):
        for records in ranks[1:]:
            for key, value in records[step]['state'].items():
                assert torch.equal(value, rank0['state'][key]), (key, step)
    state = ranks[0][resume_at - 1]['state']
    images, targets, counts = step_batch(CONFIGS[config], resume_at, launch.world_size)
    ddp_step = [records[resume_at] for records in ranks]
    errors: dict[str, float] = {}
    for norm in (CrossIterationBatchNorm2d, sync_cbn_class()):
        model = build_model(CONFIGS[config], norm)
        model.load_state_dict(state)
        logits, features = model(images)
        ((logits - targets).square().sum() / sum(counts)).backward()
        compare(logits, torch.cat([s['logits'] for s in ddp_step]), 'logits', errors, **FLOAT64)
        compare(features, torch.cat([s['features'] for s in ddp_step]), 'features', errors,
                **FLOAT64)
        for name, param in model.named_parameters():
            compare(param.grad, ddp_step[0]['grads'][name], f'grad: {name}', errors, **FLOAT64)
        for key, value in model.state_dict().items():
            if category(key) != 'params':  # the DDP step's parameters moved on: SGD ran
                compare(value, ddp_step[0]['state'][key], f'{category(key)}: {key}', errors,
                        **FLOAT64)
    print(f'\nresume x{launch.world_size}: max abs errors {errors}')


def assert_sync_cbn_is_cbn_bitwise(config: str) -> None:
    """SyncCBN's outputs, gradients and state equal CBN's bitwise over every step of one
    process (no DDP)."""
    want = train(CONFIGS[config], 2)
    got = train(CONFIGS[config], 2, norm=sync_cbn_class())
    for step, (g, w) in enumerate(zip(got, want)):
        for name in ('logits', 'features'):
            assert torch.equal(g[name], w[name]), (name, step)
        assert g['grads'].keys() == w['grads'].keys()
        assert all(torch.equal(g['grads'][k], v) for k, v in w['grads'].items()), step
        assert g['state'].keys() == w['state'].keys()
        assert all(torch.equal(g['state'][k], v) for k, v in w['state'].items()), step


@pytest.mark.parametrize('config', ['burnin_exact', 'detached_window4', 'naive'])
def test_without_a_process_group_sync_cbn_is_cbn(config):
    assert not dist.is_initialized()
    assert_sync_cbn_is_cbn_bitwise(config)


def test_in_a_process_group_of_one_sync_cbn_is_cbn(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        assert_sync_cbn_is_cbn_bitwise('burnin_exact')
    finally:
        dist.destroy_process_group()


def test_convert_cbn_sync_and_the_registry_build_sync_cbn():
    from mmcv.cnn import build_norm_layer
    from mmengine.registry import MODELS

    sync_cbn = sync_cbn_class()
    assert issubclass(sync_cbn, CrossIterationBatchNorm2d)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False))
    convert_cbn(model, window_size=3, burnin_iters=1, sync=True)
    for conv, norm in ((model[0], model[1]), (model[3], model[4])):
        assert type(norm) is sync_cbn
        assert norm.paired_conv is conv
        assert (norm.window_size, norm.burnin_iters) == (3, 1)
    assert not model[4].affine
    layer = MODELS.build(dict(type='SyncCBN', num_features=8))
    assert type(layer) is sync_cbn and layer.num_features == 8
    _, layer = build_norm_layer(dict(type='SyncCBN', window_size=2), 16)
    assert type(layer) is sync_cbn and (layer.num_features, layer.window_size) == (16, 2)
    assert type(sync_cbn(4, process_group=None)) is sync_cbn


def test_sampled_grad_var_keeps_every_rank_alike(launch):
    """``grad_nu_stride=2``, ranks seeded alike: each rank draws its own positions, and the
    pooled record, history, running statistics and samplers are still bitwise the same on
    every rank; the sampled record differs from the exact one (the sample is really drawn)."""
    ranks = launch.records('sampled')
    for step, rank0 in enumerate(ranks[0]):
        for records in ranks[1:]:
            for key, value in records[step]['state'].items():
                assert torch.equal(value, rank0['state'][key]), (key, step)
    exact = train(dataclasses.replace(CONFIGS['sampled'], grad_nu_stride=1), launch.world_size)
    key = 'norm1.cbn_history.0.grad_var'
    assert (ranks[0][0]['state'][key] - exact[0]['state'][key]).abs().max() > 1e-6
