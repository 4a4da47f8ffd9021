"""Tables and a plot from the runs of ``experiments/eval_statistics.py`` (issue 23).

Reads ``work_dirs/eval_stats/<run>/{probe.jsonl,eval.json}`` and the runs' validation logs and
prints markdown tables: the compensation measured during training (per layer group and phase),
mAP per checkpoint under each running-statistics rule, and how far each rule's statistics are
from the re-estimated ones; ``--plot`` writes the clamped fraction and the compensation error
of the lr / window sweep.

Usage::

    python experiments/eval_statistics_report.py --plot docs/eval_statistics.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))

from demo import epochs_without_detections  # noqa: E402

ROOT = REPO / 'work_dirs/eval_stats'
GROUPS = (('C5 lateral (4x4 map)', 'neck.lateral_convs.3'), ('C2-C4 lateral', 'neck.lateral_convs'),
          ('FPN output', 'neck.fpn_convs'),
          ('box head', 'roi_head.bbox_head'), ('mask head', 'roi_head.mask_head'))
SLOT_FIELDS = ('comp_mean_err', 'comp_var_relerr', 'clamped', 'naive_mean_err',
               'naive_var_relerr', 'drift_mean_per_iter', 'drift_logvar_per_iter')
WINDOW_FIELDS = ('window_mean_err', 'window_var_relerr', 'running_window_mean_gap',
                 'running_window_logvar', 'running_batch_mean_gap', 'running_batch_logvar')


def group_of(layer: str) -> str:
    return next(label for label, prefix in GROUPS if layer.startswith(prefix))


def read_probe(run: str) -> list[dict]:
    path = ROOT / run / 'probe.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def probe_summary(records: list[dict], first: int, last: int) -> dict[str, dict[str, float]]:
    """Per layer group, over the probes of iterations ``first..last``: the median of the
    per-layer channel medians (slot fields over all past slots), and the clamped fraction over
    every windowed iteration."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if not first <= record['iter'] <= last:
            continue
        if 'clamped_fraction' in record:
            for layer, fraction in record['clamped_fraction'].items():
                values[group_of(layer)]['clamped_all_iters'].append(fraction)
            continue
        group = values[group_of(record['layer'])]
        for slot in record['slots']:
            for key in SLOT_FIELDS:
                group[key].append(slot[key])
        for key in WINDOW_FIELDS:
            group[key].append(record[key])
    return {g: {k: (statistics.fmean(v) if k.startswith('clamped') else statistics.median(v))
                for k, v in fields.items()} for g, fields in values.items()}


def compensation_table(runs: dict[str, str], phases: list[tuple[int, int]]) -> str:
    lines = ['| run | iterations | layers | clamped (all its) | var error, compensated '
             '(signed / rel.) | mean error, compensated (std) | mean drift per it (std) | '
             'log-var drift per it | running (window rule) - exact window: mean (std) / '
             'log var | running (batch rule): mean / log var |', '|' + '---|' * 10]
    for label, run in runs.items():
        records = read_probe(run)
        for first, last in phases:
            for group, s in probe_summary(records, first, last).items():
                if 'comp_var_relerr' not in s:
                    continue
                lines.append(
                    f"| {label} | {first}-{last} | {group} | {s.get('clamped_all_iters', 0):.4f} "
                    f"| {s['comp_var_relerr']:+.4f} | {s['comp_mean_err']:.1e} | "
                    f"{s['drift_mean_per_iter']:.4f} | {s['drift_logvar_per_iter']:.4f} | "
                    f"{s['running_window_mean_gap']:.3f} / {s['running_window_logvar']:+.3f} | "
                    f"{s['running_batch_mean_gap']:.3f} / {s['running_batch_logvar']:+.3f} |")
    return '\n'.join(lines)


def val_maps(run: str) -> dict[int, tuple[float, float]]:
    """Validation bbox / segm mAP (%) by epoch from the run's scalars (training-time); an
    evaluation without any detection (mmengine then repeats the previous metrics) is 0."""
    scalars = sorted((ROOT / run).glob('*/vis_data/scalars.json'))
    out = {}
    if scalars:
        log = scalars[-1].parents[1] / f'{scalars[-1].parents[1].name}.log'
        empty = epochs_without_detections(log)
        for line in scalars[-1].read_text().splitlines():
            record = json.loads(line)
            if 'coco/bbox_mAP' in record:
                out[record['step']] = (0.0, 0.0) if record['step'] in empty else (
                    100 * record['coco/bbox_mAP'], 100 * record['coco/segm_mAP'])
    return out


