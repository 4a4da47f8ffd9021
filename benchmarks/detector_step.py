"""Training-step time of Faster R-CNN R50-FPN 4conv1fc with CBN against BN in the head.

The two models are built through mmdet's registry from the repository's configs (Table 4 of
the paper: fixed-BN backbone, the normalizer in the FPN neck and the 4conv1fc box head):
``configs/baselines/faster-rcnn_r50_fpn_4conv1fc-bn-head_1x_coco.py`` and
``configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py``, with the ImageNet
checkpoint of the backbone disabled. Variants, stepped interleaved on the same random batch:

- ``bn``: BN in neck and head;
- ``cbn_exact``: CBN as it comes (window 4, history full after warm-up steps): the exact
  gradient, through the compensated past statistics too;
- ``cbn_detached``: the same with the authors' gradient (``detach_compensation=True``);
- ``cbn_sampled``: ``cbn_exact`` with ``grad_nu_stride=2`` (``--grad-nu-stride``);
- ``cbn_burnin``: CBN with window 1 (the burn-in period);
- ``cbn_fused``: ``cbn_exact`` with ``fused=True`` (each layer's step compiled by inductor):
  its warm-up is timed apart and the JSON's ``fused_compile`` reports the compiled layer
  kinds, dynamo's graphs and the warm-up time; run twice with one ``TORCHINDUCTOR_CACHE_DIR``
  for a cold and a warm (cached) compilation.

``--all`` uses the configs with the normalizer everywhere, backbone included
(``...-bn-all_1x_coco.py`` / ``...-cbn-all_1x_coco.py``).

A step is mmengine's ``model.train_step`` (data preprocessor, forward, losses, backward, SGD),
as the training loop runs it (one backward per step: how the layers tell iterations apart
without ``CBNBurnInHook``). Targets: exact <= 1.15 x BN, sampled <= 1.05 x BN (detached: for
information). On CUDA it also reports each variant's peak memory of a step: the model's state
(parameters, gradients, buffers, SGD momentum, CBN history with the current iteration's
records) plus the most allocated during the step above it.

Where mmcv is installed without its compiled ops, RoIAlign and NMS run on torchvision's kernels
in every variant (:mod:`mmcv_ops_fallback`); the JSON's ``mmcv_ops`` says which ran.

Usage: ``python benchmarks/detector_step.py --threads 2 --size 256 --out detector.json``
(``--size 800x1088`` for the paper's COCO input size)
(``--quick`` for a small smoke run).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import mmcv_ops_fallback
import torch
from common import (add_common_arguments, cuda_step_peak, interleaved, ratio, run_record,
                    setup_torch, tensor_bytes, write_json)
from torch import nn

from mmdet_cbn import cbn_layers, pair_cbn_layers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    'bn': ROOT / 'configs/baselines/faster-rcnn_r50_fpn_4conv1fc-bn-head_1x_coco.py',
    'cbn': ROOT / 'configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py',
}
WINDOW = 4
CONFIGS_ALL = {
    'bn': ROOT / 'configs/baselines/faster-rcnn_r50_fpn_4conv1fc-bn-all_1x_coco.py',
    'cbn': ROOT / 'configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn-all_1x_coco.py',
}
CBN_VARIANTS = ('cbn_exact', 'cbn_detached', 'cbn_sampled', 'cbn_burnin', 'cbn_fused')
# name -> (numerator, denominator, upper bound of the ratio or None: for information)
TARGETS: dict[str, tuple[str, str, float | None]] = {
    'cbn_exact / bn': ('cbn_exact', 'bn', 1.15),
    'cbn_detached / bn': ('cbn_detached', 'bn', None),
    'cbn_sampled / bn': ('cbn_sampled', 'bn', 1.05),
    'cbn_burnin / bn': ('cbn_burnin', 'bn', 1.03),
    'cbn_fused / bn': ('cbn_fused', 'bn', 1.10),
}


def build_detector(config: Path, seed: int, device: torch.device,
                   rois_per_image: int | None = None) -> nn.Module:
    """Build the detector of ``config`` with PyTorch's default random init (no checkpoint)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    for name in cfg.get('custom_imports', {}).get('imports', []):
        __import__(name)
    cfg.model.backbone.init_cfg = None
    if rois_per_image is not None:
        cfg.model.train_cfg.rcnn.sampler.num = rois_per_image
        cfg.model.train_cfg.rpn.sampler.num = rois_per_image
    torch.manual_seed(seed)
    return MODELS.build(cfg.model).to(device).train()


