"""Memory of CBN against BN: the state a CBN layer keeps, and the peak of a training step.

1. State: the bytes of a CBN layer's history (per layer and per slot: the ``records`` of its
   ``histories``, one per call site) against its conv weight, for the paper's window 4 and a
   few others, the record of the current iteration (written to a free slot, which joins the
   window when the next iteration starts) apart, next to what the authors' approach keeps
   (old weight plus full-size ``d mu / d W`` and ``d nu / d W`` per slot, as
   ``layer_speed.AutogradCBN`` does). Target: at most one weight-sized tensor per slot plus
   O(channels) (the mean input patch ``Xbar``, ``C_in * kh * kw`` floats, is counted with it).
2. Peak: the memory allocated during one conv + norm training step (forward, backward, SGD
   update), above what was allocated before it, at the shapes of ``layer_speed.py``. On CUDA
   from ``torch.cuda.max_memory_allocated``; on CPU from the allocation events of
   ``torch.profiler`` (``profile_memory=True``): the running total of the bytes allocated
   during the step and not yet freed, whose maximum is the step's peak.

Usage: ``python benchmarks/memory.py --out memory.json`` (``--quick`` for tiny shapes,
``--fused`` to add the compiled step).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (add_common_arguments, cuda_step_peak, run_record, setup_torch,
                    tensor_bytes, write_json)
from layer_speed import QUICK_SHAPES, SHAPES, WINDOW, AutogradCBN, _cbn, _conv, _sgd
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers
from mmdet_cbn.history import FIELDS

MiB = 2 ** 20
CBN_VARIANTS = ('cbn_exact', 'cbn_detached', 'cbn_sampled', 'autograd_cbn')


def history_bytes(layer: CrossIterationBatchNorm2d) -> dict[str, int]:
    """Bytes of the layer's history by field, summed over its call sites (empty before its
    first windowed step): the named views of each ``History.records``, the slots of the past
    iterations and the free slot holding the current iteration's record."""
    by_field: dict[str, int] = {}
    for history in layer.histories:
        if history is None:
            continue
        for name in FIELDS:
            by_field[name] = by_field.get(name, 0) + tensor_bytes([getattr(history, name)])
    return by_field


def records_bytes(layer: CrossIterationBatchNorm2d) -> int:
    """Bytes of ``records`` (the slots, the free one included) over the layer's call sites."""
    return tensor_bytes([h.records for h in layer.histories if h is not None])


def running_record_bytes(layer: CrossIterationBatchNorm2d) -> int:
    """Bytes of the free slots (this iteration's records, in the window from the next one)."""
    return tensor_bytes([h.records[h.free] for h in layer.histories if h is not None])


def layer_state(channels: int, window: int, device: torch.device) -> dict[str, Any]:
    """History bytes of a CBN layer after a conv ``channels -> channels``, 3x3, and baselines."""
    conv = _conv(channels, device, 0)
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(channels, window_size=window).to(device))
    pair_cbn_layers(model)
    authors = AutogradCBN(copy.deepcopy(conv), window).to(device)
    x = torch.randn(2, channels, 8, 8, device=device)
    for _ in range(window):  # forward + backward: one iteration each
        model(x).sum().backward()
        authors(x).sum().backward()
    layer = model[1]
    per_field = history_bytes(layer)
    weight = tensor_bytes([conv.weight])
    slots = window - 1
    total = records_bytes(layer)
    running = running_record_bytes(layer)
    assert total == sum(per_field.values())  # the fields are views of the records
    authors_total = sum(tensor_bytes(record) for record in authors.past)
    return {
        'channels': channels,
        'window': window,
        'slots': slots,
        'call_sites': len(layer.histories),
        'conv_weight_bytes': weight,
        'history_bytes': total,
        'history_bytes_by_field': per_field,
        'running_record_bytes': running,
        'history_per_slot_over_weight': (total - running) / slots / weight,
        'beyond_one_weight_per_slot_bytes': total - running - slots * weight,
        'authors_approach_bytes': authors_total,
        'authors_per_slot_over_weight': authors_total / slots / weight,
    }


