"""Test helper: small CPU runs of mmdet configs on the digits dataset.

:func:`cpu_smoke_cfg` rewrites any mmdet 3.x detector config (mmdet's own
``faster-rcnn_r50_fpn_1x_coco`` / ``mask-rcnn_r50_fpn_1x_coco`` or configs that
inherit them) so that it trains and evaluates in seconds to minutes on a CPU, on
the dataset written by :func:`digits_coco.make_digits_coco` (``experiments/``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmengine.config import Config

from digits_coco import DIGITS_CLASSES

# Norm layers that need a process group; a single CPU process uses plain BN.
_SYNC_NORMS = frozenset({'SyncBN', 'MMSyncBN', 'NaiveSyncBN'})
# Keys of resize transforms that hold target scales.
_SCALE_KEYS = ('scale', 'scales', 'img_scale')


def load_mmdet_config(rel_path: str) -> Config:
    """Load a config packaged with mmdet (``mmdet/.mim/configs``).

    Args:
        rel_path: Path relative to mmdet's ``configs`` folder, for example
            ``'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'``.

    Returns:
        The loaded config.
    """
    import mmdet

    return Config.fromfile(Path(mmdet.__file__).parent / '.mim' / 'configs' / rel_path)


def walk(node: Any, visit: Callable[[dict, Any], None], parent_key: Any = None) -> None:
    """Call ``visit(d, key)`` on every dict ``d`` nested in ``node`` (pre-order)."""
    if isinstance(node, dict):
        visit(node, parent_key)
        for key, value in node.items():
            walk(value, visit, key)
    elif isinstance(node, (list, tuple)):
        for value in node:
            walk(value, visit, parent_key)


def _is_scale(value: Any) -> bool:
    """Whether ``value`` is one ``(w, h)`` scale."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) for v in value))


def _rescale(value: Any, img_scale: tuple[int, int]) -> Any:
    """Replace one scale, or every scale in a list of scales, by ``img_scale``."""
    if _is_scale(value):
        return tuple(img_scale)
    if isinstance(value, (list, tuple)) and all(_is_scale(v) for v in value):
        return [tuple(img_scale) for _ in value]
    return value


def _set_pipeline(node: Any, img_scale: tuple[int, int], with_mask: bool) -> None:
    """Shrink the resize scales and set mask loading in every pipeline under ``node``."""
    def visit(transform: dict, _key: Any) -> None:
        kind = transform.get('type')
        if not isinstance(kind, str):
            return
        if 'Resize' in kind:
            for key in _SCALE_KEYS:
                if key in transform:
                    transform[key] = _rescale(transform[key], img_scale)
        elif kind == 'LoadAnnotations':
            transform['with_mask'] = with_mask

    walk(node, visit)


def _innermost_dataset(dataset: dict) -> dict:
    """Follow dataset wrappers (``RepeatDataset``, ...) down to the real dataset."""
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    return dataset


def _set_dataloader(loader: dict, data_root: Path, split: str, batch_size: int,
                    img_scale: tuple[int, int], with_mask: bool) -> None:
    """Point a dataloader config at one split of the digits dataset."""
    loader.update(batch_size=batch_size, num_workers=0, persistent_workers=False)
    dataset = _innermost_dataset(loader['dataset'])
    dataset.update(
        data_root=str(data_root),
        ann_file=f'annotations/{split}.json',
        data_prefix=dict(img=f'images/{split}/'),
        metainfo=dict(classes=DIGITS_CLASSES),
    )
    _set_pipeline(loader['dataset'], img_scale, with_mask)


def _is_pretrained(init_cfg: Any) -> bool:
    """Whether ``init_cfg`` is a ``Pretrained`` initialiser (which downloads weights)."""
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def drop_pretrained(node: dict) -> None:
    """Remove ``Pretrained`` initialisers from one config dict (no downloads)."""
    init_cfg = node.get('init_cfg')
    if _is_pretrained(init_cfg):
        node['init_cfg'] = None
    elif isinstance(init_cfg, (list, tuple)):
        node['init_cfg'] = [i for i in init_cfg if not _is_pretrained(i)] or None


def _set_model(model: dict) -> None:
    """Drop pretrained weights and set 10 classes."""
    num_classes = len(DIGITS_CLASSES)

    def visit(node: dict, key: Any) -> None:
        drop_pretrained(node)
        if 'num_classes' in node and key != 'rpn_head':
            node['num_classes'] = num_classes

    walk(model, visit)


