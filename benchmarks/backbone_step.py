"""A backbone whose every norm is CBN: the paper's Table 3 regime, eager and compiled.

mmdet's ResNet (``--depth`` 18 or 50, from scratch) with every norm layer BN or CBN (window 4,
full windows: ``--warmup`` steps first), global average pooling and a linear head over 10
classes; or (``--model pspnet``) the digits PSPNet of ``experiments/seg_demo.py``, built from
its BN and CBN configs (window 8, every norm: backbone, PSP and FCN heads), its two heads'
logits under one cross-entropy. 2 images per step (``--batch``), SGD; one thread by default.
Per input size (``--sizes``) the time of a training step (forward, loss, backward, SGD) of:

- ``bn``: BatchNorm2d; ``floor``: BN plus the one weight-gradient convolution per norm layer
  that a windowed CBN step cannot do without (of each conv's output, in its forward);
- ``cbn``: CBN as a user gets it (exact gradient; the default step: eager on the CPU);
  with ``--fused`` ``cbn_fused``: CBN with ``fused=True`` (each layer's step compiled by
  inductor);
- with ``--compiled``: ``bn_compiled``, ``floor_compiled`` and ``cbn_compiled``, the whole
  training step's model compiled by ``torch.compile`` (inductor) each way (the floor's
  weight gradients are kept as graph outputs); their compile counts and times
  (``compile``), and, for the CBN model, dynamo's graph breaks (``torch._dynamo.explain``)
  and the recompilations over ``--vary-steps`` steps with other batch and image sizes, after
  the first three of them (the first new sizes make the shapes dynamic: one recompilation).

Ratios are of medians of interleaved repetitions in one run (:mod:`common`), beside the minor
page faults per step (memory the allocator handed back to the system and maps again: variants
in one process share the allocator's state, ``--variants`` runs some of them alone). Usage::

    python benchmarks/backbone_step.py --depth 18 --sizes 224 64 --fused --compiled \
        --clock cpu --out r18.json
    python benchmarks/backbone_step.py --variants cbn --sizes 64 --clock cpu   # CBN alone
    python benchmarks/backbone_step.py --model pspnet --fused --compiled --clock cpu
    python benchmarks/backbone_step.py --quick          # smoke run (tiny ResNet-18, 32 px)
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.utils
from common import add_common_arguments, interleaved, ratio, run_record, setup_torch, write_json
from layer_speed import weight_grad_conv
from torch import nn

import mmdet_cbn  # noqa: F401  (registers 'CBN')
from mmdet_cbn import cbn_layers, pair_cbn_layers

WINDOW = 4
PSPNET_WINDOW = 8  # its CBN config's
LR = 0.01
PSPNET_CONFIG = str(Path(__file__).resolve().parents[1]
                    / 'configs/mmseg/pspnet_r18-d8-{norm}_1xb2-2.5k_digits-64x64.py')
VARIANTS = ('bn', 'floor', 'cbn', 'cbn_fused', 'bn_compiled', 'floor_compiled', 'cbn_compiled')


class Classifier(nn.Module):
    """An mmdet ResNet, global average pooling and a linear layer."""

    def __init__(self, depth: int, norm_cfg: dict) -> None:
        from mmdet.registry import MODELS
        super().__init__()
        self.backbone = MODELS.build(dict(type='ResNet', depth=depth, out_indices=(3,),
                                          frozen_stages=-1, norm_eval=False, init_cfg=None,
                                          norm_cfg=norm_cfg))
        self.head = nn.Linear(512 if depth < 50 else 2048, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


class Segmenter(nn.Module):
    """An mmseg encoder-decoder's network without its data preprocessor: the decode head's
    and the auxiliary head's logits, stacked along the batch (one cross-entropy for both)."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.segmentor.extract_feat(x)
        return torch.cat([self.segmentor.decode_head(features),
                          self.segmentor.auxiliary_head(features)])


