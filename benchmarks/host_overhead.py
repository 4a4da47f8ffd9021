"""Host overhead of a CBN step: the tiny-shape step whose time is its dispatch cost (issue 15).

On a GPU a conv + norm step at detector shapes is bound by what the host spends per operation
(Python, dispatcher, kernel launch), not by arithmetic. On tensors too small for the arithmetic
to matter, the time of a step is that dispatch cost, on any device: here a
``Conv2d(16, 16, 3, padding=1, bias=False)`` and its norm on a ``2x16x8x8`` input that
requires grad (so the conv computes its input gradient, as inside a network), loss
``(out * fixed random).sum()``, forward + backward. **No optimizer step**: parameter and input
gradients are reset to None (no aten op) between steps, so a step is forward + backward only,
as in the issue's measurement; one thread (``--threads``, default 1).

Variants: ``bn`` (conv + ``nn.BatchNorm2d``), ``cbn_w4_exact`` (conv + CBN window 4, exact
gradient: the default), ``cbn_w4_detached`` (window 4, ``detach_compensation=True``, the
authors' gradient) and, for information, ``cbn_w1`` (CBN window 1), ``floor`` (conv + BN
and the one weight-gradient conv a windowed CBN step cannot do without, of the conv's output
in its forward: what is left of 2.0x for the rest of CBN) and ``floor_trivial`` (the floor
plus ``--trivial-ops`` additions of a constant to a ``(C,)`` tensor without autograd, the
cheapest op there is: what an op costs inside the loop, so how many of them fit in 2.0x).
Every variant is warmed up
(``--warmup`` steps, at least twice the window) so the window is full and the history
committed.

Reported per variant:

- the median time of a step: ``--repeats`` interleaved repetitions (:mod:`common`), each the
  mean of ``--steps`` steps; and its ratio to ``bn`` (target: <= 2.0 for both window-4
  variants);
- the aten ops of one step (forward, loss and backward), counted by a ``TorchDispatchMode``
  that records every op reaching the dispatcher below autograd (composite ops arrive already
  decomposed; the autograd engine's ops, e.g. the ``ones_like`` seeding the backward, count):
  all ops, and non-view ops (those whose schema returns no alias: not ``view``, ``t``,
  ``split``, ``detach``, ``expand``...), split into forward (with the loss) and backward, and
  per op name;
- the cost of one trivial op inside the loop, ``(floor_trivial - floor) / --trivial-ops``, and
  how many such ops fit between the floor and 2.0x conv + BN (``budget``): a windowed step
  needs more ops than that, none of them cheaper, so no eager implementation meets the target
  on a machine where this number is below the ops CBN adds to the floor.

Usage: ``python benchmarks/host_overhead.py --clock cpu --out host_overhead.json`` (CPU time
of the one thread: the time spent descheduled on a shared machine is left out);
``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from common import add_common_arguments, interleaved, ratio, run_record, setup_torch, write_json
from layer_speed import weight_grad_conv
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers

SHAPE = (2, 16, 8, 8)
WINDOW = 4
TARGET = 2.0  # step time / conv + BN, for both window-4 CBN variants
VARIANTS = {
    'bn': 'conv + BN',
    'cbn_w4_exact': 'conv + CBN w4 exact',
    'cbn_w4_detached': 'conv + CBN w4 detached',
    'cbn_w4_exact_fused': 'conv + CBN w4 exact, fused step',
    'cbn_w4_detached_fused': 'conv + CBN w4 detached, fused step',
    'cbn_w1': 'conv + CBN w1',
    'floor': 'conv + BN + one weight-gradient conv',
    'floor_trivial': 'floor + trivial ops',
}
TARGETED = ('cbn_w4_exact', 'cbn_w4_detached')


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by overload name (``aten.add.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.all: Counter[str] = Counter()
        self.non_view: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.all[name] += 1
        if not func.is_view:
            self.non_view[name] += 1
        return func(*args, **(kwargs or {}))


def _weight_gradient_of_output(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook of the ``floor`` variant: the conv's weight gradient for its own output."""
    with torch.no_grad():
        weight_grad_conv(conv, inputs[0], output)