def _replace_sync_norms(cfg: Config) -> None:
    """Replace every sync norm layer type in ``cfg`` (model or variables) by ``BN``."""
    def visit(node: dict, _key: Any) -> None:
        if node.get('type') in _SYNC_NORMS:
            node['type'] = 'BN'

    for key in cfg:
        walk(cfg[key], visit)


def cpu_smoke_cfg(
    cfg: Config,
    data_root: str | Path,
    work_dir: str | Path,
    *,
    img_scale: tuple[int, int] = (128, 128),
    max_iters_or_epochs: int = 1,
    with_mask: bool = False,
    batch_size: int = 2,
    seed: int | None = 0,
) -> Config:
    """Return a copy of ``cfg`` rewritten for a tiny single-process CPU run on the digits.

    The rewrite keeps the model, the pipelines' structure, the optimiser, the LR
    schedule and ``auto_scale_lr`` (mind the 1x schedule's 500-iteration linear
    warm-up: a run shorter than that trains at a fraction of the base LR); it changes:

    * train/val/test dataloaders: the digits dataset under ``data_root``
      (``annotations/{train,val}.json``, ``images/{train,val}/``, val also
      for test), ``metainfo=dict(classes=DIGITS_CLASSES)``, ``batch_size``,
      ``num_workers=0``, ``persistent_workers=False``;
    * pipelines: every scale of a ``*Resize`` transform becomes ``img_scale``,
      ``LoadAnnotations(with_mask=with_mask)``;
    * model: ``Pretrained`` ``init_cfg`` removed (no download), every
      ``num_classes`` except the RPN's set to 10; ``load_from=None``;
    * norms: ``SyncBN``/``MMSyncBN``/``NaiveSyncBN`` replaced by ``BN``
      everywhere in the config (other norms, e.g. ``CBN``, are kept);
    * evaluators: ``CocoMetric`` on ``annotations/val.json`` with ``bbox``
      (and ``segm`` when ``with_mask``);
    * ``train_cfg``: ``max_epochs`` (epoch loop) or ``max_iters`` (iteration
      loop) set to ``max_iters_or_epochs``, ``val_interval`` capped by it;
    * hooks: checkpoint every epoch/iteration, log every iteration, no
      visualisation drawing; ``work_dir``; ``randomness.seed`` when ``seed``
      is not None.

    Args:
        cfg: An mmdet detector config.
        data_root: Root written by :func:`digits_coco.make_digits_coco` (``experiments/``).
        work_dir: Runner work directory (logs, checkpoints).
        img_scale: ``(w, h)`` scale that replaces every resize scale.
        max_iters_or_epochs: Length of training in the unit of the train loop.
        with_mask: Load masks and evaluate ``segm`` too (Mask R-CNN).
        batch_size: Batch size of all three dataloaders.
        seed: Runner seed, or None to keep the config's randomness.

    Returns:
        The rewritten copy; ``cfg`` is not modified.
    """
    cfg = copy.deepcopy(cfg)
    data_root = Path(data_root)
    for name, split in (('train_dataloader', 'train'), ('val_dataloader', 'val'),
                        ('test_dataloader', 'val')):
        _set_dataloader(cfg[name], data_root, split, batch_size, img_scale, with_mask)

    _set_model(cfg.model)
    _replace_sync_norms(cfg)
    cfg.load_from = None

    evaluator = dict(type='CocoMetric', ann_file=str(data_root / 'annotations' / 'val.json'),
                     metric=['bbox', 'segm'] if with_mask else ['bbox'],
                     format_only=False, backend_args=None)
    cfg.val_evaluator = copy.deepcopy(evaluator)
    cfg.test_evaluator = evaluator

    if 'max_iters' in cfg.train_cfg or cfg.train_cfg.get('type') == 'IterBasedTrainLoop':
        cfg.train_cfg.max_iters = max_iters_or_epochs
    else:
        cfg.train_cfg.max_epochs = max_iters_or_epochs
    if 'val_interval' in cfg.train_cfg:
        cfg.train_cfg.val_interval = min(cfg.train_cfg.val_interval, max_iters_or_epochs)

    cfg.default_hooks.checkpoint.interval = 1
    cfg.default_hooks.logger.interval = 1
    if 'visualization' in cfg.default_hooks:
        cfg.default_hooks.visualization.draw = False
    cfg.work_dir = str(work_dir)
    if seed is not None:
        cfg.randomness = dict(seed=seed)
    return cfg

