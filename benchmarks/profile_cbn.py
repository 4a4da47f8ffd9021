"""Where the time of a CBN training step goes, phase by phase, next to BN's.

One conv 3x3 + norm layer (the shapes of ``layer_speed.py``), window 4 with a full history,
is stepped under ``torch.profiler``. The phases are named from the code as it is, so the
profile follows the package when it changes: every function of ``mmdet_cbn.functional``
(where ``mmdet_cbn.cbn`` imported it and where ``functional`` calls it) and every method of
``CrossIterationBatchNorm2d`` and ``History`` is wrapped in a ``record_function`` range for
the run (and restored after). The backward pass is split by autograd node. Times are
*exclusive* (a range minus the labelled ranges inside it) and are medians over the profiled
steps. The CBN layer is the default one (exact gradient); ``--detached`` profiles
``detach_compensation=True``.

Usage: ``python benchmarks/profile_cbn.py --threads 2 --out profile.json``
(``--sampled`` profiles ``grad_nu_stride=2``; ``--quick`` runs tiny shapes).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from common import add_common_arguments, run_record, setup_torch, synchronize, write_json
from layer_speed import QUICK_SHAPES, SHAPES, WINDOW, _conv, _sgd
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from mmdet_cbn import CrossIterationBatchNorm2d, cbn, functional, pair_cbn_layers

STEP_PHASES = ('conv_forward', 'norm_forward', 'backward', 'sgd')
_ENGINE_PREFIX = 'autograd::engine::evaluate_function: '


def _wrapped(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def instrumented() -> Iterator[set[str]]:
    """Wrap the package's functions and layer methods in profiler ranges; yield their labels.

    The functions of ``mmdet_cbn.functional`` are wrapped both where ``mmdet_cbn.cbn`` imported
    them and in ``functional`` itself, so that the calls between them (``record_statistics``
    -> ``grad_var_wrt_weight``, the window normalization's ``compensate``) show as nested
    ranges; cached functions (``_tap_rows``) are not plain functions and stay as they are.
    """
    targets: list[tuple[Any, str, str]] = [
        (module, name, name) for module in (cbn, functional)
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == functional.__name__]
    for klass in (CrossIterationBatchNorm2d, getattr(cbn, 'History', None)):
        if klass is not None:
            targets += [(klass, name, f'{klass.__name__}.{name}')
                        for name, obj in vars(klass).items()
                        if inspect.isfunction(obj) and not name.startswith('__')
                        and name != 'forward']
    originals = [(owner, name, vars(owner)[name]) for owner, name, _ in targets]
    try:
        for owner, name, label in targets:
            setattr(owner, name, _wrapped(vars(owner)[name], label))
        yield {label for _, _, label in targets} | set(STEP_PHASES)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _label(event: Any, labels: set[str]) -> str | None:
    if event.name in labels:
        return event.name
    if event.name.startswith(_ENGINE_PREFIX):
        return event.name[len(_ENGINE_PREFIX):]
    return None


def _labelled_parent(event: Any, labels: set[str]) -> Any:
    parent = event.cpu_parent
    while parent is not None and _label(parent, labels) is None:
        parent = parent.cpu_parent
    return parent


def exclusive_times(events: Any, labels: set[str]) -> list[tuple[str, dict[str, float]]]:
    """Per profiled step: its name and the ms of each label path inside it (``outer/inner``),
    exclusive of the labelled ranges nested inside. Steps are the outermost labelled ranges.
    """
    paths: dict[int, tuple[int, str]] = {}  # event id -> (step id, path inside the step)
    steps: dict[int, tuple[str, dict[str, float]]] = {}

    def path_of(event: Any) -> tuple[int, str]:
        if id(event) not in paths:
            parent = _labelled_parent(event, labels)
            label = _label(event, labels)
            if parent is None:
                steps[id(event)] = (label, defaultdict(float))
                paths[id(event)] = (id(event), '')
            else:
                step, prefix = path_of(parent)
                paths[id(event)] = (step, f'{prefix}/{label}' if prefix else label)
        return paths[id(event)]

    for event in events:
        if _label(event, labels) is None:
            continue
        step, path = path_of(event)
        parent = _labelled_parent(event, labels)
        if parent is None:
            continue
        times = steps[step][1]
        times[path] += event.cpu_time_total / 1e3
        _, parent_path = path_of(parent)
        if parent_path:
            times[parent_path] -= event.cpu_time_total / 1e3
    return [(name, dict(times)) for name, times in steps.values()]


def _layer_step(model: nn.Sequential, x: torch.Tensor, grad_out: torch.Tensor
                ) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        with record_function('conv_forward'):
            y = model[0](x)
        with record_function('norm_forward'):
            out = model[1](y)
        with record_function('backward'):
            out.backward(grad_out)
        with record_function('sgd'):
            x.grad = None
            _sgd(params)
    return step


def profile_shape(shape: tuple[int, int, int, int], device: torch.device, repeats: int,
                  seed: int, grad_nu_stride: int = 1,
                  detach_compensation: bool = False) -> dict[str, Any]:
    """Median exclusive ms per phase of the CBN and BN steps at one shape."""
    n, c, h, w = shape
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device).requires_grad_()
    grad_out = torch.randn(shape, device=device)
    conv = _conv(c, device, seed)
    cbn_model = nn.Sequential(copy.deepcopy(conv), CrossIterationBatchNorm2d(
        c, window_size=WINDOW, grad_nu_stride=grad_nu_stride,
        detach_compensation=detach_compensation).to(device))
    pair_cbn_layers(cbn_model)
    steps = {'cbn': _layer_step(cbn_model, x, grad_out),
             'bn': _layer_step(nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(c).to(device)),
                               x, grad_out)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda'
                                           else [])
    with instrumented() as labels:
        for _ in range(WINDOW):  # fill the history
            for step in steps.values():
                step()
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                for name, step in steps.items():
                    with record_function(name):
                        step()
                        synchronize(device)
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, times in exclusive_times(prof.events(), labels | set(steps)):
        samples[name].append(times)
    result: dict[str, Any] = {'shape': list(shape), 'grad_nu_stride': grad_nu_stride,
                              'detach_compensation': detach_compensation}
    for name, runs in samples.items():
        keys = sorted({k for run in runs for k in run}, key=lambda k: (k.split('/')[0] not in
                                                                       STEP_PHASES, k))
        phases = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}
        step_ms = statistics.median(sum(run.values()) for run in runs)
        result[name] = {'step_ms': step_ms, 'phases_ms': phases}
    return result


def print_profile(results: dict[str, Any]) -> None:
    """One table per shape and norm: phase path, exclusive ms, share of the step."""
    for name, res in results['shapes'].items():
        for norm in ('cbn', 'bn'):
            prof = res[norm]
            step = prof['step_ms']
            print(f"\n== {norm.upper()} step at {name} {tuple(res['shape'])}"
                  + (f" (grad_nu_stride={res['grad_nu_stride']}"
                     + (', detached' if res['detach_compensation'] else ', exact gradient')
                     + ')' if norm == 'cbn' else '')
                  + f': {step:.1f} ms (profiled) ==')
            for path, ms in sorted(prof['phases_ms'].items(), key=lambda kv: _order(kv[0])):
                if ms >= 0.05:
                    depth = path.count('/')
                    label = '  ' * depth + path.rsplit('/', 1)[-1]
                    print(f'  {label:<52}{ms:>9.1f} ms {ms / step:>6.1%}')


def _order(path: str) -> tuple:
    top = path.split('/')[0]
    return (STEP_PHASES.index(top) if top in STEP_PHASES else len(STEP_PHASES), path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=5, clock=False)
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['fpn', 'roi'])
    parser.add_argument('--sampled', action='store_true', help='profile grad_nu_stride=2')
    parser.add_argument('--detached', action='store_true',
                        help="profile the authors' gradient (detach_compensation=True)")
    parser.add_argument('--quick', action='store_true', help='smoke run on tiny shapes')
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = list(QUICK_SHAPES), 2
    device = setup_torch(args)
    results: dict[str, Any] = {**run_record(args, device), 'shapes': {}}
    for name in args.shapes:
        results['shapes'][name] = profile_shape(SHAPES[name], device, args.repeats, args.seed,
                                                2 if args.sampled else 1, args.detached)
    print_profile(results)
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