def image_size(text: str) -> tuple[int, int]:
    """``'256'`` -> (256, 256); ``'800x1088'`` -> (800, 1088) (height x width)."""
    height, _, width = text.partition('x')
    return int(height), int(width or height)


def demo_batch(size: tuple[int, int], images: int, boxes: int, seed: int) -> dict[str, Any]:
    """A batch of random images with random boxes, as the data loader would hand it over."""
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(seed)
    return demo_mm_inputs(batch_size=images, image_shapes=(3, *size),
                          num_items=[boxes] * images, num_classes=80)


def build_variants(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One mmengine ``train_step`` callable per variant."""
    from mmengine.optim import OptimWrapper

    batch = demo_batch(args.size, args.images, args.boxes, args.seed)
    rois = args.rois_per_image
    configs = CONFIGS_ALL if args.all else CONFIGS
    models = {'bn': build_detector(configs['bn'], args.seed, device, rois)}
    for name, window, stride, detach, fused in (
            ('cbn_exact', WINDOW, 1, False, False), ('cbn_detached', WINDOW, 1, True, False),
            ('cbn_sampled', WINDOW, args.grad_nu_stride, False, False),
            ('cbn_burnin', 1, 1, False, False), ('cbn_fused', WINDOW, 1, False, True)):
        if name not in args.variants:
            continue
        model = build_detector(configs['cbn'], args.seed, device, rois)
        pair_cbn_layers(model)
        for _, layer in cbn_layers(model):
            layer.set_window(window)
            layer.grad_nu_stride = stride
            layer.detach_compensation = detach
            layer.fused = fused
        models[name] = model
    variants, optimizers = {}, {}
    for name, model in models.items():
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                             weight_decay=1e-4))

        def step(model: nn.Module = model, optim: OptimWrapper = optim) -> None:
            model.train_step(batch, optim)
        variants[name] = step
        optimizers[name] = optim.optimizer
    return {'variants': variants, 'models': models, 'optimizers': optimizers,
            'cbn_layers': max(len(cbn_layers(m)) for m in models.values()),
            'bn_layers': sum(isinstance(m, nn.BatchNorm2d) for m in models['bn'].modules())}


def time_fused_warmup(step, steps: int) -> dict[str, Any]:
    """The fused variant's first ``steps`` steps (the compilation happens there), timed."""
    import torch._dynamo.utils

    from mmdet_cbn import fused
    cache = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    cached = bool(cache and os.path.isdir(cache) and os.listdir(cache))
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {'warmup_steps': steps, 'warmup_s': time.perf_counter() - start,
            'layer_kinds_compiled': len(fused._compiled),
            'dynamo_graphs': torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs,
            'inductor_cache_dir': cache, 'inductor_cache_was_filled': cached,
            'fused_off_reason': fused._broken}


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: parameters, gradients, buffers, optimizer state and
    the CBN history: every call site's slots (``records``), the current iteration's included."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor)]
    for _, layer in cbn_layers(model):
        for history in layer.histories:
            if history is not None:
                tensors.append(history.records)
    return tensor_bytes(tensors)


def cuda_step_memory(built: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per variant: state bytes, the step's peak above them and the sum, and ratios to BN."""
    memory: dict[str, Any] = {}
    for name, step in built['variants'].items():
        peak = cuda_step_peak(step, device)
        state = state_bytes(built['models'][name], built['optimizers'][name])
        memory[name] = {'state_bytes': state, 'step_peak_bytes': peak,
                        'total_peak_bytes': state + peak}
    for name in memory:
        memory[name]['total_peak_bytes / bn'] = (memory[name]['total_peak_bytes']
                                                 / memory['bn']['total_peak_bytes'])
    return memory


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=5)
    parser.add_argument('--size', type=image_size, default=(256, 256),
                        help="image size: '256' (square) or HxW, e.g. '800x1088' (a COCO image "
                             "after mmdet's Resize to (1333, 800), as in the paper)")
    parser.add_argument('--images', type=int, default=2, help='images per batch')
    parser.add_argument('--boxes', type=int, default=3, help='ground-truth boxes per image')
    parser.add_argument('--rois-per-image', type=int, default=None,
                        help="RoIs sampled per image in the box head (default: the config's)")
    parser.add_argument('--grad-nu-stride', type=int, default=2,
                        help='grad_nu_stride of the cbn_sampled variant')
    parser.add_argument('--lr', type=float, default=0.002)
    parser.add_argument('--variants', nargs='+', choices=CBN_VARIANTS,
                        default=list(CBN_VARIANTS[:4]), help='CBN variants to time against BN')
    parser.add_argument('--all', action='store_true',
                        help='the normalizer everywhere, backbone included')
    parser.add_argument('--warmup', type=int, default=WINDOW,
                        help='untimed steps per variant first (>= window - 1 fills the history)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: one 64x64 image, 32 RoIs, 1 warm-up step, 1 repeat')
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.images, args.rois_per_image = (64, 64), 1, 32
        args.repeats, args.warmup = 1, 1
    device = setup_torch(args)
    mmcv_ops = mmcv_ops_fallback.install()
    built = build_variants(args, device)
    fused_compile = None
    if 'cbn_fused' in built['variants']:
        fused_compile = time_fused_warmup(built['variants']['cbn_fused'], args.warmup)
    timings = interleaved(built['variants'], args.repeats, device, warmup=args.warmup,
                          clock=args.clock, calls=args.calls)
    memory = cuda_step_memory(built, device) if device.type == 'cuda' else None
    ratios = {}
    for name, (num, den, bound) in TARGETS.items():
        if num not in timings:
            continue
        value = ratio(timings, num, den)
        ratios[name] = {'value': value} if bound is None else {
            'value': value, 'target_max': bound, 'met': value <= bound}
    # calls per iteration of the most-called CBN layer: 1 unless a layer runs several times per
    # step, or the iterations were not told apart (a layer no backward reaches)
    call_sites = {name: max(layer.num_call_sites for _, layer in cbn_layers(model))
                  for name, model in built['models'].items() if name != 'bn'}
    results = {**run_record(args, device),
               'configs': {k: str(v.relative_to(ROOT))
                           for k, v in (CONFIGS_ALL if args.all else CONFIGS).items()},
               'mmcv_ops': mmcv_ops, 'cbn_layers': built['cbn_layers'],
               'cbn_call_sites': call_sites, 'timings': timings, 'ratios': ratios,
               'memory': memory, 'fused_compile': fused_compile}
    print(f'Faster R-CNN R50-FPN 4conv1fc, {args.images} x {args.size[0]}x{args.size[1]} images, '
          f"{built['cbn_layers']} CBN layers (neck + box head), RoIAlign/NMS kernels: {mmcv_ops}")
    for name, t in timings.items():
        print(f"  {name:<14}{t['median_s']:>8.4f} s (min {t['min_s']:.4f} s)")
    for name, m in (memory or {}).items():
        print(f"  {name:<14}peak {m['total_peak_bytes'] / 2 ** 20:>8.1f} MiB (state "
              f"{m['state_bytes'] / 2 ** 20:.1f} + step {m['step_peak_bytes'] / 2 ** 20:.1f}), "
              f"x{m['total_peak_bytes / bn']:.3f} BN")
    for name, r in ratios.items():
        verdict = '' if 'target_max' not in r else (
            f"  (target <= {r['target_max']:.2f}: {'met' if r['met'] else 'NOT met'})")
        print(f"  {name:<20}{r['value']:>6.3f}{verdict}")
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
