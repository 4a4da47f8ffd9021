"""Accuracy against images per batch: the paper's Table 3 / Figure 1 in miniature.

A small ResNet (a 3x3 stem and three residual stages of 16, 32 and 64 channels, every conv
followed by its normalizer) classifies scikit-learn's handwritten digits (8x8, shipped with the
package) into 10 classes. The task is made harder than plain digits: a small training set and
every image, train and test alike, randomly shifted by up to one pixel, rescaled in contrast,
offset in brightness and covered in Gaussian noise (train corruptions are redrawn every epoch,
test ones are fixed). The last stage works on 2x2 maps, so at one image per batch BN sees four
values per channel there. ``--task pairs`` is a harder variant: two digits side by side (8x16
images, 2x4 maps in the last stage) labelled with the two-digit number, 100 classes, with
``4 x --train-size`` training pairs and 2,000 test pairs composed from the two digit splits.

Normalizers: ``bn`` (BatchNorm2d), ``gn`` (GroupNorm, 8 groups), ``naive_cbn`` (CBN without
compensation, the paper's ablation), ``cbn`` (CBN with the Taylor compensation, exact gradient)
and ``cbn_detached`` (the same with the authors' gradient, ``detach_compensation=True``); on
request (``--norms``) ``cbn_sampled`` (CBN with ``grad_nu_stride=2``). CBN layers
come from :func:`mmdet_cbn.convert_cbn` on the BN model. Each run trains for the same number of
epochs whatever the batch size, with the learning rate linear in the batch size (``lr`` for 16
images), as in the paper; the CBN window is ``ceil(16 / batch)`` (window x batch >= 16, so at
16 images CBN *is* BN; ``--window`` sets one for every batch size), after a burn-in of the
first ``--burnin`` fraction of the iterations at window 1. All normalizers of one seed start
from the same conv weights and see the same batches.

Prints a table of test accuracy (mean +- std over seeds) and writes ``small_batch.json`` and
``small_batch.png`` to ``--out-dir``. Usage::

    python benchmarks/small_batch.py            # the measured run (about 10-15 min, 2 cores)
    python benchmarks/small_batch.py --quick    # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import environment
from torch import Tensor, nn

from mmdet_cbn import convert_cbn

# CBN variants: the keyword arguments of convert_cbn besides window and burn-in.
CBN_OPTIONS = {'naive_cbn': dict(compensation='none'), 'cbn': {},
               'cbn_detached': dict(detach_compensation=True),
               'cbn_sampled': dict(grad_nu_stride=2)}
NORMS = ('bn', 'gn', *CBN_OPTIONS)
DEFAULT_NORMS = NORMS[:5]
LABELS = {'bn': 'BN', 'gn': 'GN', 'naive_cbn': 'Naive CBN', 'cbn': 'CBN',
          'cbn_detached': 'CBN, detached (authors)', 'cbn_sampled': 'CBN, grad_nu_stride=2'}
REFERENCE_BATCH = 16  # the CBN window is chosen so that window x batch >= this
GN_GROUPS = 8
TEST_CORRUPTION_SEED = 12345
TASKS = ('digits', 'pairs')
PAIRS_PER_TRAIN_DIGIT = 4
TEST_PAIRS = 2000
PAIRS_SEED = 1


@dataclass(frozen=True)
class Setting:
    """What every run of one benchmark shares."""

    task: str
    train_size: int
    epochs: int
    lr: float
    weight_decay: float
    burnin: float
    noise: float
    contrast: float
    brightness: float
    window: int | None = None  # the CBN window; None: ceil(16 / batch)


@dataclass(frozen=True)
class Job:
    """One training run."""

    norm: str
    batch: int
    seed: int
    setting: Setting


# ---------------------------------------------------------------------------------- data
@lru_cache(maxsize=4)
def _digits(train_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clean digits in [0, 1], split once (fixed permutation): ``train_size`` train, rest test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    if not 0 < train_size < len(labels):
        raise ValueError(f'--train-size must be in [1, {len(labels) - 1}], got {train_size}')
    train, test = order[:train_size], order[train_size:]
    return images[train], labels[train], images[test], labels[test]


@lru_cache(maxsize=4)
def _task_data(task: str, train_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Clean train and test images and labels of ``task``, and its number of classes.

    ``pairs``: random pairs of digits of the same split side by side, labelled ``10 a + b``.
    """
    train_x, train_y, test_x, test_y = _digits(train_size)
    if task == 'digits':
        return train_x, train_y, test_x, test_y, 10
    generator = torch.Generator().manual_seed(PAIRS_SEED)

    def pairs(images: Tensor, labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        left, right = torch.randint(len(labels), (2, n), generator=generator)
        return (torch.cat([images[left], images[right]], dim=3),
                10 * labels[left] + labels[right])

    return (*pairs(train_x, train_y, PAIRS_PER_TRAIN_DIGIT * train_size),
            *pairs(test_x, test_y, TEST_PAIRS), 100)


def corrupt(images: Tensor, setting: Setting, generator: torch.Generator) -> Tensor:
    """Shift by up to one pixel, rescale contrast, offset brightness, add Gaussian noise."""
    n, _, height, width = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None].expand(n, height, width)
    cols = (dx[:, None] + torch.arange(width))[:, None, :].expand(n, height, width)
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    scale = 1 + setting.contrast * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    offset = setting.brightness * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    noise = setting.noise * torch.randn(shifted.shape, generator=generator)
    return shifted * scale + offset + noise


