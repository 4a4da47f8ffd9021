"""Why the eval-mode CBN demo model collapses mid-training: measurements (issue 23).

``train`` trains one demo arm (``bn``, ``cbn``, ``cbn_detached``) in this process, with
checkpoints every 2 epochs. For CBN arms every CBN layer is an experiment-only subclass that
leaves the training forward untouched and keeps, beside the layer's own running statistics
(rule "window": an EMA of the window's statistics), an EMA of the current batch's statistics
(rule "batch", as BN does) in extra buffers. With ``--probe-every P`` it also measures, every
P-th iteration after burn-in, per layer: each past slot's compensated statistics against the
same past input pushed through the current conv weights (exact), the fraction of compensated
variances below 0 (clamped), the drift per iteration, and the running statistics against the
exact window; and, at every windowed iteration, the clamped fraction (``probe.jsonl``).

The probe hooks into the layer as it was up to commit ``0111ace`` (its ``_commit`` method; the
measurements of ``docs/eval_statistics.md`` were made with it): since the per-step state moved
into tensors (``functional.training_step``) ``train`` of a CBN arm stops with that message;
check that commit out to rerun it. ``evaluate`` and the BN arm run on the current layer.

``evaluate`` scores each checkpoint with the running statistics of each rule swapped in, and
with statistics re-estimated at the checkpoint's weights (:mod:`mmdet_cbn.precise_stats`),
and records how far each rule's running statistics are from the re-estimated ones
(``eval.json``).

Usage::

    python experiments/eval_statistics.py train --arm cbn --seed 0 --probe-every 20
    python experiments/eval_statistics.py evaluate work_dirs/eval_stats/cbn_lr0.02_w8_s0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))

from demo import CONFIGS, make_data  # noqa: E402
from provenance import git_commit  # noqa: E402

from mmdet_cbn import CrossIterationBatchNorm2d  # noqa: E402
from mmdet_cbn.functional import compensate, nonfinite, update_running_stats  # noqa: E402
from mmdet_cbn.precise_stats import (load_population_statistics,  # noqa: E402
                                     population_statistics)

ROOT = REPO / 'work_dirs/eval_stats'


class _Probe:
    """What the probe hook tells the layers, and what they measured."""

    iteration = 0
    lr = 0.0
    measure = False  # this iteration is a probe iteration
    keep_inputs = False  # keep each slot's conv input (for the exact recomputation)
    records: list[dict] = []
    clamped: dict[str, list[float]] = {}  # layer: [clamped slots, slots] since the last dump


PROBE = _Probe()


def _median(t: Tensor) -> float:
    return float(t.median())


class ProbedCBN(CrossIterationBatchNorm2d):
    """CBN with extra bookkeeping only (the training forward is the parent's)."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.register_buffer('batch_running_mean', torch.zeros(num_features))
        self.register_buffer('batch_running_var', torch.ones(num_features))
        self._inputs: dict[int, dict[int, tuple]] = {}

    @torch.no_grad()
    def _commit(self, y, conv_io, history, mean, var, window, count) -> None:
        bad = nonfinite(window)
        running = (self.running_mean.clone(), self.running_var.clone())
        if history is not None and history.filled and self.compensation == 'taylor':
            self._measure(y, conv_io, history, mean, var, window, running)
        super()._commit(y, conv_io, history, mean, var, window, count)
        batch = torch.stack([mean, var]).masked_fill_(bad, 0)
        update_running_stats(self.batch_running_mean, self.batch_running_var, batch,
                             examples=count, factor=self.momentum, keep=bad.logical_not())
        if history is not None and PROBE.keep_inputs and self.compensation == 'taylor':
            site = 0 if self._calls.iteration_ended else self._calls.index
            self._inputs.setdefault(site, {})[history.free] = (
                conv_io[0].detach().clone(), mean.clone(), var.clone(), PROBE.iteration)

    def _measure(self, y, conv_io, history, mean, var, window, running) -> None:
        conv = self._conv
        past = history.past(True)
        mu_hat, var_hat, _ = compensate(conv.weight, conv.bias, mean=past.mean,
                                        var_intercept=past.var_intercept, xbar=past.xbar,
                                        grad_var=past.grad_var)
        valid = past.slot_weight > 0
        clamped = PROBE.clamped.setdefault(self.layer_name, [0.0, 0.0])
        clamped[0] += float((var_hat[valid] < 0).sum())
        clamped[1] += float(valid.sum()) * var_hat.shape[1]
        if not PROBE.measure or not PROBE.keep_inputs:
            return
        site = 0 if self._calls.iteration_ended else self._calls.index
        stored = self._inputs.get(site, {})
        g = self._geometry
        rows = []
        exact_means, exact_vars, counts = [mean.double()], [var.double()], [y.numel() //
                                                                              y.shape[1]]
        for j in torch.nonzero(valid).flatten().tolist():
            if j not in stored:
                continue
            x_old, mean_old, var_old, recorded = stored[j]
            y_now = F.conv2d(x_old, conv.weight, conv.bias, g.stride, g.padding, g.dilation,
                             g.groups).double()
            v_ex, m_ex = torch.var_mean(y_now, dim=(0, 2, 3), correction=0)
            std = v_ex.clamp_min(1e-12).sqrt()
            tau = PROBE.iteration - recorded
            rows.append(dict(
                tau=tau,
                comp_mean_err=_median((mu_hat[j].double() - m_ex).abs() / std),
                comp_var_relerr=_median((var_hat[j].double() - v_ex) / v_ex),
                comp_var_abs_relerr=_median((var_hat[j].double() - v_ex).abs() / v_ex),
                clamped=float((var_hat[j] < 0).float().mean()),
                naive_mean_err=_median((mean_old.double() - m_ex).abs() / std),
                naive_var_relerr=_median((var_old.double() - v_ex) / v_ex),
                drift_mean_per_iter=_median((mean_old.double() - m_ex).abs() / std) / tau,
                drift_logvar_per_iter=_median((v_ex / var_old.double()).log().abs()) / tau))
            exact_means.append(m_ex)
            exact_vars.append(v_ex)
            counts.append(y_now.numel() // y_now.shape[1])
        if not rows:
            return
        w = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
        means, variances = torch.stack(exact_means), torch.stack(exact_vars)
        pooled_mean = (w * means).sum(0) / w.sum()
        pooled_var = (w * (variances + (means - pooled_mean).square())).sum(0) / w.sum()
        std = pooled_var.sqrt()
        window_mean, window_var = window[0].double(), window[1].double()
        run_mean, run_var = (t.double() for t in running)
        batch_mean, batch_var = self.batch_running_mean.double(), self.batch_running_var.double()
        PROBE.records.append(dict(
            iter=PROBE.iteration, lr=PROBE.lr, layer=self.layer_name, slots=rows,
            window_mean_err=_median((window_mean - pooled_mean).abs() / std),
            window_var_relerr=_median((window_var - pooled_var) / pooled_var),
            running_window_mean_gap=_median((run_mean - pooled_mean).abs() / std),
            running_window_logvar=_median((run_var / pooled_var).log()),
            running_batch_mean_gap=_median((batch_mean - pooled_mean).abs() / std),
            running_batch_logvar=_median((batch_var / pooled_var).log())))


def _register_probe() -> None:
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS, MODELS

    class ProbeHook(Hook):
        """Tells the layers the iteration and whether to measure; writes ``probe.jsonl``."""

        priority = 'LOW'

        def __init__(self, every: int = 0, burnin_epochs: int = 2) -> None:
            self.every = every
            self.burnin_epochs = burnin_epochs

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            PROBE.iteration = runner.iter + 1
            PROBE.lr = runner.optim_wrapper.get_lr()['lr'][0]
            windowed = runner.epoch >= self.burnin_epochs
            PROBE.keep_inputs = self.every > 0 and windowed
            PROBE.measure = PROBE.keep_inputs and PROBE.iteration % self.every == 0

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if PROBE.iteration % 20 == 0 and PROBE.clamped:
                clamped = {name: c / max(n, 1) for name, (c, n) in PROBE.clamped.items()}
                PROBE.records.append(dict(iter=PROBE.iteration, lr=PROBE.lr,
                                          clamped_fraction=clamped))
                PROBE.clamped = {}
            if PROBE.records:
                with open(Path(runner.work_dir) / 'probe.jsonl', 'a') as out:
                    for record in PROBE.records:
                        out.write(json.dumps(record) + '\n')
                PROBE.records = []

    MODELS.register_module('CBN', module=ProbedCBN, force=True)
    HOOKS.register_module(module=ProbeHook, force=True)


def run_name(arm: str, lr: float, window: int, seed: int) -> str:
    return f'{arm}_lr{lr:g}_w{window}_s{seed}'


def build_config(args: argparse.Namespace, work_dir: Path):
    """The demo config of the arm, with the run's seed, lr, window and schedule."""
    from mmengine.config import Config

    data_root = ROOT / 'data'
    cfg = Config.fromfile(CONFIGS[args.arm])
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(data_root)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = str(data_root / 'annotations/val.json')
    cfg.randomness = dict(seed=args.seed)
    cfg.optim_wrapper.optimizer.lr = args.lr
    cfg.train_cfg.max_epochs = args.epochs
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, max_keep_ckpts=-1)
    if args.arm != 'bn':
        norm_cfg = dict(cfg.model.neck.norm_cfg, window_size=args.window)
        cfg.model.neck.norm_cfg = norm_cfg
        cfg.model.roi_head.bbox_head.norm_cfg = norm_cfg
        cfg.model.roi_head.mask_head.norm_cfg = norm_cfg
        if args.burnin_iters is not None:
            cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=args.burnin_iters)]
        if not args.plain:
            cfg.custom_hooks = list(cfg.custom_hooks) + [
                dict(type='ProbeHook', every=args.probe_every,
                     burnin_epochs=0 if args.burnin_iters is not None else 2)]
    if args.load_from is not None:  # a windowed stretch from a burn-in checkpoint
        cfg.load_from = str(args.load_from)
        cfg.param_scheduler = []  # constant lr
        cfg.train_cfg = dict(by_epoch=False, max_iters=args.iters)
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
        cfg.default_hooks.checkpoint = None
    cfg.work_dir = str(work_dir)
    return cfg


