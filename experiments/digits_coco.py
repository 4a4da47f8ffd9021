"""A small, real-image detection and instance-segmentation dataset in COCO format.

The images are composed offline from scikit-learn's 1,797 8x8 handwritten digits
(:func:`sklearn.datasets.load_digits`, shipped inside the package: nothing is
downloaded). Each canvas gets a colour gradient, mild Gaussian noise and a few
clutter strokes/patches, then a few digits (1-4 by default), each upscaled (nearest or
bilinear) to a random size and drawn in a contrasting colour at a random
non-overlapping position.

Annotations:

* ``category_id`` is ``digit + 1`` (COCO ids start at 1), category names are
  ``'0'`` .. ``'9'`` (:data:`DIGITS_CLASSES`).
* ``segmentation`` is the exact set of the digit's ink pixels, written as COCO
  polygons: a decomposition of the pixel mask into disjoint axis-aligned
  rectangles with integer corners. pycocotools rasterises such polygons exactly,
  so the decoded mask, ``area`` (pixel count) and ``bbox`` (pixel extent,
  ``[x, y, w, h]`` with pixel ``x`` covering ``[x, x + 1)``) agree, holes (in 0,
  6, 8, 9) are kept, and every polygon has 8 coordinates (mmdet's
  ``LoadAnnotations`` drops polygons with fewer than 6).
* ``sklearn_index`` records which of scikit-learn's digits was drawn.
* Only the ink pixels are painted, and digits never overlap, so the annotation
  is exactly what is visible.

Train images use the first half of scikit-learn's digits, val images the second
half, whatever the seed. The same arguments give byte-identical json (and, with the
same Pillow/zlib, byte-identical PNGs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

# Upscaled digit intensities (0..1) above this are the digit's ink pixels.
_INK_THRESHOLD = 0.3
# Attempts to find a free spot for one digit before giving up on it.
_PLACEMENT_TRIES = 30


def _interp_matrix(n_out: int, n_in: int, bilinear: bool) -> np.ndarray:
    """Return the ``(n_out, n_in)`` matrix that resamples a 1-D signal.

    Pixel centres are aligned (``align_corners=False``); edges are clamped.
    """
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if not bilinear:
        weights[rows, np.clip(np.round(centres), 0, n_in - 1).astype(int)] = 1.0
        return weights
    centres = np.clip(centres, 0, n_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = centres - lo
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def _resize(digit: np.ndarray, height: int, width: int, bilinear: bool) -> np.ndarray:
    """Resize a 2-D array with separable nearest or bilinear interpolation."""
    rows = _interp_matrix(height, digit.shape[0], bilinear)
    cols = _interp_matrix(width, digit.shape[1], bilinear)
    return rows @ digit @ cols.T


def mask_to_rectangles(mask: np.ndarray) -> list[list[int]]:
    """Decompose a binary mask into disjoint rectangles, as COCO polygons.

    Horizontal runs of foreground pixels are merged with identical runs in the
    following rows. Each rectangle ``[x0, x1) x [y0, y1)`` becomes the polygon
    ``[x0, y0, x1, y0, x1, y1, x0, y1]`` with integer pixel-corner coordinates.

    Args:
        mask: ``(H, W)`` array, non-zero on the foreground.

    Returns:
        The polygons, sorted by ``(y0, x0)``.
    """
    height = mask.shape[0]
    padded = np.pad(mask.astype(bool), ((0, 1), (1, 1)))
    open_rects: dict[tuple[int, int], int] = {}
    rects: list[tuple[int, int, int, int]] = []
    for y in range(height + 1):
        edges = np.flatnonzero(np.diff(padded[y].astype(np.int8)))
        runs = set(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
        for run in [r for r in open_rects if r not in runs]:
            rects.append((open_rects.pop(run), run[0], y, run[1]))
        for run in runs:
            open_rects.setdefault(run, y)
    return [[x0, y0, x1, y0, x1, y1, x0, y1] for y0, x0, y1, x1 in sorted(rects)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a float ``(size, size, 3)`` canvas: colour gradient plus clutter."""
    base = rng.uniform(30, 225, size=3)
    slope = rng.uniform(-50, 50, size=(2, 3))
    ramp = np.linspace(-0.5, 0.5, size)
    canvas = (base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1])
    canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    # Clutter: thin straight strokes and translucent patches.
    for _ in range(rng.integers(0, 4)):
        (x0, y0), (x1, y1) = rng.uniform(0, size - 1, size=(2, 2))
        steps = np.linspace(0.0, 1.0, 2 * size)
        xs = np.round(x0 + steps * (x1 - x0)).astype(int)
        ys = np.round(y0 + steps * (y1 - y0)).astype(int)
        canvas[ys, xs] = rng.uniform(0, 255, size=3)
    for _ in range(rng.integers(0, 3)):
        x, y = rng.integers(0, size - 4, size=2)
        w, h = rng.integers(4, max(5, size // 6), size=2)
        patch = canvas[y:y + h, x:x + w]
        patch[...] = 0.5 * patch + 0.5 * rng.uniform(0, 255, size=3)
    return canvas


def _ink_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Return a random RGB colour that contrasts with ``background`` (mean RGB)."""
    if background.mean() > 127:
        return rng.uniform(0, 80, size=3)
    return rng.uniform(175, 255, size=3)


def _render_image(
    rng: np.random.Generator,
    digits: np.ndarray,
    labels: np.ndarray,
    first_index: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
) -> tuple[np.ndarray, list[dict]]:
    """Compose one image; return it (uint8 RGB) and its annotations (no ids).

    ``digits[i]`` is scikit-learn's digit ``first_index + i``.
    """
    canvas = _background(rng, image_size)
    taken = np.zeros((image_size, image_size), dtype=bool)
    annotations = []
    for _ in range(rng.integers(digits_per_image[0], digits_per_image[1] + 1)):
        index = rng.integers(len(digits))
        height = int(rng.integers(digit_size[0], digit_size[1] + 1))
        width = int(np.clip(round(height * rng.uniform(0.75, 1.25)), 4, image_size))
        height = min(height, image_size)
        bilinear = bool(rng.integers(2))
        intensity = _resize(digits[index] / 16.0, height, width, bilinear)
        ink = intensity > _INK_THRESHOLD
        colour = _ink_colour(rng, canvas.mean(axis=(0, 1)))
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, image_size - width + 1))
            y = int(rng.integers(0, image_size - height + 1))
            # One free pixel of margin, so that two digits never touch.
            if not taken[max(y - 1, 0):y + height + 1, max(x - 1, 0):x + width + 1].any():
                break
        else:
            continue
        taken[y:y + height, x:x + width] = True
        alpha = (ink * np.clip(0.5 + intensity, 0.0, 1.0))[..., None]
        region = canvas[y:y + height, x:x + width]
        region[...] = (1 - alpha) * region + alpha * colour
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y:y + height, x:x + width] = ink
        ys, xs = np.nonzero(mask)
        annotations.append(dict(
            category_id=int(labels[index]) + 1,
            bbox=[int(xs.min()), int(ys.min()),
                  int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            area=int(mask.sum()),
            segmentation=mask_to_rectangles(mask),
            iscrowd=0,
            sklearn_index=first_index + int(index),
        ))
    canvas += rng.normal(0.0, 6.0, size=canvas.shape)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), annotations


def _write_split(
    out_dir: Path,
    split: str,
    num_images: int,
    digits: np.ndarray,
    labels: np.ndarray,
    first_index: int,
    rng: np.random.Generator,
    info: dict,
    **render_kwargs,
) -> tuple[Path, int]:
    """Write the images and json of one split; return the json path and #instances."""
    image_dir = out_dir / 'images' / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels, anns = _render_image(rng, digits, labels, first_index, **render_kwargs)
        file_name = f'{image_id:06d}.png'
        Image.fromarray(pixels).save(image_dir / file_name, format='PNG')
        size = render_kwargs['image_size']
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
        for ann in anns:
            # Annotation ids start at 1: COCOeval treats id 0 as "unmatched".
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, **ann))
    coco = dict(
        info=dict(info, split=split),
        images=images,
        annotations=annotations,
        categories=[dict(id=d + 1, name=name, supercategory='digit')
                    for d, name in enumerate(DIGITS_CLASSES)],
    )
    ann_file = out_dir / 'annotations' / f'{split}.json'
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco, separators=(',', ':')))
    return ann_file, len(annotations)