def _floor_hook(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    with torch.no_grad():
        weight_grad = weight_grad_conv(conv, inputs[0], output)
    if torch.compiler.is_compiling():  # kept as an output of the graph, not eliminated
        conv.floor_weight_grad = weight_grad


def _resnet(depth: int, cbn: bool, fused: bool) -> nn.Module:
    norm_cfg = dict(type='CBN', window_size=WINDOW, fused=fused) if cbn else dict(type='BN')
    return Classifier(depth, norm_cfg)


def _pspnet(cbn: bool, fused: bool) -> nn.Module:
    """The digits PSPNet of ``experiments/seg_demo.py`` from its BN or CBN config (CBN:
    window 8), from scratch."""
    import mmseg.models  # noqa: F401  (registers mmseg's models)
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    cfg = Config.fromfile(PSPNET_CONFIG.format(norm='cbn' if cbn else 'bn'))
    cfg.model.backbone.init_cfg = None
    if cbn:
        for part in ('backbone', 'decode_head', 'auxiliary_head'):
            cfg.model[part].norm_cfg.fused = fused
    with DefaultScope.overwrite_default_scope('mmseg'):
        return Segmenter(MODELS.build(cfg.model))


def build(variant: str, model: str, depth: int, seed: int,
          floor_convs: Iterable[str] = ()) -> nn.Module:
    """The network of ``variant``, all variants from the same initial weights; the floor's
    weight-gradient convs are those of ``floor_convs`` (the convs a CBN layer follows)."""
    cbn, fused = variant.startswith('cbn'), variant == 'cbn_fused'
    torch.manual_seed(seed)
    net = (_pspnet(cbn, fused) if model == 'pspnet' else _resnet(depth, cbn, fused)).train()
    if cbn:
        pair_cbn_layers(net)
    if variant == 'floor':
        convs = dict(net.named_modules())
        for name in floor_convs:
            convs[name].register_forward_hook(_floor_hook)
    return net


def make_step(model: nn.Module, batch: int, size: int, seed: int,
              run: Callable | None = None) -> Callable[[], None]:
    """One SGD step on fixed random images and labels, one label per output position
    (``run``: the compiled model)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator)
    labels: list[torch.Tensor] = []
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    forward = model if run is None else run

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = forward(x)
        if not labels:
            labels.append(torch.randint(10, out.shape[:1] + out.shape[2:], generator=generator))
        nn.functional.cross_entropy(out, labels[0]).backward()
        optimizer.step()
    return step


def compile_report(model: nn.Module, run: Callable, args: argparse.Namespace, size: int
                   ) -> dict[str, Any]:
    """Graph breaks of the CBN training forward, and recompilations over steps whose batch
    and image size change, after the warm-up."""
    explanation = torch._dynamo.explain(model)(torch.randn(args.batch, 3, size, size))
    sizes = [(args.batch + i % 2, size + 32 * (i % 3)) for i in range(args.vary_steps)]
    counts = []
    for batch, side in sizes:
        make_step(model, batch, side, args.seed, run)()
        counts.append(torch._dynamo.utils.counters['stats']['unique_graphs'])
    return {'graph_breaks': explanation.graph_break_count, 'graphs': explanation.graph_count,
            'break_reasons': [str(b.reason)[:200] for b in explanation.break_reasons],
            'vary_sizes': sizes, 'unique_graphs_after_each': counts,
            'recompiles_after_3_sizes': counts[-1] - counts[2]}


def run_size(args: argparse.Namespace, device: torch.device, size: int) -> dict[str, Any]:
    names = ['bn', 'floor', 'cbn'] + (['cbn_fused'] if args.fused else [])
    if args.compiled:
        names += ['bn_compiled', 'floor_compiled', 'cbn_compiled']
    if args.variants:
        names = [n for n in names if n in args.variants]
    reference = build('cbn', args.model, args.depth, args.seed)  # its layers and pairs
    paired_convs = list(pair_cbn_layers(reference).values())
    steps, compiles, floor_convs = {}, {}, None
    for name in names:
        model = build(name.removesuffix('_compiled'), args.model, args.depth, args.seed,
                      paired_convs)
        if name.startswith('floor'):
            floor_convs = sum(_floor_hook in m._forward_hooks.values() for m in model.modules())
        run = None
        if name.endswith('_compiled'):
            torch._dynamo.reset()
            run = torch.compile(model)
        step = make_step(model, args.batch, size, args.seed, run)
        start = time.perf_counter()
        graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
        for _ in range(args.warmup):  # full windows; the compile happens here
            step()
        if run is not None or name == 'cbn_fused':
            compiles[name] = {
                'warmup_s': time.perf_counter() - start,
                'unique_graphs': torch._dynamo.utils.counters['stats']['unique_graphs']
                - graphs}
        if name == 'cbn_compiled' and args.vary_steps:
            compiles[name].update(compile_report(model, run, args, size))
            step = make_step(model, args.batch, size, args.seed, run)
        steps[name] = step
    timings = interleaved(steps, args.repeats, device, warmup=1, clock=args.clock)
    result = {'size': size, 'ms': {n: 1e3 * t['median_s'] for n, t in timings.items()},
              'min_ms': {n: 1e3 * t['min_s'] for n, t in timings.items()},
              'page_faults_per_step': {n: t['page_faults'] for n, t in timings.items()},
              'ratio_to_bn': _ratios(timings, 'bn'), 'ratio_to_floor': _ratios(timings, 'floor'),
              'compile': compiles, 'floor_convs': floor_convs,
              'cbn_layers': len(cbn_layers(reference))}
    for name, base in (('cbn', 'bn'), ('cbn', 'floor'), ('floor', 'bn')):
        if {f'{name}_compiled', f'{base}_compiled'} <= set(names):
            result[f'{name}_compiled_over_{base}_compiled'] = ratio(
                timings, f'{name}_compiled', f'{base}_compiled')
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=5)
    parser.add_argument('--model', default='resnet', choices=('resnet', 'pspnet'),
                        help="mmdet's ResNet classifier, or the digits PSPNet (its configs)")
    parser.add_argument('--depth', type=int, default=18, choices=(18, 34, 50),
                        help="the ResNet's")
    parser.add_argument('--sizes', type=int, nargs='+', default=None,
                        help='input sizes (default: 224 64; the PSPNet: 64)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=None,
                        help='steps before timing (default: two windows)')
    parser.add_argument('--fused', action='store_true',
                        help="also CBN with the fused step (each layer's step compiled)")
    parser.add_argument('--compiled', action='store_true',
                        help='also the whole model compiled (inductor), BN and CBN')
    parser.add_argument('--vary-steps', type=int, default=20,
                        help='steps with other sizes after the warm-up, counting recompiles')
    parser.add_argument('--variants', nargs='+', default=None, choices=VARIANTS,
                        help='only these variants (e.g. one per process, so that none shares '
                             "the memory allocator's state with another)")
    parser.add_argument('--quick', action='store_true', help='smoke run')
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1
    if args.sizes is None:
        args.sizes = [64] if args.model == 'pspnet' else [224, 64]
    if args.warmup is None:
        args.warmup = 2 * (PSPNET_WINDOW if args.model == 'pspnet' else WINDOW)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.vary_steps = [32], 2, WINDOW, 4
    device = setup_torch(args)
    results = {**run_record(args, device), 'sizes': [run_size(args, device, s)
                                                     for s in args.sizes]}
    print_table(results)
    write_json(args.out, results)
    return results


def print_table(results: dict[str, Any]) -> None:
    env = results['environment']
    model = 'digits PSPNet' if results['args']['model'] == 'pspnet' else \
        f"ResNet-{results['args']['depth']}"
    print(f"\n{model}, {results['args']['batch']} images, "
          f"{env['torch_threads']} thread(s), clock {results['args']['clock']}; ms per SGD "
          'step (median), ratio to BN / to the floor, minor page faults per step')
    for entry in results['sizes']:
        cells = ', '.join(f"{n} {entry['ms'][n]:.0f} ({_ratio(entry, 'ratio_to_bn', n)} / "
                          f"{_ratio(entry, 'ratio_to_floor', n)}, "
                          f"{entry['page_faults_per_step'][n]} faults)" for n in entry['ms'])
        print(f"{entry['size']} px: {cells}")
        for name, report in entry['compile'].items():
            print(f'  {name}: {report}')


def _ratios(timings: dict[str, dict[str, Any]], base: str) -> dict[str, float]:
    """Each timed variant's ratio to ``base``; none if ``base`` was not run (``--variants``)."""
    return {n: ratio(timings, n, base) for n in timings} if base in timings else {}


def _ratio(entry: dict[str, Any], key: str, name: str) -> str:
    value = entry[key].get(name)
    return '-' if value is None else f'{value:.2f}x'


if __name__ == '__main__':
    main()
