"""A small, real-image semantic segmentation dataset in mmseg's folder layout.

The same images as :mod:`digits_coco` (scikit-learn's scanned handwritten digits composed
onto noisy, cluttered canvases; train and val from disjoint halves of the digits), written by
:func:`digits_coco.make_digits_coco`, plus one label map per image: every ink pixel of a digit
gets the class ``digit + 1``, everything else class 0 (``'background'``), so 11 classes
(:data:`SEG_CLASSES`). The masks are rasterised from the exact rectangle decomposition that
``make_digits_coco`` writes as COCO polygons, so they are exactly the painted ink pixels.

Layout (mmseg's ``BaseSegDataset`` with ``img_suffix='.png'``, ``seg_map_suffix='.png'``)::

    root/images/{train,val}/NNNNNN.png   RGB images
    root/masks/{train,val}/NNNNNN.png    uint8 label maps, values 0..10

The same arguments give the same files (byte-identical with the same Pillow/zlib).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from digits_coco import DIGITS_CLASSES, make_digits_coco

SEG_CLASSES: tuple[str, ...] = ('background', *DIGITS_CLASSES)
# One colour per class for mmseg's visualiser: black background, then a fixed palette.
SEG_PALETTE: list[list[int]] = [[0, 0, 0]] + [
    [int(v) for v in np.random.default_rng([7, c]).integers(40, 256, size=3)]
    for c in range(len(DIGITS_CLASSES))]


def label_map(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """The ``(height, width)`` uint8 label map of one image's COCO annotations.

    Each annotation's ``segmentation`` is a list of axis-aligned rectangles written as
    polygons ``[x0, y0, x1, y0, x1, y1, x0, y1]`` (pixel corners), labelled ``category_id``
    (``digit + 1``); uncovered pixels are background (0).
    """
    labels = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        for x0, y0, x1, _, _, y1, _, _ in ann['segmentation']:
            labels[y0:y1, x0:x1] = ann['category_id']
    return labels


def make_digits_seg(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int = 64,
    digits_per_image: tuple[int, int] = (3, 6),
    seed: int = 0,
    digit_size: tuple[int, int] | None = (14, 24),
) -> dict:
    """Generate the digits semantic segmentation dataset.

    Args:
        out_dir: dataset root (created if missing).
        num_train, num_val: images per split.
        image_size: side of the square RGB images, in pixels.
        digits_per_image: inclusive range of digits drawn per image.
        seed: random seed of the images (``make_digits_coco``'s).
        digit_size: inclusive range of a digit's height in pixels (None: ``make_digits_coco``'s
            default for ``image_size``).

    Returns:
        ``root``, ``classes``, ``palette`` and per split ``{split}_img_dir``,
        ``{split}_mask_dir``, ``num_{split}_images``, ``num_{split}_instances`` and
        ``{split}_class_pixels`` (pixel count per class).
    """
    out_dir = Path(out_dir)
    coco = make_digits_coco(out_dir, num_train=num_train, num_val=num_val,
                            image_size=image_size, digits_per_image=digits_per_image,
                            seed=seed, digit_size=digit_size)
    result: dict = dict(root=out_dir, classes=SEG_CLASSES, palette=SEG_PALETTE)
    for split in ('train', 'val'):
        data = json.loads(Path(coco[f'{split}_ann_file']).read_text())
        by_image: dict[int, list[dict]] = {image['id']: [] for image in data['images']}
        for ann in data['annotations']:
            by_image[ann['image_id']].append(ann)
        mask_dir = out_dir / 'masks' / split
        mask_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros(len(SEG_CLASSES), dtype=np.int64)
        for image in data['images']:
            labels = label_map(by_image[image['id']], image['height'], image['width'])
            pixels += np.bincount(labels.ravel(), minlength=len(SEG_CLASSES))
            Image.fromarray(labels).save(mask_dir / image['file_name'], format='PNG')
        result[f'{split}_img_dir'] = coco[f'{split}_img_dir']
        result[f'{split}_mask_dir'] = mask_dir
        result[f'num_{split}_images'] = coco[f'num_{split}_images']
        result[f'num_{split}_instances'] = coco[f'num_{split}_instances']
        result[f'{split}_class_pixels'] = pixels.tolist()
    return result


def seg_dataset_cfg(root: str | Path, split: str, pipeline: list[dict]) -> dict:
    """An mmseg ``BaseSegDataset`` config for one split of :func:`make_digits_seg`'s output."""
    return dict(
        type='BaseSegDataset',
        data_root=str(root),
        data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'masks/{split}'),
        img_suffix='.png',
        seg_map_suffix='.png',
        metainfo=dict(classes=SEG_CLASSES, palette=SEG_PALETTE),
        reduce_zero_label=False,
        pipeline=pipeline)