def train(args: argparse.Namespace) -> None:
    from mmengine.runner import Runner

    from mmdet_cbn.compat import runner_checkpoint_globals

    if args.arm != 'bn' and not hasattr(CrossIterationBatchNorm2d, '_commit'):
        raise SystemExit('eval_statistics.py train: the probe needs the layer of commit 0111ace '
                         '(CrossIterationBatchNorm2d._commit); this layer runs its step in '
                         'functional.training_step. Check out 0111ace to rerun the study.')
    torch.set_num_threads(1)
    if not (ROOT / 'data/annotations/val.json').is_file():
        make_data(ROOT / 'data', 400, 100)
    work_dir = ROOT / (args.name or run_name(args.arm, args.lr, args.window, args.seed))
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / 'probe.jsonl').unlink(missing_ok=True)
    if not args.plain:
        _register_probe()
    cfg = build_config(args, work_dir)
    cfg.dump(work_dir / 'config.py')
    began = time.perf_counter()
    with runner_checkpoint_globals():  # load_from: a Runner checkpoint
        Runner.from_cfg(cfg).train()
    (work_dir / 'run.json').write_text(json.dumps(dict(
        arm=args.arm, seed=args.seed, lr=args.lr, window=args.window, epochs=args.epochs,
        probe_every=args.probe_every, wall_s=time.perf_counter() - began,
        git_commit=git_commit()), indent=2))


