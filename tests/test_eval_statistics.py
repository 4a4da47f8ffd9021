"""Eval-mode statistics of CBN: re-estimation at the current weights, and its hook."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
            past = history.past(True)
            _, var_hat, _ = compensate(conv.weight.detach(), conv.bias.detach(), mean=past.mean,
                                       var_intercept=past.var_intercept, xbar=past.xbar,
                                       grad_var=past.grad_var)
            in_window = past.slot_weight > 0
            expected += torch.stack([(var_hat[in_window] < 0).sum(),
                                     in_window.sum() * var_hat.shape[1]])
        out = model(torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64))
        optimizer.zero_grad()
        (out * torch.linspace(-1, 2, 6, dtype=torch.float64).view(1, -1, 1, 1)).pow(3).mean(
            ).backward()
        optimizer.step()
    assert torch.equal(cbn.clamped_variances, expected)
    assert expected[1] == (1 + 2 + 3 + 3 + 3) * 6 and expected[0] > 0