def _peak_cpu(step: Callable[[], None]) -> int:
    """Peak bytes allocated during ``step`` above those allocated before it (CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / 'trace.json'
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())['traceEvents']
    memory = [e['args'] for e in events if e.get('name') == '[memory]'
              and e['args'].get('Device Type', 0) == 0]
    if not memory:
        return 0
    start = memory[0]['Total Allocated'] - memory[0]['Bytes']
    return max(m['Total Allocated'] for m in memory) - start


def step_peaks(shape: tuple[int, int, int, int], device: torch.device,
               seed: int, fused: bool = False) -> dict[str, Any]:
    """Peak memory of a step of conv + BN / CBN (exact gradient, detached, sampled ``G``; with
    ``fused`` also the exact step compiled, ``fused=True``) / the authors' approach.

    ``step_peak_bytes``: allocated during the step above what was allocated before it;
    ``total_peak_bytes``: that plus what was live before it (the step's input and output
    gradient, the parameters and buffers, the CBN history).
    """
    n, c, h, w = shape
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device).requires_grad_()
    grad_out = torch.randn(shape, device=device)
    conv = _conv(c, device, seed)

    def paired(norm: nn.Module) -> nn.Module:
        model = nn.Sequential(copy.deepcopy(conv), norm)
        pair_cbn_layers(model)
        return model

    models = {
        'bn': nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(c).to(device)),
        'cbn_exact': paired(_cbn(c, device)),
        'cbn_detached': paired(_cbn(c, device, detach_compensation=True)),
        'cbn_sampled': paired(_cbn(c, device, grad_nu_stride=2)),
        'autograd_cbn': AutogradCBN(copy.deepcopy(conv), WINDOW).to(device),
    }
    if fused:
        models['cbn_fused'] = paired(_cbn(c, device, fused=True))
    base = tensor_bytes([x, grad_out])
    results: dict[str, Any] = {'shape': list(shape), 'input_bytes': base}
    for name, model in models.items():
        params = list(model.parameters())

        def step(model: nn.Module = model, params: list = params) -> None:
            model(x).backward(grad_out)
            x.grad = None
            _sgd(params)

        for _ in range(WINDOW):  # fill the history
            step()
        peak = cuda_step_peak(step, device) if device.type == 'cuda' else _peak_cpu(step)
        state = tensor_bytes([*model.parameters(), *model.buffers()])
        if isinstance(model, nn.Sequential) and isinstance(model[1], CrossIterationBatchNorm2d):
            state += records_bytes(model[1])
        elif isinstance(model, AutogradCBN):
            state += sum(tensor_bytes(record) for record in model.past)
        results[name] = {'step_peak_bytes': peak, 'state_bytes': state,
                         'total_peak_bytes': base + state + peak}
    for name in [name for name in models if name != 'bn']:
        for key in ('step_peak_bytes', 'total_peak_bytes'):
            results[name][f'{key} / bn'] = results[name][key] / results['bn'][key]
    return results


def print_report(results: dict[str, Any]) -> None:
    """State table, then one block of step peaks per shape."""
    print('\n== CBN state per layer (conv C->C 3x3) ==')
    print(f"{'C':>5}{'window':>7}{'weight MiB':>12}{'history MiB':>13}{'per slot/W':>12}"
          f"{'extra beyond W/slot':>21}{'running MiB':>13}{'authors MiB':>13}{'per slot/W':>12}")
    for s in results['state']:
        print(f"{s['channels']:>5}{s['window']:>7}{s['conv_weight_bytes'] / MiB:>12.3f}"
              f"{s['history_bytes'] / MiB:>13.3f}{s['history_per_slot_over_weight']:>12.3f}"
              f"{s['beyond_one_weight_per_slot_bytes']:>19d} B"
              f"{s['running_record_bytes'] / MiB:>13.3f}"
              f"{s['authors_approach_bytes'] / MiB:>13.3f}"
              f"{s['authors_per_slot_over_weight']:>12.3f}")
    for name, res in results['step_peak'].items():
        print(f"\n== step peak at {name} {tuple(res['shape'])} (input and output gradient "
              f"{res['input_bytes'] / MiB:.1f} MiB) ==")
        for variant in ('bn', *CBN_VARIANTS, 'cbn_fused'):
            v = res.get(variant)
            if v is None:
                continue
            extra = ''
            if variant != 'bn':
                extra = (f"  step peak x{v['step_peak_bytes / bn']:.3f}, total "
                         f"x{v['total_peak_bytes / bn']:.3f}")
            print(f"  {variant:<14}step peak {v['step_peak_bytes'] / MiB:>8.2f} MiB, state "
                  f"{v['state_bytes'] / MiB:>6.2f} MiB, total {v['total_peak_bytes'] / MiB:>8.2f}"
                  f' MiB{extra}')


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=None)
    parser.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['fpn', 'roi'])
    parser.add_argument('--windows', nargs='+', type=int, default=[2, 4, 8])
    parser.add_argument('--fused', action='store_true',
                        help='also the exact step compiled (fused=True)')
    parser.add_argument('--quick', action='store_true', help='smoke run on tiny shapes')
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = list(QUICK_SHAPES)
    device = setup_torch(args)
    channels = 32 if args.quick else 256
    results: dict[str, Any] = {
        **run_record(args, device),
        'state': [layer_state(channels, window, device) for window in args.windows],
        'step_peak': {name: step_peaks(SHAPES[name], device, args.seed, args.fused)
                      for name in args.shapes},
    }
    print_report(results)
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
