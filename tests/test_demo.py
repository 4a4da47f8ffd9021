"""Smoke runs of the two evidence scripts: ``experiments/demo.py --quick`` and
``benchmarks/small_batch.py --quick``, each in a subprocess, checking what they print and write.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _run(args: list[str], timeout: float) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f'{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout + proc.stderr


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_demo_quick(tmp_path: Path) -> None:
    out = _run(['experiments/demo.py', '--quick', '--work-dir', str(tmp_path)], timeout=600)
    for label in ('| head BN |', '| head CBN |', '| head CBN, detached (authors) |'):
        assert label in out
    assert 'epoch 1/1' in out and 'Epoch(train)' not in out  # progress bars, not logs
    log = (tmp_path / 'cbn' / 'train.log').read_text()  # the full log of each run
    assert 'Epoch(train)' in log
    assert 'CBN window 8' in log  # the burn-in hook switched to the full window

    results = json.loads((tmp_path / 'demo_results.json').read_text())
    assert results['quick'] is True
    assert set(results['results']) == {'bn', 'cbn', 'cbn_detached'}
    for res in results['results'].values():
        assert set(res['final']) == {'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP',
                                     'segm_mAP_50', 'segm_mAP_75'}
        for value in res['final'].values():
            assert math.isfinite(value) and 0.0 <= value <= 1.0
        assert res['time_per_iter_s'] > 0 and res['iterations'] == 8
        assert res['loss_curve'] and all(math.isfinite(loss) for _, loss in res['loss_curve'])
    assert _is_png(tmp_path / 'demo_results.png')
    assert (tmp_path / 'data' / 'annotations' / 'val.json').is_file()


def test_small_batch_quick(tmp_path: Path) -> None:
    out = _run(['benchmarks/small_batch.py', '--quick', '--out-dir', str(tmp_path)], timeout=300)
    assert '| norm | 16 img/batch | 2 img/batch |' in out
    for label in ('| BN |', '| GN |', '| Naive CBN |', '| CBN |', '| CBN, detached (authors) |'):
        assert label in out

    results = json.loads((tmp_path / 'small_batch.json').read_text())
    assert set(results) >= {'setting', 'summary', 'runs', 'table', 'windows', 'environment'}
    assert results['windows'] == {'16': 1, '2': 8}
    assert len(results['runs']) == 10
    for norm, row in results['summary'].items():
        for batch, cell in row.items():
            assert 0.0 <= cell['mean'] <= 100.0 and cell['runs'] == 1, (norm, batch)
    # At 16 images per batch the CBN window is 1: every CBN variant runs the same BN math
    # (equal to BN's up to rounding, so its accuracy may differ from BN's by a sample or two).
    acc16 = {r['norm']: r['test_accuracy'] for r in results['runs'] if r['batch'] == 16}
    assert acc16['cbn'] == acc16['naive_cbn'] == acc16['cbn_detached']
    assert abs(acc16['cbn'] - acc16['bn']) < 5
    assert _is_png(tmp_path / 'small_batch.png')


def test_small_batch_pairs_task_composes_two_digits_into_100_classes(tmp_path: Path) -> None:
    """``--task pairs``: each image is two digits of its split side by side, labelled 10 a + b."""
    sys.path.insert(0, str(REPO / 'benchmarks'))
    try:
        import small_batch
    finally:
        sys.path.remove(str(REPO / 'benchmarks'))
    digits_x, digits_y, test_digits_x, _ = small_batch._digits(100)
    train_x, train_y, test_x, test_y, classes = small_batch._task_data('pairs', 100)
    assert classes == 100 and train_x.shape == (400, 1, 8, 16) and test_x.shape[1:] == (1, 8, 16)
    assert len(test_y) == small_batch.TEST_PAIRS and len(set(train_y.tolist())) > 50
    for image, label in zip(train_x[:20], train_y[:20]):
        for half, digit in ((image[..., :8], label // 10), (image[..., 8:], label % 10)):
            same = (digits_x == half).flatten(1).all(1)  # the half is one of the train digits
            assert same.any() and (digits_y[same] == digit).all()
    test_digits = test_digits_x.flatten(1)
    assert all((test_digits == image[..., :8].flatten()).all(1).any() for image in test_x[:20])

    out = _run(['benchmarks/small_batch.py', '--quick', '--task', 'pairs', '--norms', 'bn',
                'cbn', '--out-dir', str(tmp_path)], timeout=300)
    assert '2 epochs of 256 pairs images' in out
    results = json.loads((tmp_path / 'small_batch.json').read_text())
    assert results['setting']['task'] == 'pairs' and len(results['runs']) == 4


def test_demo_counts_an_evaluation_without_detections_as_zero(tmp_path: Path) -> None:
    """mmengine logs the previous metrics again when CocoMetric has nothing to score."""
    import demo
    log = tmp_path / 'train.log'
    log.write_text(
        'Epoch(val) [2][50/50]    coco/bbox_mAP: 0.1230  coco/segm_mAP: 0.1360\n'
        'ERROR - coco_metric.py - compute_metrics - 465 - The testing results of the whole '
        'dataset is empty.\n'
        'Epoch(val) [4][50/50]    coco/bbox_mAP: 0.1230  coco/segm_mAP: 0.1360\n'
        'Epoch(val) [6][50/50]    coco/bbox_mAP: 0.3310  coco/segm_mAP: 0.1250\n')
    assert demo.epochs_without_detections(log) == {4}
    progress = demo.Progress('cbn', epochs=8, position=0)
    for line in log.read_text().splitlines():
        progress.feed(line)
        if 'Epoch(val) [4]' in line:
            assert progress.maps == {'bbox': '0.0', 'segm': '0.0'}
    assert progress.maps == {'bbox': '33.1', 'segm': '12.5'}
    progress.close()