@lru_cache(maxsize=4)
def _test_set(setting: Setting) -> tuple[Tensor, Tensor]:
    """The corrupted test set, the same for every run."""
    _, _, images, labels, _ = _task_data(setting.task, setting.train_size)
    generator = torch.Generator().manual_seed(TEST_CORRUPTION_SEED)
    return corrupt(images, setting, generator), labels


# ---------------------------------------------------------------------------------- model
def _norm(kind: str, channels: int) -> nn.Module:
    """The normalizer built into the model: GN, or BN (converted to CBN afterwards)."""
    if kind == 'gn':
        return nn.GroupNorm(GN_GROUPS, channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """ResNet basic block; each conv (and the projection shortcut) is followed by its norm."""

    def __init__(self, norm: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """8x8 input -> stem (16 ch, 8x8) -> stages 16 ch 8x8, 32 ch 4x4, 64 ch 2x2 -> linear
    (8x16 pairs: 2x4 maps in the last stage)."""

    def __init__(self, norm: str, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), _norm(norm, 16),
                                  nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(norm, 16, 16, 1), BasicBlock(norm, 16, 32, 2),
                                    BasicBlock(norm, 32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def build_model(norm: str, batch: int, iterations: int, burnin: float,
                num_classes: int = 10, window: int | None = None) -> nn.Module:
    """The classifier with ``norm``; CBN variants converted from BN with window ``window``
    (default ceil(16 / batch))."""
    model = SmallResNet('gn' if norm == 'gn' else 'bn', num_classes)
    if norm in CBN_OPTIONS:
        convert_cbn(model, window_size=window_for(batch, window),
                    burnin_iters=round(burnin * iterations), **CBN_OPTIONS[norm])
    return model


def window_for(batch: int, window: int | None = None) -> int:
    """The CBN window: ``window`` if given, else the smallest k with k x batch >= 16."""
    return window or math.ceil(REFERENCE_BATCH / batch)


# ---------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) with the running statistics (eval mode)."""
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum())
                  for x, y in zip(images.split(256), labels.split(256)))
    return 100.0 * correct / len(labels)


def run(job: Job) -> dict[str, Any]:
    """Train one model and return its test accuracy, loss curve and timing."""
    torch.set_num_threads(1)
    setting = job.setting
    train_x, train_y, _, _, num_classes = _task_data(setting.task, setting.train_size)
    test_x, test_y = _test_set(setting)
    train_size = len(train_y)
    steps_per_epoch = train_size // job.batch
    iterations = steps_per_epoch * setting.epochs
    torch.manual_seed(job.seed)
    model = build_model(job.norm, job.batch, iterations, setting.burnin, num_classes,
                        setting.window)
    lr = setting.lr * job.batch / REFERENCE_BATCH
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                weight_decay=setting.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    data_rng = torch.Generator().manual_seed(job.seed)
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(setting.epochs):
        model.train()
        images = corrupt(train_x, setting, data_rng)
        order = torch.randperm(train_size, generator=data_rng)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * job.batch:(step + 1) * job.batch]
            loss = F.cross_entropy(model(images[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item()
        losses.append(epoch_loss / steps_per_epoch)
    train_time = time.perf_counter() - start
    cpu_time = time.process_time() - cpu_start
    accuracy = evaluate(model, test_x, test_y)
    window = window_for(job.batch, setting.window) if 'cbn' in job.norm else 1
    return dict(norm=job.norm, batch=job.batch, seed=job.seed, window=window, lr=lr,
                iterations=iterations, test_accuracy=accuracy, final_train_loss=losses[-1],
                epoch_train_loss=losses, train_time_s=train_time, train_cpu_time_s=cpu_time,
                time_per_iter_ms=1e3 * train_time / iterations,
                cpu_time_per_iter_ms=1e3 * cpu_time / iterations)


# ---------------------------------------------------------------------------------- report
def summarize(results: list[dict[str, Any]], norms: list[str],
              batches: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample std (0 for one seed) of the test accuracy per norm and batch size."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for norm in norms:
        summary[norm] = {}
        for batch in batches:
            cells = [r for r in results if r['norm'] == norm and r['batch'] == batch]
            acc = [r['test_accuracy'] for r in cells]
            summary[norm][str(batch)] = dict(
                mean=statistics.fmean(acc), std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                runs=len(acc),
                time_per_iter_ms=statistics.median(r['time_per_iter_ms'] for r in cells),
                cpu_time_per_iter_ms=statistics.median(r['cpu_time_per_iter_ms'] for r in cells))
    return summary


def format_table(summary: dict[str, dict[str, dict[str, float]]], batches: list[int]) -> str:
    """Markdown table: rows normalizers, columns images per batch, cells mean +- std (%)."""
    header = '| norm | ' + ' | '.join(f'{b} img/batch' for b in batches) + ' |'
    lines = [header, '|---' * (len(batches) + 1) + '|']
    for norm, row in summary.items():
        cells = [f"{row[str(b)]['mean']:.1f} ± {row[str(b)]['std']:.1f}" for b in batches]
        lines.append(f'| {LABELS[norm]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(summary: dict[str, dict[str, dict[str, float]]], batches: list[int], task: str,
         path: Path) -> None:
    """Accuracy against images per batch (log2 axis), error bars one std: Figure 1 style."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(batches)
    for norm, row in summary.items():
        ax.errorbar(xs, [row[str(b)]['mean'] for b in xs], yerr=[row[str(b)]['std'] for b in xs],
                    marker='o', capsize=3, label=LABELS[norm])
    ax.set_xscale('log', base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.invert_xaxis()
    ax.set_xlabel('images per batch')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'Corrupted {task}, small ResNet: accuracy vs batch size')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` replaces the defaults by a smoke-test size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--norms', nargs='+', choices=NORMS, default=list(DEFAULT_NORMS),
                        help=f"default: {' '.join(DEFAULT_NORMS)}")
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[16, 8, 4, 2, 1])
    parser.add_argument('--seeds', type=int, default=3, help='seeds 0..N-1 per cell')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--task', choices=TASKS, default='digits',
                        help='digits (10 classes) or pairs of digits side by side (100 classes)')
    parser.add_argument('--train-size', type=int, default=320,
                        help='training digits (the rest of the 1797 digits are the test set)')
    parser.add_argument('--lr', type=float, default=0.1, help='SGD lr for 16 images per batch')
    parser.add_argument('--weight-decay', type=float, default=5e-4)
    parser.add_argument('--window', type=int, default=None,
                        help='CBN window for every batch size (default: ceil(16 / batch))')
    parser.add_argument('--burnin', type=float, default=0.25,
                        help='fraction of the iterations with CBN window 1')
    parser.add_argument('--noise', type=float, default=0.2, help='std of the pixel noise')
    parser.add_argument('--contrast', type=float, default=0.3,
                        help='contrast factor drawn in 1 +- this')
    parser.add_argument('--brightness', type=float, default=0.3,
                        help='brightness offset drawn in +- this')
    parser.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                        help='runs in parallel (one torch thread each)')
    parser.add_argument('--out-dir', type=Path, default=Path('work_dirs/small_batch'))
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 1 seed, batches 16 and 2, 2 epochs of 64 images')
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.batch_sizes = 1, 2, 64, [16, 2]
    return args


class _Serial:
    """``Pool``'s ``imap_unordered`` in this process (for ``--jobs 1``)."""

    def __enter__(self) -> '_Serial':
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (norm, batch size, seed), print the table, write JSON and PNG."""
    args = parse_args(argv)
    setting = Setting(args.task, args.train_size, args.epochs, args.lr, args.weight_decay,
                      args.burnin, args.noise, args.contrast, args.brightness, args.window)
    train_images = len(_task_data(args.task, args.train_size)[1])
    jobs = [Job(norm, batch, seed, setting) for seed in range(args.seeds)
            for batch in args.batch_sizes for norm in args.norms]
    # Longest first (small batches, CBN): better packing over the worker processes.
    jobs.sort(key=lambda j: (-train_images // j.batch, j.norm != 'cbn'))
    print(f'{len(jobs)} runs ({len(args.norms)} norms x {len(args.batch_sizes)} batch sizes x '
          f'{args.seeds} seeds), {args.epochs} epochs of {train_images} {args.task} images, '
          f'{args.jobs} parallel', flush=True)
    env = environment(torch.device('cpu'))  # at the start: the sources that are measured
    start = time.perf_counter()
    results = []
    context = multiprocessing.get_context('fork')
    with context.Pool(args.jobs) if args.jobs > 1 else _Serial() as pool:
        for result in pool.imap_unordered(run, jobs):
            results.append(result)
            print(f"[{len(results):3d}/{len(jobs)}] {LABELS[result['norm']]:>9} "
                  f"batch {result['batch']:2d} seed {result['seed']}: "
                  f"{result['test_accuracy']:5.1f}% ({result['train_time_s']:.1f}s, "
                  f"{result['time_per_iter_ms']:.1f} ms/iter)", flush=True)
    wall = time.perf_counter() - start
    results.sort(key=lambda r: (args.norms.index(r['norm']), -r['batch'], r['seed']))
    summary = summarize(results, args.norms, args.batch_sizes)
    table = format_table(summary, args.batch_sizes)
    window = args.window or 'ceil(16 / batch)'
    print(f'\nTest accuracy (%), mean ± std over {args.seeds} seed(s); CBN window = {window}; '
          f'{wall:.0f}s wall\n{table}')

    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(setting=asdict(setting), batch_sizes=args.batch_sizes, norms=args.norms,
                   seeds=args.seeds, windows={str(b): window_for(b, args.window)
                                              for b in args.batch_sizes},
                   summary=summary, table=table, runs=results, wall_time_s=wall,
                   environment=dict(env, jobs=args.jobs, worker_torch_threads=1,
                                    loadavg_at_end=list(os.getloadavg())))
    (args.out_dir / 'small_batch.json').write_text(json.dumps(payload, indent=2) + '\n')
    plot(summary, args.batch_sizes, args.task, args.out_dir / 'small_batch.png')
    print(f'wrote {args.out_dir / "small_batch.json"} and {args.out_dir / "small_batch.png"}')
    return payload


if __name__ == '__main__':
    main()
