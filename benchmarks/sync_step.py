"""Iteration time and communication of SyncCBN: 2 gloo processes on the CPU, the digits detector.

The model is the digits detector of ``make demo`` (``configs/demo/``: Mask R-CNN, half-width
ResNet-18 with GN, FPN, 4conv1fc box head, 4-conv mask head, 64-channel neck and heads, 128 px
digits images), wrapped in ``MMDistributedDataParallel`` as ``tools/dist_train.sh`` wraps it,
each process with its own images of the digits dataset (written to a temporary folder). One
step is mmengine's ``train_step`` (data preprocessor, forward, losses, backward with DDP's
gradient all-reduce, SGD); before it every CBN layer is told a new iteration starts, as
``CBNBurnInHook`` does. The normalizer of the neck and the RoI heads:

- ``bn``: BN, each process its own statistics (reference);
- ``cbn``: CBN, window ``--window``, each process its own window;
- ``synccbn``: SyncCBN, window ``--window``: moments and records pooled across the processes;
- ``syncbn``: SyncCBN with window 1, which is SyncBN mathematically (the batch moments pooled
  across processes, no history, no record), standing in for ``torch.nn.SyncBatchNorm``, which
  has no CPU kernels (``aten::batch_norm_stats`` is CUDA-only; SyncBatchNorm refuses CPU
  inputs): the JSON's ``syncbn_on_cpu`` records the error;
- ``cbn_w1``: CBN with window 1, per process: the stand-in's computation without its
  communication (``syncbn / cbn_w1``: what synchronizing the moments costs; ``synccbn / cbn``:
  what synchronizing moments and records costs).

Timing: all variants stepped interleaved (rotated order), ``--warmup`` untimed steps each
first (the window fills); each timed step starts after a barrier, and a step's time is the
slowest process's wall time. Medians, quartiles, min and max of ``--repeats`` steps.

Communication: ``torch.distributed``'s collectives are wrapped while the timed steps run. A call
made inside a SyncCBN layer's forward is that layer's (moments, record); one made during the
backward by an autograd node is the layers' backward (per-channel sums), attributed to the
layer whose node issued it where the node is known; DDP's gradient all-reduce is counted apart,
by a communication hook on the buckets. Bytes are the payload each process contributes (the
tensor it passes), and the estimated bytes each process sends with gloo's ring algorithms
(all-reduce ``2 (R - 1) / R`` x payload, all-gather ``(R - 1)`` x payload).

Usage: ``python benchmarks/sync_step.py --out sync_step.json`` (``--quick``: a smoke run).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import add_common_arguments, run_record, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))
CONFIG = ROOT / 'configs/demo/mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py'
VARIANTS = ('bn', 'cbn', 'synccbn', 'syncbn', 'cbn_w1')
LABELS = {'bn': 'BN (per process)', 'cbn': 'CBN (per process)', 'synccbn': 'SyncCBN',
          'syncbn': 'SyncBN (SyncCBN window 1)', 'cbn_w1': 'CBN window 1 (per process)'}
RATIOS = (('synccbn', 'cbn'), ('syncbn', 'cbn_w1'), ('synccbn', 'syncbn'), ('syncbn', 'bn'),
          ('cbn', 'bn'), ('cbn_w1', 'bn'))
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor', 'reduce_scatter_tensor',
               'broadcast', 'reduce')


def norm_cfg(variant: str, window: int) -> dict[str, Any]:
    if variant == 'bn':
        return dict(type='BN', requires_grad=True)
    kind = 'SyncCBN' if variant.startswith('sync') else 'CBN'
    window = 1 if variant in ('syncbn', 'cbn_w1') else window
    return dict(type=kind, requires_grad=True, window_size=window)


def syncbn_on_cpu() -> dict[str, str]:
    """What ``torch.nn.SyncBatchNorm`` (in training mode, in the process group) and its
    statistics kernel do with a CPU batch."""
    def error(fn) -> str:
        try:
            fn()
        except (NotImplementedError, RuntimeError, ValueError) as err:
            return f'{type(err).__name__}: {str(err).split(". ")[0]}'
        return 'ran'
    x = torch.randn(2, 3, 4, 4)
    return {'torch.nn.SyncBatchNorm': error(lambda: torch.nn.SyncBatchNorm(3).train()(x)),
            'aten::batch_norm_stats': error(lambda: torch.batch_norm_stats(x, 1e-5))}


class CommCounter:
    """Counts the collectives of ``torch.distributed`` (wrapped module functions) and of DDP's
    gradient buckets (a communication hook), per phase and SyncCBN layer, while enabled."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.enabled = False
        self.step = 0  # the timed step of the variant, 0-based
        self.calls: list[dict[str, Any]] = []
        self.layers: list[str] = []  # the SyncCBN forwards running (a stack)
        self.nodes: dict[int, str] = {}  # id of a layer output's autograd node -> layer

    def install(self) -> None:
        for op in COLLECTIVES:
            if hasattr(dist, op):
                setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op: str, fn):
        def collective(*args, **kwargs):
            if self.enabled:
                tensor = args[1] if op in ('all_gather', 'all_gather_into_tensor',
                                           'reduce_scatter_tensor') else args[0]
                self._add(op, tensor)
            return fn(*args, **kwargs)
        collective.__wrapped__ = fn
        return collective

    def _add(self, op: str, tensor: torch.Tensor, phase: str | None = None) -> None:
        layer = None
        if phase is None:
            node = torch._C._current_autograd_node()
            if self.layers:
                phase, layer = 'forward', self.layers[-1]
            elif node is not None:
                phase, layer = 'backward', self.nodes.get(id(node))
            else:
                phase = 'other'
        payload = tensor.numel() * tensor.element_size()
        factor = 2 * (self.world - 1) / self.world if op in ('all_reduce', 'ddp') else (
            self.world - 1 if op.startswith('all_gather') else 1)
        self.calls.append(dict(op=op, phase=phase, layer=layer, numel=tensor.numel(),
                               payload_bytes=payload, sent_bytes=payload * factor,
                               step=self.step))

    def watch(self, model: torch.nn.Module, layer_type: type) -> None:
        """Attribute the collectives of every ``layer_type`` module of ``model``."""
        for name, module in model.named_modules():
            if isinstance(module, layer_type):
                module.register_forward_pre_hook(lambda m, a, name=name: self.layers.append(name))
                module.register_forward_hook(self._left(name))

    def _left(self, name: str):
        def hook(module, args, output) -> None:
            self.layers.pop()
            if self.enabled and output.grad_fn is not None:
                self.nodes[id(output.grad_fn)] = name
        return hook

    def ddp_hook(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            enabled, self.enabled = self.enabled, False  # its all_reduce is counted here
            try:
                if enabled:
                    self._add('ddp', bucket.buffer(), phase='ddp')
                return allreduce_hook(state, bucket)
            finally:
                self.enabled = enabled
        return hook

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, []
        self.nodes.clear()
        return calls


def digits_batch(cfg, data_root: Path, images: int, rank: int) -> dict[str, Any]:
    """This rank's ``images`` training images of the digits dataset, collated."""
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.update(data_root=str(data_root), ann_file='annotations/train.json',
                       data_prefix=dict(img='images/train/'))
    dataset = DATASETS.build(dataset_cfg)
    return pseudo_collate([dataset[rank * images + i] for i in range(images)])


def build_variant(variant: str, args: argparse.Namespace, counter: CommCounter):
    """The DDP-wrapped detector with ``variant``'s normalizer, its SGD and its layers."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import OptimWrapper

    from mmdet_cbn import SyncCrossIterationBatchNorm2d, cbn_layers, pair_cbn_layers

    cfg = Config.fromfile(str(CONFIG))
    norm = norm_cfg(variant, args.window)
    for head in (cfg.model.neck, cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head):
        head.norm_cfg = norm
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model).train()
    pair_cbn_layers(model)
    counter.watch(model, SyncCrossIterationBatchNorm2d)
    layers = [layer for _, layer in cbn_layers(model)]
    wrapped = MMDistributedDataParallel(module=model, device_ids=None, broadcast_buffers=False,
                                        find_unused_parameters=False)
    wrapped.register_comm_hook(None, counter.ddp_hook())
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                         weight_decay=1e-4))
    return cfg, wrapped, optim, layers


def layer_shapes(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per SyncCBN layer: channels and the paired conv's weight shape and groups."""
    from mmdet_cbn import SyncCrossIterationBatchNorm2d

    shapes = {}
    for name, layer in model.named_modules():
        if isinstance(layer, SyncCrossIterationBatchNorm2d):
            conv = layer.paired_conv
            shapes[name] = dict(channels=layer.num_features,
                                conv_weight=list(conv.weight.shape), groups=conv.groups)
    return shapes


def expected_floats(shape: dict[str, Any], world: int, window: int) -> dict[str, int]:
    """What SyncCBN must communicate per call, in floats: the moments gathered (sum, sum of
    squares per channel and the count, per rank), the record (mean, variance intercept, valid
    flag, ``Xbar`` g x D, ``d var / d W`` C x D, D = C_in / g x kh x kw) and the backward's
    per-channel sums (2 C)."""
    c, g = shape['channels'], shape['groups']
    depth = shape['conv_weight'][1] * shape['conv_weight'][2] * shape['conv_weight'][3]
    record = 2 * c + 1 + (g + c) * depth if window > 1 else 0
    return {'moments_per_rank': 2 * c + 1, 'moments_gathered': (2 * c + 1) * world,
            'record': record, 'backward_sums': 2 * c}


def summarize_calls(calls: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Bytes per iteration by phase (and per SyncCBN layer), the calls of one iteration."""
    per_phase: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_layer: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    for call in calls:
        phase = per_phase[call['phase']]
        phase['calls'] += 1 / steps
        phase['payload_bytes'] += call['payload_bytes'] / steps
        phase['sent_bytes'] += call['sent_bytes'] / steps
        if call['layer'] is not None:
            layer = per_layer[call['layer']]
            layer[f"{call['phase']}_payload_bytes"] += call['payload_bytes'] / steps
            layer[f"{call['phase']}_sent_bytes"] += call['sent_bytes'] / steps
            if call['step'] == 0:  # the collectives of one iteration: [op, floats]
                layer.setdefault(f"{call['phase']}_calls", []).append([call['op'],
                                                                        call['numel']])
    sync = [c for c in calls if c['phase'] in ('forward', 'backward')]
    by_op: dict[str, float] = defaultdict(float)
    for call in sync:
        by_op[f"{call['phase']} {call['op']}"] += call['payload_bytes'] / steps
    return {'per_phase': {k: dict(v) for k, v in per_phase.items()},
            'synccbn_payload_bytes_by_op': dict(by_op),
            'synccbn_payload_bytes': sum(c['payload_bytes'] for c in sync) / steps,
            'synccbn_sent_bytes': sum(c['sent_bytes'] for c in sync) / steps,
            'per_layer': {k: dict(v) for k, v in sorted(per_layer.items())},
            'backward_numels': sorted({c['numel'] for c in calls if c['phase'] == 'backward'})}


def timed_steps(steps: dict[str, Any], counter: CommCounter, args: argparse.Namespace
                ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
    """Warm-up, then ``repeats`` interleaved timed steps per variant; this rank's times and the
    collectives of the timed steps."""
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(args.repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            counter.step = rep
            counter.enabled = True
            start = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - start)
            counter.enabled = False
            calls[name] += counter.take()
    return samples, calls


def run_images(images: int, args: argparse.Namespace, data_root: Path, rank: int, world: int,
               counter: CommCounter) -> dict[str, Any]:
    """All variants at ``images`` images per process."""
    from mmdet_cbn import cbn_layers

    steps, shapes, cbn_counts, models = {}, {}, {}, {}
    batch = None
    for variant in args.variants:
        cfg, model, optim, layers = build_variant(variant, args, counter)
        if batch is None:
            batch = digits_batch(cfg, data_root, images, rank)

        def step(model=model, optim=optim, layers=layers) -> None:
            for layer in layers:
                layer.new_iteration()
            model.train_step(batch, optim)
        steps[variant] = step
        models[variant] = model
        cbn_counts[variant] = len(layers)
        shapes[variant] = layer_shapes(model.module)
    samples, calls = timed_steps(steps, counter, args)
    gathered = [None] * world
    dist.all_gather_object(gathered, samples)
    timings = {}
    for name in samples:
        slowest = [max(rank_samples[name][i] for rank_samples in gathered)
                   for i in range(args.repeats)]
        quartiles = statistics.quantiles(slowest, n=4) if len(slowest) > 1 else slowest * 3
        timings[name] = {'median_s': statistics.median(slowest), 'q1_s': quartiles[0],
                         'q3_s': quartiles[2], 'min_s': min(slowest), 'max_s': max(slowest),
                         'samples_s': slowest,
                         'rank_medians_s': [statistics.median(r[name]) for r in gathered]}
    ratios = {f'{a} / {b}': timings[a]['median_s'] / timings[b]['median_s']
              for a, b in RATIOS if a in timings and b in timings}
    communication = {name: summarize_calls(calls[name], args.repeats) for name in calls}
    for name, comm in communication.items():
        for layer, shape in shapes[name].items():
            entry = comm['per_layer'].setdefault(layer, {})
            entry.update(shape, expected_floats=expected_floats(
                shape, world, 1 if name == 'syncbn' else args.window))
    windows = {name: sorted({layer.window for _, layer in cbn_layers(m.module)})
               for name, m in models.items()}
    return {'images_per_process': images, 'timings': timings, 'ratios': ratios,
            'communication': communication, 'norm_layers': cbn_counts,
            'windows_after_warmup': windows}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, data_root: Path,
           result_path: Path) -> None:
    import mmcv_ops_fallback
    import mmdet_cbn  # noqa: F401  (registers CBN and SyncCBN)
    from mmengine.registry import init_default_scope

    torch.set_num_threads(args.threads)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world)
    try:
        record = run_record(args, torch.device('cpu'))  # the load average before the runs
        mmcv_ops = mmcv_ops_fallback.install()
        init_default_scope('mmdet')
        counter = CommCounter(world)
        counter.install()
        runs = [run_images(images, args, data_root, rank, world, counter)
                for images in args.images]
        if rank == 0:
            results = {**record, 'world_size': world, 'backend': 'gloo',
                       'config': str(CONFIG.relative_to(ROOT)),
                       'seeds': {'model_init': args.seed, 'digits_dataset': args.seed},
                       'images': 'rank r: training images r n .. r n + n - 1 of the digits '
                                 'dataset (n images per process), the same every step',
                       'variants': {name: LABELS[name] for name in args.variants},
                       'syncbn_on_cpu': syncbn_on_cpu(), 'mmcv_ops': mmcv_ops, 'runs': runs}
            torch.save(results, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def print_table(results: dict[str, Any]) -> None:
    env = results['environment']
    print(f"\nDigits detector (Mask R-CNN, 64-channel neck and heads), {results['world_size']} "
          f"gloo processes x {env['torch_threads']} thread(s), window "
          f"{results['args']['window']}; s per iteration (slowest process): median [q1, q3] "
          '(min-max); SyncCBN bytes per iteration (payload / sent per process); DDP gradients')
    for run in results['runs']:
        print(f"{run['images_per_process']} image(s) per process, {results['args']['repeats']} "
              'timed steps each:')
        for name, t in run['timings'].items():
            comm = run['communication'][name]
            ddp = comm['per_phase'].get('ddp', {}).get('payload_bytes', 0)
            print(f"  {LABELS[name]:<27}{t['median_s']:7.3f} [{t['q1_s']:.3f}, {t['q3_s']:.3f}]"
                  f" ({t['min_s']:.3f}-{t['max_s']:.3f})  "
                  f"{comm['synccbn_payload_bytes'] / 1024:8.1f} / "
                  f"{comm['synccbn_sent_bytes'] / 1024:8.1f} KiB  "
                  f"DDP {ddp / 2 ** 20:.2f} MiB")
        print('  ' + ', '.join(f'{k} {v:.3f}' for k, v in run['ratios'].items()))
    # bytes do not depend on the images: the first run's, layers of one shape together
    sync = results['runs'][0]['communication'].get('synccbn', {}).get('per_layer', {})
    shapes: dict[tuple, list[str]] = defaultdict(list)
    for layer, entry in sync.items():
        shapes[(tuple(entry['conv_weight']), entry.get('forward_payload_bytes', 0),
                entry.get('backward_payload_bytes', 0))].append(layer)
    if shapes:
        print('SyncCBN payload per layer and iteration (conv weight: forward, backward):')
    for (weight, forward, backward), layers in shapes.items():
        print(f'  {list(weight)} x {len(layers)} layers: {forward / 1024:.1f} KiB, '
              f'{backward / 1024:.2f} KiB')


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_arguments(parser, repeats=15, clock=False)
    parser.add_argument('--world-size', type=int, default=2)
    parser.add_argument('--images', type=int, nargs='+', default=[1, 2],
                        help='images per process (one run each)')
    parser.add_argument('--window', type=int, default=4, help='window of CBN and SyncCBN')
    parser.add_argument('--warmup', type=int, default=4,
                        help='untimed steps per variant first (>= window fills the history)')
    parser.add_argument('--lr', type=float, default=0.002)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 1 image per process, 2 warm-up and 2 timed steps')
    args = parser.parse_args(argv)
    if args.device != 'cpu':
        raise SystemExit('sync_step.py measures gloo on the CPU only (--device cpu)')
    if args.threads is None:
        args.threads = 1
    if args.quick:
        args.images, args.warmup, args.repeats = [1], 2, 2
    from digits_coco import make_digits_coco

    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / 'digits'
        make_digits_coco(data_root, num_train=args.world_size * max(args.images), num_val=1,
                         image_size=128, seed=args.seed)
        result_path = Path(tmp) / 'results.pt'
        os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
        mp.spawn(worker, args=(args.world_size, free_port(), args, data_root, result_path),
                 nprocs=args.world_size, join=True)
        results = torch.load(result_path, weights_only=False)
    print_table(results)
    write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
