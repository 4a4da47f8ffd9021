"""BN, CBN and GN at 2 images per batch on a small real semantic segmentation task, on a CPU.

1. Writes the digits segmentation set (:func:`digits_seg.make_digits_seg`, data seed 0: 64x64
   canvases, the scanned digits' ink pixels as classes 1-10, background 0) under
   ``<work-dir>/data``.
2. Trains mmseg's PSPNet with a half-width ResNet-18-D8 from scratch
   (``configs/mmseg/pspnet_r18-d8-{bn,cbn,gn}_1xb2-2.5k_digits-64x64.py``: PSP head and FCN
   auxiliary head on ResNet-18's first 3 stages at quarter width, output stride 8; built
   through mmseg's registry by mmengine's ``Runner``) for 2,500 iterations at 2 images per
   batch, once per normalizer and seed: BN, CBN (window 8, burn-in a quarter of the iterations
   through ``CBNBurnInHook``) and GN (8 groups), everywhere in the model.
3. Scores each final model on the val split with mmseg's ``IoUMetric`` (mIoU over the 11
   classes), prints a table (mean and std over seeds, per-seed values, the difference to BN
   paired by seed), and writes ``<work-dir>/seg_results.{json,png}`` (mIoU per seed, training
   loss curves).

The runs go two at a time, one torch thread each (``--jobs``), in worker processes.

Usage::

    python experiments/seg_demo.py --seeds 0 1 2    # the study, about 10 minutes on 2 cores
    python experiments/seg_demo.py --quick          # smoke run, under a minute
    # extra CBN norm_cfg keys, e.g. to compare gradients:
    python experiments/seg_demo.py --cbn-option detach_compensation=True
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs/mmseg'
ARMS = ('bn', 'cbn', 'gn')
LABELS = {'bn': 'BN', 'cbn': 'CBN', 'gn': 'GN'}
# Iterations left out of the time per iteration (start-up, allocator warm-up).
WARMUP_ITERS = 5
# Points kept of each training loss curve (means over equal blocks of iterations).
CURVE_POINTS = 50


def config_path(arm: str) -> Path:
    """The config of one normalizer."""
    return CONFIG_DIR / f'pspnet_r18-d8-{arm}_1xb2-2.5k_digits-64x64.py'


def parse_cbn_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a Python literal value (``window_size=4``, ``compensation='none'``)."""
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line. ``--quick`` shrinks data and schedule to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='training seeds (data: always seed 0); default 0 1 2, 0 with --quick')
    parser.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS),
                        help='normalizers to train (default: all)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 16 train / 8 val images, 6 iterations, burn-in 2')
    parser.add_argument('--iters', type=int, default=None,
                        help="training iterations (default 2500, the configs'; 6 with --quick)")
    parser.add_argument('--burnin', type=int, default=None,
                        help='CBN burn-in iterations (default: a quarter of --iters)')
    parser.add_argument('--num-train', type=int, default=None, help='training images (400)')
    parser.add_argument('--num-val', type=int, default=None, help='validation images (100)')
    parser.add_argument('--cbn-option', type=parse_cbn_option, action='append', default=[],
                        metavar='KEY=VALUE', help="extra key of the CBN arm's norm_cfg")
    parser.add_argument('--jobs', type=int, default=2,
                        help='runs at once, one torch thread each (1: one after the other with '
                             "torch's default threads)")
    parser.add_argument('--work-dir', type=Path, default=None,
                        help='outputs (default work_dirs/seg_demo, work_dirs/seg_demo_quick)')
    args = parser.parse_args(argv)
    defaults = dict(seeds=[0], num_train=16, num_val=8, iters=6) if args.quick else dict(
        seeds=[0, 1, 2], num_train=400, num_val=100, iters=2500)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.burnin is None:
        args.burnin = 2 if args.quick else args.iters // 4
    if args.work_dir is None:
        args.work_dir = REPO / ('work_dirs/seg_demo_quick' if args.quick else 'work_dirs/seg_demo')
    args.cbn_option = dict(args.cbn_option)
    return args