class _TrivialOps:
    """Forward hook of the ``floor_trivial`` variant: the floor's weight-gradient conv, then
    ``count`` additions of a constant to a ``(C,)`` tensor, without autograd."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        _weight_gradient_of_output(conv, inputs, output)
        with torch.no_grad():
            total = output.new_zeros(output.shape[1])
            for _ in range(self.count):
                total = total + 1.0


def build_models(device: torch.device, seed: int, trivial_ops: int,
                 fused: bool = False) -> dict[str, nn.Module]:
    """conv + norm of every variant, all from the same conv weights (the fused ones only if
    ``fused``: they compile first)."""
    torch.manual_seed(seed)
    channels = SHAPE[1]
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    norms = {
        'bn': nn.BatchNorm2d(channels),
        'cbn_w4_exact': CrossIterationBatchNorm2d(channels, window_size=WINDOW, fused=False),
        'cbn_w4_detached': CrossIterationBatchNorm2d(channels, window_size=WINDOW,
                                                     detach_compensation=True, fused=False),
        'cbn_w4_exact_fused': CrossIterationBatchNorm2d(channels, window_size=WINDOW,
                                                        fused=True),
        'cbn_w4_detached_fused': CrossIterationBatchNorm2d(
            channels, window_size=WINDOW, detach_compensation=True, fused=True),
        'cbn_w1': CrossIterationBatchNorm2d(channels, window_size=1, fused=False),
        'floor': nn.BatchNorm2d(channels),
        'floor_trivial': nn.BatchNorm2d(channels),
    }
    if not fused:
        del norms['cbn_w4_exact_fused'], norms['cbn_w4_detached_fused']
    models = {}
    for name, norm in norms.items():
        model = nn.Sequential(copy.deepcopy(conv), norm).to(device).train()
        pair_cbn_layers(model)
        models[name] = model
    models['floor'][0].register_forward_hook(_weight_gradient_of_output)
    models['floor_trivial'][0].register_forward_hook(_TrivialOps(trivial_ops))
    return models


def make_step(model: nn.Module, x: torch.Tensor, fixed: torch.Tensor
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, backward)`` halves of one step; calling both is the step. Gradients are
    reset to None before the forward (no aten op), so no step accumulates into the last."""
    params = list(model.parameters())
    loss: list[torch.Tensor] = []

    def forward() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        loss.append((model(x) * fixed).sum())

    def backward() -> None:
        loss.pop().backward()
    return forward, backward


def count_ops(forward: Callable[[], None], backward: Callable[[], None]) -> dict[str, Any]:
    """The aten ops of one step: totals of forward (with the loss) and backward, and by name."""
    phases = {}
    for phase, fn in (('forward', forward), ('backward', backward)):
        with OpCounter() as counter:
            fn()
        phases[phase] = counter
    by_op = phases['forward'].all + phases['backward'].all
    non_view = phases['forward'].non_view + phases['backward'].non_view
    return {
        'all': sum(by_op.values()),
        'non_view': sum(non_view.values()),
        'forward': {'all': sum(phases['forward'].all.values()),
                    'non_view': sum(phases['forward'].non_view.values())},
        'backward': {'all': sum(phases['backward'].all.values()),
                     'non_view': sum(phases['backward'].non_view.values())},
        'by_op': dict(by_op.most_common()),
        'non_view_by_op': dict(non_view.most_common()),
    }


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    x = torch.randn(SHAPE, device=device).requires_grad_()
    fixed = torch.randn(SHAPE, device=device)
    models = build_models(device, args.seed, args.trivial_ops, args.fused)
    steps, ops = {}, {}
    for name, model in models.items():
        forward, backward = make_step(model, x, fixed)

        def step(forward: Callable[[], None] = forward,
                 backward: Callable[[], None] = backward) -> None:
            forward()
            backward()
        for _ in range(args.warmup):  # fill the window: the steady state is what is counted
            step()
        ops[name] = None if getattr(model[1], 'fused', None) else count_ops(forward, backward)
        steps[name] = step
    timings = interleaved(steps, args.repeats, device, warmup=1, clock=args.clock,
                          calls=args.steps)
    variants = {}
    for name, timing in timings.items():
        norm = models[name][1]
        variants[name] = {
            'label': VARIANTS[name],
            'cbn': {'window_size': norm.window_size,
                    'detach_compensation': norm.detach_compensation,
                    'steps': norm.steps, 'call_sites': norm.num_call_sites}
            if isinstance(norm, CrossIterationBatchNorm2d) else None,
            'median_us': timing['median_s'] * 1e6,
            'min_us': timing['min_s'] * 1e6,
            'ratio_to_bn': ratio(timings, name, 'bn'),
            'timing': timing,
            'ops': ops[name],
        }
    targets = {}
    for name in TARGETED:
        value = variants[name]['ratio_to_bn']
        targets[f'{name} / bn'] = {'value': value, 'target_max': TARGET, 'met': value <= TARGET,
                                   'over_floor_bn': ratio(timings, name, 'floor')}
    floor_s = timings['floor']['median_s']
    trivial_op_s = (timings['floor_trivial']['median_s'] - floor_s) / args.trivial_ops
    room_s = TARGET * timings['bn']['median_s'] - floor_s
    added = {name: variants[name]['ops']['non_view'] - variants['floor']['ops']['non_view']
             for name in TARGETED}
    budget = {'trivial_ops_timed': args.trivial_ops, 'trivial_op_us': trivial_op_s * 1e6,
              'room_to_target_us': room_s * 1e6,
              'trivial_ops_within_target': room_s / trivial_op_s if trivial_op_s > 0 else None,
              'non_view_ops_added_to_floor': added}
    return {'shape': list(SHAPE), 'conv': 'Conv2d(16, 16, 3, padding=1, bias=False)',
            'step': 'forward + (out * fixed).sum() + backward; no optimizer step; '
                    'input requires grad',
            'steps_per_sample': args.steps, 'repeats': args.repeats, 'warmup_steps': args.warmup,
            'variants': variants, 'targets': targets, 'budget': budget}


