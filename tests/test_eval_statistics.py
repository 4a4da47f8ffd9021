"""Eval-mode statistics of CBN: re-estimation at the current weights, and its hook."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from mmdet_cbn import (CrossIterationBatchNorm2d, load_population_statistics, pair_cbn_layers,
                       population_statistics)
from mmdet_cbn.functional import compensate

SIZES = (2, 3, 5)  # images per batch


def small_model() -> nn.Sequential:
    """conv -> CBN (window 4) -> relu -> conv -> BN -> relu -> conv -> CBN (window 4), float64."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), CrossIterationBatchNorm2d(6, window_size=4), nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 1), CrossIterationBatchNorm2d(4, window_size=4)).double()
    pair_cbn_layers(model)
    return model


def trained_model(steps: int = 3) -> nn.Sequential:
    """A model after a few SGD steps: CBN windows partly filled (``steps - 1`` of 3 slots)."""
    torch.manual_seed(0)  # the initial weights
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out = model(torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64))
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    return model


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64) + 0.5
            for n in SIZES]


def direct_statistics(model: nn.Sequential, inputs: list[torch.Tensor]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every norm layer's input over all batches, each layer normalizing with its batch's
    statistics, concatenated: its mean and unbiased variance, computed directly."""
    seen: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x in inputs:
            for name, module in model.named_children():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    seen.setdefault(name, []).append(x)
                    x = F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0,
                                     module.eps)
                else:
                    x = module(x)
    return {name: (torch.cat(ys).mean((0, 2, 3)), torch.cat(ys).var((0, 2, 3), unbiased=True))
            for name, ys in seen.items()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, buffers and CBN histories (everything the re-estimation must not change)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f'{name}.steps': torch.tensor(m.steps) for name, m in model.named_modules()
                  if isinstance(m, CrossIterationBatchNorm2d)})
    return state


def test_population_statistics_are_exact_and_change_nothing():
    model = trained_model()
    assert [m.histories[0].filled for m in model if isinstance(m, CrossIterationBatchNorm2d)] \
        == [2, 2]
    model.eval()
    before = state_of(model)
    rng = torch.get_rng_state()
    stats = population_statistics(model, batches(), model)
    expected = direct_statistics(model, batches())
    assert {name: s.count for name, s in stats.items()} == {'1': 640, '4': 90, '7': 90}
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(stats[name].mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(stats[name].var, var, rtol=0, atol=1e-10)
    after = state_of(model)
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert not any(m.training for m in model.modules())  # modes restored
    assert torch.equal(torch.get_rng_state(), rng)
    assert all('forward' not in vars(m) for m in model.modules())

    load_population_statistics(model, stats)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(model[int(name)].running_mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(model[int(name)].running_var, var, rtol=0, atol=1e-10)


def test_training_continues_as_without_the_re_estimation():
    """The re-estimation between two steps leaves the next training step bit-identical."""
    outputs = []
    for re_estimate in (False, True):
        model = trained_model()
        if re_estimate:
            population_statistics(model, batches(), model)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_clamped_variance_counter_counts_negative_compensated_variances():
    """``clamped_variances`` adds, per training step, the compensated past variances below 0
    (those Eq. 10 clamps) and all compensated past variances of the window."""
    torch.manual_seed(0)
    conv, cbn = nn.Conv2d(3, 6, 3, padding=1).double(), CrossIterationBatchNorm2d(6,
                                                                                 window_size=4)
    model = nn.Sequential(conv, cbn).double()
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)  # weights jump: the step fails
    generator = torch.Generator().manual_seed(4)
    expected = torch.zeros(2, dtype=torch.long)
    for step in range(6):
        history = cbn.histories[0] if cbn.histories else None
        if history is not None:
            history.commit()  # what the next call does first; idempotent
            _, var_hat, _ = compensate(conv.weight.detach(), conv.bias.detach(),
                                       mean=history.mean, var_intercept=history.var_intercept,
                                       xbar=history.xbar, grad_var=history.grad_var)
            in_window = history.slot_weight > 0
            expected += torch.stack([(var_hat[in_window] < 0).sum(),
                                     in_window.sum() * var_hat.shape[1]])
        out = model(torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64))
        optimizer.zero_grad()
        (out * torch.linspace(-1, 2, 6, dtype=torch.float64).view(1, -1, 1, 1)).pow(3).mean(
            ).backward()
        optimizer.step()
    assert torch.equal(cbn.clamped_variances, expected)
    assert expected[1] == (1 + 2 + 3 + 3 + 3) * 6 and expected[0] > 0


class ToyDetector(BaseModel):
    """conv -> CBN -> mean -> linear, with a loss mode and a predict mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = CrossIterationBatchNorm2d(8, window_size=3)
        self.head = nn.Linear(8, 1)

    def forward(self, inputs, targets=None, mode='loss'):
        prediction = self.head(self.norm(self.conv(inputs)).relu().mean((2, 3))).squeeze(1)
        if mode == 'loss':
            return {'loss': (prediction - targets).square().mean()}
        return [dict(error=(p - t).abs().item()) for p, t in zip(prediction, targets)]


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 6, 6, generator=g) + 1,
                    targets=torch.tensor(float(i)))


