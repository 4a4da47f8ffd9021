"""Speed of one conv 3x3 + normalization layer, forward + backward: CBN against BN.

Variants (all ``Conv2d(C, C, 3, padding=1, bias=False)`` followed by the norm, a fixed random
output gradient, the input gradient computed as inside a network, a plain SGD update):

- ``bn``: conv + ``BatchNorm2d``;
- ``bn_floor``: ``bn`` plus one bare weight-gradient convolution of the same shape (the cost of
  ``G = d var / d W``, the floor of any Taylor-compensated CBN), the library's own
  (``mmdet_cbn.functional._conv_weight_grad``);
- ``cbn_exact``: conv + ``CrossIterationBatchNorm2d`` as it comes (window 4, history full): the
  exact gradient, through the compensated past statistics too;
- ``cbn_detached``: the same with the authors' gradient (``detach_compensation=True``);
- ``cbn_sampled``: ``cbn_exact`` with ``grad_nu_stride=2`` (``--grad-nu-stride``);
- ``cbn_burnin``: CBN with window 1 (the burn-in period);
- ``autograd_cbn``: the authors' approach, their gradient (:class:`AutogradCBN`);
- ``bn_eval`` / ``cbn_eval``: inference, forward only, running statistics.

Also measures how far the statistics compensated with the sampled ``G`` (``grad_nu_stride``)
are from those with the exact ``G``, after a few SGD steps, next to the error of the Taylor
step itself and the batch-to-batch noise of the statistics.

Usage: ``python benchmarks/layer_speed.py --threads 2 --out layer_speed.json``
(``--quick`` for a smoke run on tiny shapes).
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from common import add_common_arguments, interleaved, ratio, run_record, setup_torch, write_json
from torch import Tensor, nn

from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers
from mmdet_cbn.functional import ConvGeometry, _conv_weight_grad

SHAPES = {
    'fpn': (2, 256, 64, 64),  # an FPN level: 2 images, 256 channels
    'roi': (512, 256, 7, 7),  # a RoI box head conv: 512 RoIs of 7x7
    'fpn-small': (2, 32, 16, 16),
    'roi-small': (64, 32, 7, 7),
}
QUICK_SHAPES = ('fpn-small', 'roi-small')
WINDOW = 4
LR = 1e-3
# name -> (numerator, denominator variants, upper bound of the ratio)
TARGETS: dict[str, tuple[str, str | tuple[str, ...], float]] = {
    'cbn_exact / (bn + floor)': ('cbn_exact', 'bn_floor', 1.05),
    'cbn_exact / autograd_cbn': ('cbn_exact', 'autograd_cbn', 0.70),
    'cbn_burnin / bn': ('cbn_burnin', 'bn', 1.03),
    'cbn_eval / bn_eval': ('cbn_eval', 'bn_eval', 1.02),
}
INFORMATIVE = {
    'cbn_detached / (bn + floor)': ('cbn_detached', 'bn_floor'),
    'cbn_exact / cbn_detached': ('cbn_exact', 'cbn_detached'),
    'cbn_detached / autograd_cbn': ('cbn_detached', 'autograd_cbn'),
    'cbn_exact / bn': ('cbn_exact', 'bn'),
    'cbn_sampled / bn': ('cbn_sampled', 'bn'),
    '(bn + floor) / bn': ('bn_floor', 'bn'),
    'autograd_cbn / bn': ('autograd_cbn', 'bn'),
}


class AutogradCBN(nn.Module):
    """CBN the way the authors' code does it, as the baseline to beat.

    Per past iteration it keeps the old conv weight and full-size ``d mu / d W`` and
    ``d nu / d W`` (three weight-sized tensors per slot), gets the two derivatives of the
    current iteration from two extra ``torch.autograd.grad`` passes through the conv, and
    compensates slot by slot in a Python loop (Eq. 7-10); the normalization (Eq. 11) and its
    backward are left to autograd. Their gradient: the compensated statistics are constants
    of the current weight (``w.detach()``), as in ``detach_compensation=True``.
    """

    def __init__(self, conv: nn.Conv2d, window: int, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = conv
        self.window = window
        self.eps = eps
        self.momentum = momentum
        channels = conv.out_channels
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer('running_mean', torch.zeros(channels))
        self.register_buffer('running_var', torch.ones(channels))
        self.past: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        """Conv, compensated window statistics and normalization of one training step."""
        y = self.conv(x)
        w = self.conv.weight
        mu = y.mean((0, 2, 3))
        nu = y.square().mean((0, 2, 3))
        ones = torch.ones_like(mu)
        (dmu_dw,) = torch.autograd.grad(mu, w, ones, retain_graph=True)
        (dnu_dw,) = torch.autograd.grad(nu, w, ones, retain_graph=True)
        w_now = w.detach()
        mus, nus = [mu], [torch.maximum(nu, mu.square())]
        for old_mu, old_nu, old_dmu, old_dnu, old_w in self.past:
            delta = w_now - old_w
            mu_hat = old_mu + (old_dmu * delta).sum((1, 2, 3))
            nu_hat = old_nu + (old_dnu * delta).sum((1, 2, 3))
            mus.append(mu_hat)
            nus.append(torch.maximum(nu_hat, mu_hat.square()))
        mu_bar = torch.stack(mus).mean(0)
        var_bar = (torch.stack(nus).mean(0) - mu_bar.square()).clamp_min(0)
        with torch.no_grad():
            self.running_mean.lerp_(mu_bar, self.momentum)
            self.running_var.lerp_(var_bar, self.momentum)
        record = (mu.detach(), nu.detach(), dmu_dw, dnu_dw, w_now.clone())
        self.past = [record, *self.past][:self.window - 1]
        scale = torch.rsqrt(var_bar + self.eps) * self.weight
        return (y - mu_bar.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) \
            + self.bias.view(1, -1, 1, 1)


def weight_grad_conv(conv: nn.Conv2d, x: Tensor, grad_y: Tensor) -> Tensor:
    """One bare weight-gradient convolution: the library's, which the layer's ``G`` runs."""
    geometry = ConvGeometry.of(conv)
    return _conv_weight_grad(x, grad_y, tuple(conv.weight.shape), geometry, geometry.stride,
                             geometry.padding)


def _sgd(params: list[nn.Parameter], lr: float = LR) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(p.grad, alpha=lr)
                p.grad = None


def _conv(channels: int, device: torch.device, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)


def _cbn(channels: int, device: torch.device, **kwargs: Any) -> CrossIterationBatchNorm2d:
    return CrossIterationBatchNorm2d(channels, window_size=WINDOW, **kwargs).to(device)


def build_variants(shape: tuple[int, int, int, int], device: torch.device,
                   seed: int, stride: int = 2) -> dict[str, Callable[[], Any]]:
    """One callable per variant, each running a full step of its own conv + norm copy."""
    n, c, h, w = shape
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device).requires_grad_()
    grad_out = torch.randn(shape, device=device)
    conv = _conv(c, device, seed)

    def train_step(model: nn.Module, extra: Callable[[Tensor], Any] | None = None
                   ) -> Callable[[], None]:
        params = list(model.parameters())
        model.train()

        def step() -> None:
            out = model(x)
            out.backward(grad_out)
            if extra is not None:
                extra(out)
            x.grad = None
            _sgd(params)
        return step

    def eval_step(model: nn.Module) -> Callable[[], None]:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(x)
        return step

    def paired(norm: nn.Module) -> nn.Sequential:
        model = nn.Sequential(copy.deepcopy(conv), norm)
        pair_cbn_layers(model)
        return model

    bn = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(c).to(device))
    bn_floor = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(c).to(device))
    burnin = paired(_cbn(c, device))
    burnin[1].set_window(1)
    cbn_eval = paired(_cbn(c, device))
    bn_eval = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(c).to(device))
    return {
        'bn': train_step(bn),
        'bn_floor': train_step(bn_floor, lambda out: weight_grad_conv(bn_floor[0], x.detach(),
                                                                      out.detach())),
        'cbn_exact': train_step(paired(_cbn(c, device))),
        'cbn_detached': train_step(paired(_cbn(c, device, detach_compensation=True))),
        'cbn_sampled': train_step(paired(_cbn(c, device, grad_nu_stride=stride))),
        'cbn_burnin': train_step(burnin),
        'autograd_cbn': train_step(AutogradCBN(copy.deepcopy(conv), WINDOW).to(device)),
        'bn_eval': eval_step(bn_eval),
        'cbn_eval': eval_step(cbn_eval),
    }


def measure_shape(shape: tuple[int, int, int, int], device: torch.device, repeats: int,
                  seed: int, clock: str = 'wall', stride: int = 2,
                  calls: int = 1) -> dict[str, Any]:
    """Timings (after ``WINDOW`` warm-up steps, so the CBN history is full) and ratios."""
    variants = build_variants(shape, device, seed, stride)
    timings = interleaved(variants, repeats, device, warmup=WINDOW, clock=clock, calls=calls)
    ratios = {}
    for name, (num, den, bound) in TARGETS.items():
        value = ratio(timings, num, den)
        ratios[name] = {'value': value, 'target_max': bound, 'met': value <= bound}
    for name, (num, den) in INFORMATIVE.items():
        ratios[name] = {'value': ratio(timings, num, den)}
    return {'shape': list(shape), 'timings': timings, 'ratios': ratios}


def _relative(a: Tensor, b: Tensor) -> dict[str, float]:
    rel = ((a - b).abs() / b.abs().clamp_min(1e-12)).flatten()
    return {'median': rel.median().item(), 'max': rel.max().item()}


def _window_variance(conv: nn.Conv2d, batches: list[tuple[Tensor, Tensor]], weight: Tensor,
                     x: Tensor, **cbn_kwargs: Any) -> Tensor:
    """``sigma2_bar`` of a fresh CBN layer fed ``batches`` (input, conv weight) and then ``x``.

    Read from the running variance with ``momentum=1`` (the unbiased window variance), so
    whatever the layer does internally (exact or sampled ``G``) is what is measured.
    """
    conv = copy.deepcopy(conv)
    layer = CrossIterationBatchNorm2d(conv.out_channels, window_size=len(batches) + 1,
                                      momentum=1.0, **cbn_kwargs).to(x.device)
    model = nn.Sequential(conv, layer)
    pair_cbn_layers(model)
    with torch.no_grad():
        for x_old, w_old in [*batches, (x, weight)]:
            conv.weight.copy_(w_old)
            model(x_old)
    total = (len(batches) + 1) * (x.numel() // x.shape[1])
    return layer.running_var * (total - 1) / total


def sampled_error(shape: tuple[int, int, int, int], device: torch.device, steps: int,
                  seed: int, lr: float = 0.02, stride: int = 2) -> dict[str, Any]:
    """Relative error of the window variance with the sampled ``G`` vs the exact ``G``.

    Trains conv + CBN (window 4) with SGD (momentum 0.9) for ``steps`` steps on random inputs
    with per-channel offsets. Then feeds the last ``WINDOW - 1`` inputs, each under the conv
    weight it was seen with, and a new input under the current weight to a fresh exact layer
    and a fresh ``grad_nu_stride=2`` layer, and compares their window variance
    ``sigma2_bar``. For scale it also reports the error of the exact layer against the true
    window variance under the current weight (the dropped second-order Taylor term) and how
    much the variance of one batch differs from another's (batch noise).
    """
    torch.manual_seed(seed)
    c = shape[1]
    conv = _conv(c, device, seed)
    model = nn.Sequential(conv, _cbn(c, device))
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    offsets = torch.randn(1, c, 1, 1, device=device)
    target = torch.randn(shape, device=device)
    past: list[tuple[Tensor, Tensor]] = []
    weight_step = 0.0
    for _ in range(steps):
        x = torch.randn(shape, device=device) + offsets
        before = conv.weight.detach().clone()
        past = [*past, (x, before)][-(WINDOW - 1):]
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight_step = ((conv.weight.detach() - before).norm() / before.norm()).item()
    weight = conv.weight.detach().clone()
    x_now = torch.randn(shape, device=device) + offsets
    exact = _window_variance(conv, past, weight, x_now)
    sampled = _window_variance(conv, past, weight, x_now, grad_nu_stride=stride)
    with torch.no_grad():
        ys = [conv._conv_forward(x, weight, None) for x, _ in [*past, (x_now, None)]]
    mu = torch.stack([y.mean((0, 2, 3)) for y in ys])
    nu = torch.stack([y.square().mean((0, 2, 3)) for y in ys])
    true = nu.mean(0) - mu.mean(0).square()
    return {
        'shape': list(shape),
        'stride': stride,
        'sgd_steps': steps,
        'lr': lr,
        'relative_weight_step_last': weight_step,
        'sampled_vs_exact_sigma2_bar': _relative(sampled, exact),
        'exact_vs_true_sigma2_bar': _relative(exact, true),
        'batch_noise_var': _relative(nu[0] - mu[0].square(), nu[-1] - mu[-1].square()),
    }


def print_table(results: dict[str, Any]) -> None:
    """Medians and ratios, one block per shape."""
    for shape_name, res in results['shapes'].items():
        print(f"\n== {shape_name} {tuple(res['shape'])} ==")
        bn = res['timings']['bn']['median_s']
        print(f"{'variant':<14}{'median ms':>11}{'min ms':>9}{'/ bn':>7}")
        for name, t in res['timings'].items():
            print(f"{name:<14}{t['median_s'] * 1e3:>11.1f}{t['min_s'] * 1e3:>9.1f}"
                  f"{t['median_s'] / bn:>7.2f}")
        for name, r in res['ratios'].items():
            verdict = ''
            if 'target_max' in r:
                verdict = f"  (target <= {r['target_max']:.2f}: {'met' if r['met'] else 'NOT met'})"
            print(f"  {name:<30}{r['value']:>6.3f}{verdict}")
    for shape_name, err in results.get('sampled_error', {}).items():
        print(f'\n== sampled G (stride {err["stride"]}) vs exact G, {shape_name} '
              f'{tuple(err["shape"])}, '
              f"after {err['sgd_steps']} SGD steps (|dW|/|W| last step "
              f"{err['relative_weight_step_last']:.1e}) ==")
        for key in ('sampled_vs_exact_sigma2_bar', 'exact_vs_true_sigma2_bar',
                    'batch_noise_var'):
            print(f"  {key:<34} median {err[key]['median']:.2e}  max {err[key]['max']:.2e}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=7)
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['fpn', 'roi'])
    parser.add_argument('--grad-nu-stride', type=int, default=2,
                        help='grad_nu_stride of the cbn_sampled variant')
    parser.add_argument('--sgd-steps', type=int, default=6,
                        help='SGD steps before the sampled-vs-exact comparison')
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke run: shapes {", ".join(QUICK_SHAPES)}, 2 repeats')
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = list(QUICK_SHAPES), 2
    device = setup_torch(args)
    results: dict[str, Any] = {**run_record(args, device), 'shapes': {}, 'sampled_error': {}}
    for name in args.shapes:
        results['shapes'][name] = measure_shape(SHAPES[name], device, args.repeats, args.seed,
                                                args.clock, args.grad_nu_stride, args.calls)
    for name in args.shapes:
        results['sampled_error'][name] = sampled_error(SHAPES[name], device, args.sgd_steps,
                                                       args.seed, stride=args.grad_nu_stride)
    print_table(results)
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
