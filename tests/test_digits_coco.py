"""The digits COCO generator: determinism, annotation consistency, mmdet/pycocotools use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.evaluation import CocoMetric
from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules
from PIL import Image
from pycocotools.coco import COCO

from digits_coco import DIGITS_CLASSES, make_digits_coco

SPLITS = ('train', 'val')


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / 'annotations' / f'{split}.json'))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = make_digits_coco(tmp_path / 'a', num_train=3, num_val=2, seed=7)
    make_digits_coco(tmp_path / 'b', num_train=3, num_val=2, seed=7)
    make_digits_coco(tmp_path / 'c', num_train=3, num_val=2, seed=8)
    a, b, c = (_tree_bytes(tmp_path / name) for name in 'abc')
    assert len(a) == 3 + 2 + 2
    assert a == b
    assert a['annotations/train.json'] != c['annotations/train.json']
    assert (first['num_train_images'], first['num_val_images']) == (3, 2)
    assert first['train_ann_file'] == tmp_path / 'a' / 'annotations' / 'train.json'


def test_coco_files_load_and_match_images(digits_coco: Path) -> None:
    for split in SPLITS:
        coco = _load(digits_coco, split)
        assert len(coco.getImgIds()) == len(list((digits_coco / 'images' / split).iterdir()))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(DIGITS_CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(digits_coco / 'images' / split / img['file_name']) as image:
                assert image.mode == 'RGB'
                assert image.size == (img['width'], img['height']) == (128, 128)
            assert coco.getAnnIds(imgIds=img['id']), 'every image has at least one digit'


def test_boxes_masks_and_classes_are_consistent(digits_coco: Path) -> None:
    for split in SPLITS:
        coco = _load(digits_coco, split)
        anns = coco.loadAnns(coco.getAnnIds())
        assert len({a['id'] for a in anns}) == len(anns)
        assert min(a['id'] for a in anns) >= 1
        for ann in anns:
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann['bbox']
            assert [x, y, w, h] == [xs.min(), ys.min(),
                                    xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann['area'] == mask.sum() > 0
            assert 0 <= ann['category_id'] - 1 <= 9
            assert all(len(poly) == 8 for poly in ann['segmentation'])


def test_digits_are_visible_and_do_not_overlap(digits_coco: Path) -> None:
    coco = _load(digits_coco, 'train')
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(digits_coco / 'images' / 'train' / img['file_name']),
                            dtype=float)
        masks = [coco.annToMask(a).astype(bool)
                 for a in coco.loadAnns(coco.getAnnIds(imgIds=img['id']))]
        assert np.sum(masks, axis=0).max() == 1
        ink = np.any(masks, axis=0)
        # Ink contrasts with its surroundings by far more than the noise (sigma 6).
        for mask in masks:
            ring = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            ring[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
            ring &= ~ink
            gap = np.abs(pixels[mask].mean(axis=0) - pixels[ring].mean(axis=0)).max()
            assert gap > 30


def test_train_and_val_use_disjoint_halves_of_sklearn_digits(digits_coco: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    half = len(digits.images) // 2
    train = {a['sklearn_index'] for a in _load(digits_coco, 'train').dataset['annotations']}
    val = {a['sklearn_index'] for a in _load(digits_coco, 'val').dataset['annotations']}
    assert max(train) < half <= min(val)
    assert max(val) < len(digits.images)
    for split in SPLITS:
        for ann in _load(digits_coco, split).dataset['annotations']:
            assert ann['category_id'] - 1 == digits.target[ann['sklearn_index']]


@pytest.mark.parametrize('poly2mask', [True, False])
def test_mmdet_loads_boxes_and_masks(digits_coco: Path, poly2mask: bool) -> None:
    register_all_modules()
    dataset = DATASETS.build(dict(
        type='CocoDataset', data_root=str(digits_coco), ann_file='annotations/train.json',
        data_prefix=dict(img='images/train/'), metainfo=dict(classes=DIGITS_CLASSES),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True,
                       poly2mask=poly2mask)]))
    coco = _load(digits_coco, 'train')
    assert len(dataset) == len(coco.getImgIds())
    for index in range(len(dataset)):
        sample = dataset[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=sample['img_id']))
        assert sample['img'].shape == (128, 128, 3)
        assert not sample['gt_ignore_flags'].any()
        np.testing.assert_array_equal(
            sample['gt_bboxes'].tensor.numpy(),
            [[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)])
        np.testing.assert_array_equal(sample['gt_bboxes_labels'],
                                      [a['category_id'] - 1 for a in anns])
        np.testing.assert_allclose(sample['gt_masks'].areas, [a['area'] for a in anns])


def test_coco_metric_scores_ground_truth_as_perfect(digits_coco: Path) -> None:
    """mmdet's CocoMetric evaluates bbox and segm on the generated val.json."""
    coco = _load(digits_coco, 'val')
    metric = CocoMetric(ann_file=str(digits_coco / 'annotations' / 'val.json'),
                        metric=['bbox', 'segm'])
    metric.dataset_meta = dict(classes=DIGITS_CLASSES)
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        pred = dict(
            bboxes=torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                 (a['bbox'] for a in anns)], dtype=torch.float32),
            scores=torch.ones(len(anns)),
            labels=torch.tensor([a['category_id'] - 1 for a in anns]),
            masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)))
        metric.process({}, [dict(img_id=img_id, ori_shape=(128, 128), pred_instances=pred)])
    results = metric.evaluate(size=len(coco.getImgIds()))
    assert results['coco/bbox_mAP'] == pytest.approx(1.0)
    assert results['coco/segm_mAP'] == pytest.approx(1.0)