def _gaps(layer, stats, mean: Tensor, var: Tensor) -> dict[str, float]:
    """How far ``mean``, ``var`` are from the population statistics (channel medians)."""
    pop_std = stats.var.sqrt()
    return dict(mean_gap=_median((mean.double() - stats.mean).abs() / pop_std),
                logvar=_median((var.double() / stats.var).log()),
                abs_logvar=_median((var.double() / stats.var).log().abs()))


def evaluate(args: argparse.Namespace) -> None:
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmdet_cbn.compat import runner_checkpoint_globals

    torch.set_num_threads(1)
    _register_probe()
    work_dir = args.run_dir
    cfg = Config.fromfile(work_dir / 'config.py')
    cfg.work_dir = str(work_dir / 'eval')
    cfg.load_from = None
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', []) if h['type'] != 'ProbeHook']
    runner = Runner.from_cfg(cfg)
    runner._val_loop = runner.build_val_loop(runner._val_loop)
    runner.call_hook('before_run')
    model = runner.model
    out_path = work_dir / 'eval.json'
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}

    def forward(batch) -> None:
        model._run_forward(model.data_preprocessor(batch, True), mode='loss')

    epochs = [int(p.stem.split('_')[1]) for p in work_dir.glob('epoch_*.pth')]
    for epoch in sorted(epochs):
        with runner_checkpoint_globals():
            state = torch.load(work_dir / f'epoch_{epoch}.pth', map_location='cpu')['state_dict']
        rules = ['window', 'batch'] if 'cbn' in str(cfg.model.neck.norm_cfg.type).lower() \
            else ['batch']
        entry = results.setdefault(str(epoch), {})
        for batches in [b for b in args.precise_batches if b]:
            model.load_state_dict(state)
            began = time.perf_counter()
            stats = population_statistics(model, islice(runner.train_dataloader, batches),
                                          forward)
            cost = time.perf_counter() - began
            layers = dict(model.named_modules())
            gaps = {}
            for rule in rules:
                for name, st in stats.items():
                    layer = layers[name]
                    if rule == 'window':
                        mean, var = layer.running_mean, layer.running_var
                    else:
                        mean, var = ((layer.batch_running_mean, layer.batch_running_var)
                                     if hasattr(layer, 'batch_running_mean')
                                     else (layer.running_mean, layer.running_var))
                    gaps.setdefault(rule, {})[name] = _gaps(layer, st, mean, var)
            load_population_statistics(model, stats)
            metrics = runner.val_loop.run()
            entry[f'precise{batches}'] = dict(metrics=dict(metrics), seconds=cost,
                                              gaps_to_precise=gaps)
        for rule in rules:
            if rule not in args.rules or (rule in entry and not args.redo):
                continue
            model.load_state_dict(state)
            if rule == 'batch' and 'cbn' in str(cfg.model.neck.norm_cfg.type).lower():
                for layer in model.modules():
                    if hasattr(layer, 'batch_running_mean'):
                        layer.running_mean.copy_(layer.batch_running_mean)
                        layer.running_var.copy_(layer.batch_running_var)
            entry[rule] = dict(metrics=dict(runner.val_loop.run()))
        out_path.write_text(json.dumps(results, indent=1))
        print(f'[eval_statistics] {work_dir.name} epoch {epoch}: ' + ', '.join(
            f"{k} {100 * v['metrics']['coco/bbox_mAP']:.1f}/"
            f"{100 * v['metrics']['coco/segm_mAP']:.1f}" for k, v in entry.items()
            if not math.isnan(v['metrics'].get('coco/bbox_mAP', float('nan')))), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train')
    t.add_argument('--arm', choices=sorted(CONFIGS), required=True)
    t.add_argument('--seed', type=int, default=0)
    t.add_argument('--lr', type=float, default=0.02)
    t.add_argument('--window', type=int, default=8)
    t.add_argument('--epochs', type=int, default=8)
    t.add_argument('--probe-every', type=int, default=0)
    t.add_argument('--burnin-iters', type=int, default=None,
                   help='burn-in in iterations instead of the config\'s 2 epochs')
    t.add_argument('--plain', action='store_true',
                   help='the plain CBN layer, no probe (to check that the probe changes '
                        'nothing in training)')
    t.add_argument('--name', default=None, help='run directory name')
    t.add_argument('--load-from', type=Path, default=None,
                   help='start from these weights at a constant lr, without validation '
                        '(with --burnin-iters 0: the lr / window sweep)')
    t.add_argument('--iters', type=int, default=80, help='iterations with --load-from')
    e = sub.add_parser('evaluate')
    e.add_argument('run_dir', type=Path)
    e.add_argument('--precise-batches', type=int, nargs='+', default=[100],
                   help='batches of each re-estimation scored (0: none)')
    e.add_argument('--redo', action='store_true')
    e.add_argument('--rules', nargs='+', default=['window', 'batch'],
                   help="running-statistics rules to score besides the re-estimation "
                        "('window' is what validation during training scored)")
    args = parser.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    {'train': train, 'evaluate': evaluate}[args.command](args)


if __name__ == '__main__':
    main()