def rules_of(run: str, rule: str) -> dict[int, dict[str, tuple[float, float]]]:
    """mAP by epoch and rule ('window', 'batch', 're-est.'). A run trained with the hook's
    re-estimation validated with re-estimated statistics (its last checkpoint holds them, so
    its 'window' score of the last epoch is not known); other runs validated with the window
    rule's, and ``rule`` of ``eval.json`` gives the re-estimated score."""
    logs = sorted((ROOT / run).glob('*/*.log'))
    hooked = bool(logs) and 'CBN: running statistics of' in logs[-1].read_text()
    out: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)
    last = max(val_maps(run), default=None)
    for epoch, rules in eval_maps(run).items():
        for name, value in rules.items():
            if name in ('window', 'batch') and not (hooked and name == 'window'
                                                    and epoch == last):
                out[epoch][name] = value
            elif name == rule and not hooked:
                out[epoch]['re-est.'] = value
    for epoch, value in val_maps(run).items():
        out[epoch]['re-est.' if hooked else 'window'] = value
    return out


def eval_maps(run: str) -> dict[int, dict[str, tuple[float, float]]]:
    path = ROOT / run / 'eval.json'
    if not path.is_file():
        return {}
    out = {}
    for epoch, entry in json.loads(path.read_text()).items():
        out[int(epoch)] = {rule: (100 * v['metrics'].get('coco/bbox_mAP', 0.0),
                                  100 * v['metrics'].get('coco/segm_mAP', 0.0))
                           for rule, v in entry.items()}  # no key: no detection
    return out


def map_table(seeds: list[int], rule: str = 'precise100') -> str:
    """bbox / segm mAP by seed, epoch and arm: as trained (window rule), batch rule,
    re-estimated; ratio to BN (as trained) of the same seed and epoch."""
    lines = ['| seed | epoch | BN | BN re-est. | CBN: window (today) | CBN: batch | '
             'CBN: re-est. | CBN re-est. / BN | detached: window | detached: batch | '
             'detached: re-est. | detached re-est. / BN |', '|' + '---|' * 12]

    def cell(v):
        return '-' if v is None else f'{v[0]:.1f} / {v[1]:.1f}'

    def ratio(v, ref):
        return '-' if v is None or ref is None else f'{v[0] / ref[0]:.2f} / {v[1] / ref[1]:.2f}'

    for seed in seeds:
        bn_val = val_maps(f'bn_lr0.02_w8_s{seed}')
        bn_eval = eval_maps(f'bn_lr0.02_w8_s{seed}')
        arms = {arm: rules_of(f'{arm}_lr0.02_w8_s{seed}', rule)
                for arm in ('cbn', 'cbn_detached')}
        for epoch in (2, 4, 6, 8):
            bn = bn_val.get(epoch)
            row = [str(seed), str(epoch), cell(bn), cell(bn_eval.get(epoch, {}).get(rule))]
            for arm in ('cbn', 'cbn_detached'):
                scores = arms[arm].get(epoch, {})
                row += [cell(scores.get('window')), cell(scores.get('batch')),
                        cell(scores.get('re-est.')), ratio(scores.get('re-est.'), bn)]
            lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def demo_table(seeds: list[int], rule: str = 'precise100') -> str:
    """Compact: BN, and each CBN arm today (window rule) and fixed (re-estimated), with the
    ratio fixed / BN of the same seed and epoch."""
    lines = ['| seed | epoch | BN | CBN today | CBN fixed | fixed / BN | detached today | '
             'detached fixed | fixed / BN |', '|' + '---|' * 9]

    def cell(v):
        return '-' if v is None else f'{v[0]:.1f} / {v[1]:.1f}'

    for seed in seeds:
        bn_val = val_maps(f'bn_lr0.02_w8_s{seed}')
        arms = [rules_of(f'{arm}_lr0.02_w8_s{seed}', rule) for arm in ('cbn', 'cbn_detached')]
        for epoch in (2, 4, 6, 8):
            bn = bn_val.get(epoch)
            row = [str(seed), str(epoch), cell(bn)]
            for scores in arms:
                today, fixed = scores.get(epoch, {}).get('window'), scores.get(epoch, {}).get(
                    're-est.')
                row += [cell(today), cell(fixed), '-' if fixed is None or bn is None else
                        f'{fixed[0] / bn[0]:.2f} / {fixed[1] / bn[1]:.2f}']
            lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def gap_table(runs: dict[str, str], epochs=(4, 6)) -> str:
    """Running statistics (each rule) against the re-estimated ones, per layer group: the
    median over layers of the channel-median mean gap (in population std) and log variance
    ratio, and the worst layer."""
    lines = ['| run | epoch | rule | layers | mean gap (std), median / worst layer | '
             'log var ratio, median / most negative / most positive |', '|' + '---|' * 6]
    for label, run in runs.items():
        path = ROOT / run / 'eval.json'
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        for epoch in epochs:
            entry = results.get(str(epoch), {}).get('precise100')
            if entry is None:
                continue
            for rule, layers in entry['gaps_to_precise'].items():
                grouped = defaultdict(list)
                for layer, gap in layers.items():
                    grouped[group_of(layer)].append(gap)
                for group, gaps in grouped.items():
                    means = [g['mean_gap'] for g in gaps]
                    logvars = [g['logvar'] for g in gaps]
                    lines.append(f'| {label} | {epoch} | {rule} | {group} | '
                                 f'{statistics.median(means):.2f} / {max(means):.2f} | '
                                 f'{statistics.median(logvars):+.2f} / {min(logvars):+.2f} / '
                                 f'{max(logvars):+.2f} |')
    return '\n'.join(lines)