def make_digits_coco(
    out_dir: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 128,
    digits_per_image: tuple[int, int] = (1, 4),
    seed: int = 0,
    digit_size: tuple[int, int] | None = None,
) -> dict:
    """Generate the digits detection/instance-segmentation dataset in COCO format.

    Writes ``out_dir/images/{train,val}/NNNNNN.png`` and
    ``out_dir/annotations/{train,val}.json``. Train digits come from the first
    half of scikit-learn's digits and val digits from the second half.

    Args:
        out_dir: Dataset root (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square RGB images, in pixels.
        digits_per_image: Inclusive range of digits drawn per image; a digit
            that finds no free spot is skipped, the first one always fits.
        seed: Random seed; the same arguments give byte-identical files.
        digit_size: Inclusive range of a digit's upscaled height in pixels
            (its width is jittered by a factor in 0.75..1.25). Default:
            12..40 pixels scaled by ``image_size / 128``.

    Returns:
        ``root``, ``classes``, and per split ``{split}_ann_file``,
        ``{split}_img_dir``, ``num_{split}_images``, ``num_{split}_instances``.
    """
    from sklearn.datasets import load_digits

    if not 1 <= digits_per_image[0] <= digits_per_image[1]:
        raise ValueError(f'digits_per_image must be 1 <= low <= high, got {digits_per_image}')
    if digit_size is None:
        digit_size = (max(4, round(12 * image_size / 128)), max(4, round(40 * image_size / 128)))
    if not 4 <= digit_size[0] <= digit_size[1] <= image_size:
        raise ValueError(
            f'digit_size must satisfy 4 <= low <= high <= image_size, got {digit_size}')
    out_dir = Path(out_dir)
    digits = load_digits()
    half = len(digits.images) // 2
    pools = dict(train=slice(0, half), val=slice(half, len(digits.images)))
    counts = dict(train=num_train, val=num_val)
    info = dict(
        description='Handwritten digits (scikit-learn load_digits) composed on canvases',
        seed=seed, image_size=image_size,
        digits_per_image=list(digits_per_image), digit_size=list(digit_size))
    result: dict = dict(root=out_dir, classes=DIGITS_CLASSES)
    for split_index, split in enumerate(('train', 'val')):
        ann_file, num_instances = _write_split(
            out_dir, split, counts[split],
            digits.images[pools[split]], digits.target[pools[split]], pools[split].start,
            np.random.default_rng([seed, split_index]), info,
            image_size=image_size, digits_per_image=digits_per_image,
            digit_size=digit_size)
        result[f'{split}_ann_file'] = ann_file
        result[f'{split}_img_dir'] = out_dir / 'images' / split
        result[f'num_{split}_images'] = counts[split]
        result[f'num_{split}_instances'] = num_instances
    return result