class MeanError(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(s['error'] for s in data_samples)

    def compute_metrics(self, results):
        return {'mae': sum(results) / len(results)}


class StatisticsAtValidation(Hook):
    """Records, when a validation starts, the CBN running statistics and the population
    statistics of the CBN input over the whole training set, computed directly."""

    priority = 'LOW'  # after CBNBurnInHook

    def __init__(self):
        self.seen = []

    def before_val_epoch(self, runner):
        model = runner.model
        with torch.no_grad():
            y = model.conv(torch.stack([ToyData()[i]['inputs'] for i in range(8)]))
        self.seen.append((model.norm.running_mean.clone(), model.norm.running_var.clone(),
                          y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=True)))


def run_with_validation(tmp_path, precise_batches: int | None, by_epoch: bool):
    """4 epochs (or 16 iterations) of 4 batches, validation every 2 (8); ``precise_batches``
    None: the hook's default."""
    torch.manual_seed(0)
    model = ToyDetector()
    recorder = StatisticsAtValidation()
    loader = dict(dataset=ToyData(), batch_size=2, collate_fn=dict(type='default_collate'),
                  sampler=dict(type='DefaultSampler', shuffle=True))
    runner = Runner(
        model=model, work_dir=str(tmp_path), train_dataloader=loader, val_dataloader=loader,
        val_evaluator=Evaluator(MeanError()), val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        train_cfg=dict(by_epoch=True, max_epochs=4, val_interval=2) if by_epoch else
        dict(by_epoch=False, max_iters=16, val_interval=8),
        custom_hooks=[dict(type='CBNBurnInHook', burnin_epochs=1, **(
            {} if precise_batches is None else dict(precise_batches=precise_batches))),
            recorder],
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=2)),
        log_level='INFO', experiment_name=f'{tmp_path.parent.name}_{tmp_path.name}',
        randomness=dict(seed=0))
    runner.train()
    return runner, model, recorder


@pytest.mark.parametrize('by_epoch', [True, False])
def test_hook_re_estimates_statistics_before_validation_and_training_is_unchanged(tmp_path,
                                                                                 by_epoch):
    """By default (the 4 batches of the training set are fewer than the default number).
    Epoch-based: from the training loader; iteration-based: from a loader of its own mid-run
    (the training's data order stays), from the training loader at the end."""
    runner, model, recorder = run_with_validation(tmp_path / 'precise', None, by_epoch)
    assert len(recorder.seen) == 2  # epochs 2 and 4, iterations 8 and 16
    for running_mean, running_var, mean, var in recorder.seen:
        torch.testing.assert_close(running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(running_var, var, rtol=1e-5, atol=1e-5)
    log = (tmp_path / 'precise' / runner.timestamp / f'{runner.timestamp}.log').read_text()
    assert 'CBN: running statistics of 1 norm layers re-estimated' in log
    clamped, _ = runner.message_hub.get_scalar('train/cbn_clamped_var').data
    assert len(clamped) == 6 and all(0 <= c <= 1 for c in clamped)  # iterations 5-16, 2 each
    assert model.norm.clamped_variances.tolist() == [0, 0]  # read and reset at the interval

    _, plain, plain_recorder = run_with_validation(tmp_path / 'plain', 0, by_epoch)
    for name, value in plain.state_dict().items():  # the same training, other statistics
        if name.startswith('norm.running') or name == 'norm.num_batches_tracked':
            continue
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert not torch.allclose(plain_recorder.seen[0][0], recorder.seen[0][0])