def print_table(results: dict[str, Any], top: int) -> None:
    """A markdown table of the variants, then the most frequent ops of each CBN variant."""
    env = results['environment']
    print(f"\nstep: {results['step']}; {tuple(results['shape'])}, "
          f"{env['torch_threads']} thread(s), clock {results['args']['clock']}, median of "
          f"{results['repeats']} x {results['steps_per_sample']} steps; load "
          f"{', '.join(f'{v:.2f}' for v in env['loadavg_1_5_15'])}\n")
    print('| variant | median us/step | min us | / conv+BN | aten ops (all) | non-view ops '
          '| non-view fwd / bwd |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    for v in results['variants'].values():
        o = v['ops']
        counts = ('compiled | compiled | compiled' if o is None else
                  f"{o['all']} | {o['non_view']} | {o['forward']['non_view']} / "
                  f"{o['backward']['non_view']}")
        print(f"| {v['label']} | {v['median_us']:.0f} | {v['min_us']:.0f} | "
              f"{v['ratio_to_bn']:.2f} | {counts} |")
    for name, t in results['targets'].items():
        print(f"\n{name}: {t['value']:.2f} (target <= {t['target_max']:.1f}: "
              f"{'met' if t['met'] else 'NOT met'}; {t['over_floor_bn']:.2f} x the floor)",
              end='')
    b = results['budget']
    fit = b['trivial_ops_within_target']
    print(f"\n\none trivial op in the loop: {b['trivial_op_us']:.1f} us (from "
          f"{b['trivial_ops_timed']}); room from the floor to {TARGET:.1f}x conv + BN: "
          f"{b['room_to_target_us']:.0f} us = {'n/a' if fit is None else f'{fit:.0f}'} trivial "
          f"ops; non-view ops CBN adds to the floor: "
          f"{', '.join(f'{n} {c}' for n, c in b['non_view_ops_added_to_floor'].items())}")
    for name, v in results['variants'].items():
        if v['cbn'] is None or v['ops'] is None:
            continue
        listed = ', '.join(f'{op.removeprefix("aten.")} {n}'
                           for op, n in list(v['ops']['non_view_by_op'].items())[:top])
        print(f"\n{v['label']}, most frequent non-view ops: {listed}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=15)
    parser.set_defaults(threads=1)
    parser.add_argument('--steps', type=int, default=200,
                        help='steps per timed repetition (a sample is their mean)')
    parser.add_argument('--warmup', type=int, default=3 * WINDOW,
                        help='untimed steps per variant first (>= 2 x window)')
    parser.add_argument('--top', type=int, default=12, help='ops listed per CBN variant')
    parser.add_argument('--trivial-ops', type=int, default=50,
                        help="additions the 'floor_trivial' variant adds to the floor")
    parser.add_argument('--fused', action='store_true',
                        help='also the window-4 variants with the fused (compiled) step')
    parser.add_argument('--quick', action='store_true', help='smoke run: 3 x 5 steps')
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 3, 5
    args.warmup = max(args.warmup, 2 * WINDOW)
    device = setup_torch(args)
    results: dict[str, Any] = {**run_record(args, device), **run(args, device)}
    print_table(results, args.top)
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
