"""Head BN against head CBN on a small real-image detection task, end to end on a CPU.

1. Writes the handwritten-digits COCO dataset (:func:`digits_coco.make_digits_coco`,
   deterministic: seed 0) under ``<work-dir>/data``.
2. Trains the demo Mask R-CNN (``configs/demo/``: half-width ResNet-18 from scratch with GN,
   FPN, 4conv1fc box head, 4-conv mask head, 128 px images, 2 images per batch) three times
   with the same seed and schedule: BN in the neck and RoI heads; CBN there (window 8, so
   window x batch = 16, after a burn-in at window 1 driven by ``CBNBurnInHook``) with the
   default, exact gradient; and the same CBN with the authors' detached gradient
   (``detach_compensation=True``). Each training runs
   ``tools/train.py`` in a subprocess, so mmengine's progress output shows as usual.
3. Reads each run's scalars (loss, time per iteration, ``CocoMetric`` bbox/segm mAP on the
   val split after the epochs that are validated), prints a table, and writes
   ``<work-dir>/demo_results.json`` and ``<work-dir>/demo_results.png`` (loss and mAP curves).

Usage::

    python experiments/demo.py            # about 15 minutes on a quiet 2-core CPU
    python experiments/demo.py --quick    # 1-2 minute smoke run (outputs in work_dirs/demo_quick)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from digits_coco import make_digits_coco
from provenance import git_commit
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    'bn': REPO / 'configs/demo/mask-rcnn_r18_fpn_4conv1fc-bn-head_digits.py',
    'cbn': REPO / 'configs/demo/mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py',
    'cbn_detached': REPO / 'configs/demo/mask-rcnn_r18_fpn_4conv1fc-cbn-head-detached_digits.py',
}
LABELS = {'bn': 'head BN', 'cbn': 'head CBN', 'cbn_detached': 'head CBN, detached (authors)'}
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP', 'segm_mAP_50', 'segm_mAP_75')
# Iterations left out of the time per iteration (start-up, allocator warm-up).
WARMUP_ITERS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line. ``--quick`` shrinks data and schedule to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 16 train / 8 val images, 1 epoch, CBN window from '
                             'iteration 3')
    parser.add_argument('--work-dir', type=Path, default=None,
                        help='outputs (default: work_dirs/demo, work_dirs/demo_quick with '
                             '--quick)')
    parser.add_argument('--num-train', type=int, default=None, help='training images')
    parser.add_argument('--num-val', type=int, default=None, help='validation images')
    parser.add_argument('--epochs', type=int, default=None,
                        help="training epochs (default: the configs')")
    parser.add_argument('--seed', type=int, default=0, help='training seed (data: always 0)')
    parser.add_argument('--sequential', action='store_true',
                        help='train the variants one after the other with default torch '
                             'threads (default: all at once, one thread each)')
    args = parser.parse_args(argv)
    defaults = dict(num_train=16, num_val=8, epochs=1) if args.quick else dict(
        num_train=400, num_val=100, epochs=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.work_dir is None:
        args.work_dir = REPO / ('work_dirs/demo_quick' if args.quick else 'work_dirs/demo')
    return args


def make_data(root: Path, num_train: int, num_val: int) -> dict[str, Any]:
    """Write the digits dataset (seed 0, 128 px) and return its summary."""
    info = make_digits_coco(root, num_train=num_train, num_val=num_val, image_size=128, seed=0)
    print(f"[demo] data: {num_train} train images ({info['num_train_instances']} digits), "
          f"{num_val} val images ({info['num_val_instances']} digits) in {root}", flush=True)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}


def write_config(variant: str, args: argparse.Namespace, data_root: Path,
                 work_dir: Path) -> Path:
    """The demo config of ``variant`` pointed at ``data_root``; returns the dumped file."""
    from mmengine.config import Config

    cfg = Config.fromfile(CONFIGS[variant])
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(data_root)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = str(data_root / 'annotations/val.json')
    cfg.randomness = dict(seed=args.seed)
    if args.epochs is not None:
        cfg.train_cfg.max_epochs = args.epochs
        cfg.train_cfg.val_interval = min(cfg.train_cfg.val_interval, args.epochs)
        for scheduler in cfg.param_scheduler:
            if scheduler.type == 'MultiStepLR':
                scheduler.end = args.epochs
                scheduler.milestones = [m for m in scheduler.milestones if m < args.epochs]
        cfg.default_hooks.checkpoint.interval = args.epochs
    if args.quick:
        cfg.default_hooks.logger.interval = 2
        for scheduler in cfg.param_scheduler:
            if scheduler.type == 'LinearLR':
                scheduler.end = 4
        if variant.startswith('cbn'):
            cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=2)]
        # Keep every detection, so that CocoMetric has results to score after 8 iterations.
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / 'config.py'
    cfg.dump(path)
    return path


TRAIN_LINE = re.compile(r'Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\].*?eta: (\S+)')
VAL_MAP = re.compile(r'coco/(bbox|segm)_mAP: ([\d.]+)')
VAL_LINE = re.compile(r'Epoch\(val\)\s*\[(\d+)\]')
EMPTY_RESULTS = 'The testing results of the whole dataset is empty'


class Progress:
    """One progress bar per run, fed with the lines of its mmengine log."""

    def __init__(self, variant: str, epochs: int, position: int) -> None:
        self.epochs = epochs
        self.status = ''
        self.maps: dict[str, str] = {}
        self.nothing_detected = False
        self.bar = tqdm(total=None, desc=f'{LABELS[variant]:<30}', position=position,
                        unit='it', leave=True, dynamic_ncols=True)

    def feed(self, line: str) -> None:
        train = TRAIN_LINE.search(line)
        if train:
            epoch, it, per_epoch, eta = train.groups()
            self.bar.total = self.epochs * int(per_epoch)
            self.bar.n = (int(epoch) - 1) * int(per_epoch) + int(it)
            self.status = f'epoch {epoch}/{self.epochs}, eta {eta}'
        self.nothing_detected = self.nothing_detected or EMPTY_RESULTS in line
        if VAL_LINE.search(line):  # the metrics of an evaluation without detections are stale
            found = dict(VAL_MAP.findall(line))
            self.maps = {kind: '0.0' if self.nothing_detected else f'{100 * float(value):.1f}'
                         for kind, value in found.items()}
            self.nothing_detected = False
        if train or VAL_LINE.search(line):
            self.bar.set_postfix_str(self.status + ''.join(f', {k} mAP {v}'
                                                           for k, v in self.maps.items()))

    def close(self) -> None:
        if self.bar.total:
            self.bar.n = self.bar.total
        self.bar.refresh()
        self.bar.close()


def train_all(runs: dict[str, tuple[Path, Path]], sequential: bool,
              epochs: int) -> dict[str, float]:
    """Run ``tools/train.py`` for every ``variant: (config, work_dir)``; return wall times (s).

    Each run's full log goes to ``<work_dir>/train.log``; the terminal shows one progress bar
    per run (epoch, iteration, ETA, last mAP). By default the runs go in parallel, one
    process per variant with one torch thread each (two cores are used without thread
    synchronisation, which is slow when other processes share the CPU); ``sequential`` runs
    them one after the other with torch's default threads.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if not sequential:
        env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    walls: dict[str, float] = {}
    start = time.perf_counter()

    def run(variant: str, position: int) -> None:
        config, work_dir = runs[variant]
        log = work_dir / 'train.log'
        progress = Progress(variant, epochs, position)
        began = time.perf_counter()
        with open(log, 'w') as out:
            proc = subprocess.Popen([sys.executable, str(REPO / 'tools/train.py'), str(config),
                                     '--work-dir', str(work_dir)], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            for line in proc.stdout:
                out.write(line)
                progress.feed(line)
            proc.wait()
        progress.close()
        walls[variant] = time.perf_counter() - (began if sequential else start)
        if proc.returncode:
            tail = ''.join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f'training {LABELS[variant]} failed (exit code '
                               f'{proc.returncode}); the end of {log}:\n{tail}')

    print(f'[demo] training {len(runs)} runs; full logs in ' +
          ', '.join(str(w / 'train.log') for _, w in runs.values()), flush=True)
    if sequential:
        for position, variant in enumerate(runs):
            run(variant, position)
        return walls
    errors: list[BaseException] = []

    def guarded(variant: str, position: int) -> None:
        try:
            run(variant, position)
        except BaseException as error:  # reported after every run has ended
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(v, i)) for i, v in enumerate(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return walls


def read_scalars(work_dir: Path) -> list[dict[str, Any]]:
    """The records of the newest run's ``vis_data/scalars.json`` (one JSON object per line)."""
    runs = sorted(p for p in work_dir.glob('*/vis_data/scalars.json'))
    if not runs:
        raise FileNotFoundError(f'no vis_data/scalars.json under {work_dir}')
    return [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]


def epochs_without_detections(log: Path) -> set[int]:
    """Val epochs in which ``CocoMetric`` found no detection to score. mmengine then logs the
    previous evaluation's metrics again, as if they were this epoch's: they count as 0."""
    empty, pending = set(), False
    for line in log.read_text().splitlines():
        pending = pending or EMPTY_RESULTS in line
        val = VAL_LINE.search(line)
        if val and pending:
            empty.add(int(val.group(1)))
            pending = False
    return empty


def collect(variant: str, work_dir: Path, wall: float) -> dict[str, Any]:
    """Loss curve, time per iteration and per-epoch mAP of one run."""
    records = read_scalars(work_dir)
    train_recs = [r for r in records if 'loss' in r]
    empty = epochs_without_detections(work_dir / 'train.log')
    val_recs = [r if r['step'] not in empty else
                dict(step=r['step'], **{f'coco/{m}': 0.0 for m in METRICS})
                for r in records if 'coco/bbox_mAP' in r]
    times = [r['time'] for r in train_recs if r['iter'] > WARMUP_ITERS] or \
        [r['time'] for r in train_recs]
    last_epoch = train_recs[-1]['epoch']
    final = next((r for r in val_recs if r['step'] == last_epoch), None)
    if final is None or last_epoch in empty:
        print(f'[demo] {LABELS[variant]}: no detection on the val set after the last epoch; '
              'counting its mAP as 0', flush=True)
        final = {f'coco/{m}': 0.0 for m in METRICS}
    return dict(
        label=LABELS[variant],
        final={m: final[f'coco/{m}'] for m in METRICS},
        time_per_iter_s=sum(times) / len(times),
        iterations=train_recs[-1]['iter'],
        epochs=train_recs[-1]['epoch'],
        wall_time_s=wall,
        loss_curve=[(r['iter'], r['loss']) for r in train_recs],
        # First logged iteration with a CBN window above 1 (None for BN).
        cbn_window_on_iter=next((r['iter'] for r in train_recs if r.get('cbn_window', 1) > 1),
                                None),
        val_curve=[dict(epoch=r['step'], **{m: r[f'coco/{m}'] for m in METRICS})
                   for r in val_recs],
    )


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: final mAPs (in %, COCO style) and time per iteration."""
    lines = ['| head norm | bbox mAP | bbox AP50 | bbox AP75 | segm mAP | segm AP50 | '
             'segm AP75 | s/iter | train+eval wall |',
             '|---|---|---|---|---|---|---|---|---|']
    for res in results.values():
        cells = [f"{100 * res['final'][m]:.1f}" for m in METRICS]
        lines.append(f"| {res['label']} | " + ' | '.join(cells)
                     + f" | {res['time_per_iter_s']:.2f} | {res['wall_time_s'] / 60:.1f} min |")
    return '\n'.join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss (per logged iteration) and val mAP (per validated epoch) of every run."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, res in results.items():
        its, losses = zip(*res['loss_curve'])
        line, = ax_loss.plot(its, losses, label=res['label'], alpha=0.85)
        if res['cbn_window_on_iter'] is not None:
            ax_loss.axvline(res['cbn_window_on_iter'], color=line.get_color(), linestyle=':',
                            label='CBN burn-in over (logged)')
        epochs = [v['epoch'] for v in res['val_curve']]
        line, = ax_map.plot(epochs, [100 * v['bbox_mAP'] for v in res['val_curve']],
                            marker='o', label=f"{res['label']} bbox")
        ax_map.plot(epochs, [100 * v['segm_mAP'] for v in res['val_curve']], marker='s',
                    linestyle='--', color=line.get_color(), label=f"{res['label']} segm")
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss (logged average)')
    ax_loss.set_title('Training loss')
    ax_map.set_xlabel('epoch')
    ax_map.set_ylabel('mAP (%)')
    ax_map.set_title('Val mAP (CocoMetric)')
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate data, train and evaluate every variant, report."""
    args = parse_args(argv)
    os.chdir(REPO)
    start = time.perf_counter()
    load_before = list(os.getloadavg())
    sources = git_commit()
    data_root = args.work_dir / 'data'
    data = make_data(data_root, args.num_train, args.num_val)
    results = {}
    runs = {}
    for variant in CONFIGS:
        run_dir = args.work_dir / variant
        runs[variant] = (write_config(variant, args, data_root.resolve(), run_dir), run_dir)
    from mmengine.config import Config
    epochs = Config.fromfile(next(iter(runs.values()))[0]).train_cfg.max_epochs
    walls = train_all(runs, args.sequential, epochs)
    for variant, (_, run_dir) in runs.items():
        results[variant] = collect(variant, run_dir, walls[variant])
    total = time.perf_counter() - start
    table = format_table(results)
    print(f'\n[demo] Mask R-CNN R18/2-FPN 4conv1fc on {args.num_val} val digit images, '
          f'{results["bn"]["epochs"]} epochs at 2 images per batch, seed {args.seed} '
          f'(total {total / 60:.1f} min)\n{table}')
    payload = dict(quick=args.quick, seed=args.seed, data=data, configs={
        k: str(v.relative_to(REPO)) for k, v in CONFIGS.items()}, results=results, table=table,
        total_wall_time_s=total, git_commit=sources,
        loadavg_1_5_15_before=load_before,
        loadavg_1_5_15_after=list(os.getloadavg()), cpu_count=os.cpu_count())
    json_path = args.work_dir / 'demo_results.json'
    json_path.write_text(json.dumps(payload, indent=2) + '\n')
    png_path = args.work_dir / 'demo_results.png'
    plot(results, png_path)
    print(f'[demo] wrote {json_path} and {png_path}')
    return payload


if __name__ == '__main__':
    main()