C5 = 'neck.lateral_convs.3.bn'


def layer_series(records: list[dict], layer: str) -> dict[str, list[tuple[int, float]]]:
    """Per probe iteration, for one layer: mean drift per iteration and |compensated variance
    error| (medians over the past slots), the running means' gaps to the exact window, and
    the clamped fraction of each logging interval."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if 'clamped_fraction' in r and layer in r['clamped_fraction']:
            series['clamped'].append((r['iter'], r['clamped_fraction'][layer]))
        elif r.get('layer') == layer and r['slots']:
            it = r['iter']
            series['drift'].append((it, statistics.median(
                s['drift_mean_per_iter'] for s in r['slots'])))
            series['var_error'].append((it, statistics.median(
                abs(s['comp_var_relerr']) for s in r['slots'])))
            series['gap_window'].append((it, r['running_window_mean_gap']))
            series['gap_batch'].append((it, r['running_batch_mean_gap']))
    return series


def plot(main_runs: dict[str, str], sweep: dict[str, str], path: Path) -> None:
    """Top: the C5 lateral layer over the seed-0 trainings; bottom: the lr / window sweep."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for label, run in main_runs.items():
        series = layer_series(read_probe(run), C5)
        line, = axes[0, 0].plot(*zip(*series['drift']), label=label)
        axes[0, 1].plot(*zip(*series['clamped']), label=label, color=line.get_color())
        axes[0, 2].plot(*zip(*series['gap_window']), label=f'{label}: window rule (today)',
                        color=line.get_color())
        axes[0, 2].plot(*zip(*series['gap_batch']), label=f'{label}: batch rule (BN\'s)',
                        color=line.get_color(), linestyle='--')
    for label, run in sweep.items():
        series = layer_series(read_probe(run), C5)
        if not series['drift']:
            continue
        line, = axes[1, 0].plot(*zip(*series['drift']), label=label)
        axes[1, 1].plot(*zip(*series['clamped']), label=label, color=line.get_color())
        axes[1, 2].plot(*zip(*series['var_error']), label=label, color=line.get_color())
    titles = [['C5 lateral: mean drift per iteration (pop. std)',
               'C5 lateral: compensated variances clamped at 0',
               'C5 lateral: |running mean - exact window mean| (std)'],
              ['sweep from epoch 4: mean drift per iteration',
               'sweep: compensated variances clamped at 0',
               'sweep: |compensated - exact variance| / exact']]
    for row, ax_row in enumerate(axes):
        for col, ax in enumerate(ax_row):
            ax.set_title(titles[row][col], fontsize=10)
            ax.set_xlabel('iteration' if row == 0 else 'iteration after epoch 4')
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if col != 1:
                ax.set_yscale('log')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--plot', type=Path, default=None)
    args = parser.parse_args(argv)
    probed = {'CBN, lr 0.02, w8': 'cbn_lr0.02_w8_s0',
              'detached, lr 0.02, w8': 'cbn_detached_lr0.02_w8_s0'}
    sweep = {f'{arm}, lr {lr}, w{w}': f'sweep_{arm}_lr{lr}_w{w}'
             for arm in ('cbn', 'cbn_detached') for lr, w in ((0.02, 8), (0.02, 4), (0.005, 8))}
    print('## Compensation during training (seed 0, probes every 20 iterations)\n')
    print(compensation_table(probed, [(401, 800), (801, 1200), (1201, 1600)]))
    print('\n## Sweep: 60 iterations from the epoch-4 checkpoint, constant lr\n')
    print(compensation_table({k: v for k, v in sweep.items() if read_probe(v)}, [(1, 60)]))
    print('\n## Demo: today and fixed against BN\n')
    print(demo_table(args.seeds))
    print('\n## mAP (bbox / segm) by seed and epoch\n')
    print(map_table(args.seeds))
    print('\n## Running statistics against re-estimated ones (seed 0)\n')
    print(gap_table({'CBN': 'cbn_lr0.02_w8_s0', 'detached': 'cbn_detached_lr0.02_w8_s0',
                     'BN': 'bn_lr0.02_w8_s0'}))
    if args.plot is not None:
        plot(probed, sweep, args.plot)
        print(f'\nwrote {args.plot}')


if __name__ == '__main__':
    main()