def build_cfg(arm: str, seed: int, data_root: Path, work_dir: Path, iters: int, burnin: int,
              cbn_option: dict[str, Any], quick: bool):
    """The config of one run: ``arm``'s config pointed at the data, seeded, schedule set."""
    from mmengine.config import Config

    cfg = Config.fromfile(config_path(arm))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(data_root)
    cfg.train_cfg.max_iters = iters
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # scored once, at the end
    cfg.train_cfg.val_interval = iters + 1
    cfg.param_scheduler[0].end = iters
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 2 if quick else 50
    if arm == 'cbn':
        for head in ('backbone', 'decode_head', 'auxiliary_head'):
            cfg.model[head].norm_cfg.update(cbn_option)
        cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=burnin)]
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = str(work_dir)
    # Unique names: several Runners share a worker process (mmengine keeps global instances).
    cfg.experiment_name = f'{arm}_seed{seed}_{os.getpid()}_{time.time_ns()}'
    cfg.visualizer.name = cfg.experiment_name
    return cfg


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(arm: str, seed: int, data_root: str, work_dir: str, iters: int, burnin: int,
            cbn_option: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Train and score one run in this process; return its results."""
    from mmengine.runner import Runner

    start = time.perf_counter()
    cfg = build_cfg(arm, seed, Path(data_root), Path(work_dir), iters, burnin, cbn_option,
                    quick)
    runner = Runner.from_cfg(cfg)
    runner.train()
    train_wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in runner.test().items()}
    hub = runner.message_hub
    losses = [float(v) for v in hub.get_scalar('train/loss').data[0]]
    times = [float(v) for v in hub.get_scalar('train/time').data[0]]
    block = max(1, math.ceil(len(losses) / CURVE_POINTS))
    curve = [(min(i + block, len(losses)), statistics.fmean(losses[i:i + block]))
             for i in range(0, len(losses), block)]
    model = runner.model
    cbn = []
    if arm == 'cbn':
        from mmdet_cbn import cbn_layers

        cbn = cbn_layers(model)
    return dict(
        arm=arm, seed=seed, mIoU=metrics['mIoU'], aAcc=metrics['aAcc'], mAcc=metrics['mAcc'],
        iterations=len(losses), final_loss=statistics.fmean(losses[-block:]),
        time_per_iter_s=statistics.fmean(times[WARMUP_ITERS:] or times),
        train_wall_s=train_wall, wall_s=time.perf_counter() - start, loss_curve=curve,
        cbn_layers=len(cbn), cbn_paired=sum(layer.paired_conv is not None for _, layer in cbn),
        norm_cfg=dict(cfg.model.backbone.norm_cfg))


def run_all(args: argparse.Namespace, data_root: Path) -> list[dict[str, Any]]:
    """Every (normalizer, seed) run, ``args.jobs`` at a time."""
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]

    def kwargs(arm: str, seed: int) -> dict[str, Any]:
        return dict(arm=arm, seed=seed, data_root=str(data_root),
                    work_dir=str(args.work_dir / f'{arm}_seed{seed}'), iters=args.iters,
                    burnin=args.burnin, cbn_option=args.cbn_option, quick=args.quick)

    if args.jobs == 1:
        return [run_one(**kwargs(arm, seed)) for arm, seed in tasks]
    context = multiprocessing.get_context('spawn')
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(run_one, **kwargs(arm, seed)) for arm, seed in tasks]
        results = []
        for (arm, seed), future in zip(tasks, futures):
            results.append(future.result())
            print(f"[seg_demo] {LABELS[arm]} seed {seed}: mIoU {results[-1]['mIoU']:.2f}",
                  flush=True)
        return results


def summarize(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, Any]]:
    """Per normalizer: mIoU mean/std/per seed, difference to BN paired by seed, timings."""
    by_arm = {arm: sorted((r for r in runs if r['arm'] == arm), key=lambda r: r['seed'])
              for arm in arms}
    bn = {r['seed']: r['mIoU'] for r in by_arm.get('bn', [])}
    summary = {}
    for arm, rs in by_arm.items():
        values = [r['mIoU'] for r in rs]
        diffs = [r['mIoU'] - bn[r['seed']] for r in rs if r['seed'] in bn] if arm != 'bn' else []
        summary[arm] = dict(
            label=LABELS[arm],
            seeds=[r['seed'] for r in rs],
            mIoU=values,
            mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0,
            aAcc_mean=statistics.fmean(r['aAcc'] for r in rs),
            minus_bn_mean=statistics.fmean(diffs) if diffs else None,
            minus_bn_se=(statistics.stdev(diffs) / math.sqrt(len(diffs))
                         if len(diffs) > 1 else None),
            time_per_iter_s=statistics.fmean(r['time_per_iter_s'] for r in rs),
            wall_s=sum(r['wall_s'] for r in rs))
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`summarize`."""
    lines = ['| norm | mIoU mean ± std | per seed | minus BN, paired: mean ± s.e. | aAcc | '
             's/iter | train+test wall (all seeds) |',
             '|---|---|---|---|---|---|---|']
    for s in summary.values():
        seeds = ', '.join(f'{v:.1f}' for v in s['mIoU'])
        diff = ''
        if s['minus_bn_mean'] is not None:
            diff = f"{s['minus_bn_mean']:+.1f}"
            if s['minus_bn_se'] is not None:
                diff += f" ± {s['minus_bn_se']:.1f}"
        lines.append(f"| {s['label']} | {s['mean']:.1f} ± {s['std']:.1f} | {seeds} | {diff} | "
                     f"{s['aAcc_mean']:.1f} | {s['time_per_iter_s']:.3f} | "
                     f"{s['wall_s']:.0f} s |")
    return '\n'.join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], path: Path,
         title: str) -> None:
    """mIoU per normalizer (one point per seed, bar at the mean) and training loss curves."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_miou, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(summary, plt.rcParams['axes.prop_cycle'].by_key()['color']))
    for x, (arm, s) in enumerate(summary.items()):
        ax_miou.bar(x, s['mean'], color=colours[arm], alpha=0.4)
        ax_miou.errorbar(x, s['mean'], yerr=s['std'], color='black', capsize=4)
        ax_miou.scatter([x] * len(s['mIoU']), s['mIoU'], color=colours[arm], zorder=3)
    ax_miou.set_xticks(range(len(summary)), [s['label'] for s in summary.values()])
    ax_miou.set_ylabel('val mIoU (%), IoUMetric')
    ax_miou.set_title('Final mIoU: mean ± std, one dot per seed')
    for run in runs:
        its, losses = zip(*run['loss_curve'])
        ax_loss.plot(its, losses, color=colours[run['arm']], alpha=0.7,
                     label=summary[run['arm']]['label'] if run['seed'] == min(
                         summary[run['arm']]['seeds']) else None)
    ax_loss.set_yscale('log')
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss (decode + 0.4 aux)')
    ax_loss.set_title('Training loss, one line per seed')
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate data, train and score every run, report."""
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from digits_seg import make_digits_seg

    start = time.perf_counter()
    load_before = list(os.getloadavg())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_root = (args.work_dir / 'data').resolve()
    data = make_digits_seg(data_root, num_train=args.num_train, num_val=args.num_val, seed=0)
    print(f"[seg_demo] data: {args.num_train} train images ({data['num_train_instances']} "
          f"digits), {args.num_val} val images ({data['num_val_instances']} digits), 64x64, "
          f'in {data_root}', flush=True)
    runs = run_all(args, data_root)
    summary = summarize(runs, args.arms)
    total = time.perf_counter() - start
    table = format_table(summary)
    setting = (f'PSPNet R18-D8 (3 stages, quarter width, from scratch), {args.iters} '
               f'iterations at 2 images per batch, {args.num_train} train / {args.num_val} '
               'val images, seeds '
               f"{' '.join(map(str, args.seeds))}; CBN window 8, burn-in {args.burnin}"
               + (f', {args.cbn_option}' if args.cbn_option else ''))
    print(f'\n[seg_demo] {setting} (total {total / 60:.1f} min)\n{table}')
    payload = dict(
        quick=args.quick, setting=setting, seeds=args.seeds, iters=args.iters,
        burnin=args.burnin, cbn_option=args.cbn_option, jobs=args.jobs,
        data={k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()},
        configs={arm: str(config_path(arm).relative_to(REPO)) for arm in args.arms},
        summary=summary, runs=runs, table=table, total_wall_time_s=total,
        git_commit=git_commit(), loadavg_1_5_15_before=load_before,
        loadavg_1_5_15_after=list(os.getloadavg()), cpu_count=os.cpu_count())
    json_path = args.work_dir / 'seg_results.json'
    json_path.write_text(json.dumps(payload, indent=2) + '\n')
    png_path = args.work_dir / 'seg_results.png'
    plot(runs, summary, png_path, setting)
    print(f'[seg_demo] wrote {json_path} and {png_path}')
    return payload


if __name__ == '__main__':
    main()
