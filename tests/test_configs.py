"""Every config under ``configs/``: settings, layers and a CPU run.

Each config is built, trained for one iteration and evaluated by ``CocoMetric`` on the digits
dataset at 128 px, on CPU in one process (SyncBN becomes BN). To stay cheap, the RoI and
proposal counts are cut and val is skipped in training. The configs of the paper's
Tables 4 and 5 are also checked against their file names (model, depth, normalizer, head-only
or all layers) and the paper's training recipe, and their norm layers located in the model.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

from mmdet_cbn import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d
from smoke import cpu_smoke_cfg

CONFIG_DIR = Path(__file__).parents[1] / 'configs'
CONFIGS = sorted(p for p in CONFIG_DIR.rglob('*.py') if not {'_base_', 'mmseg'} & set(p.parts))
NAME = re.compile(r'(?P<model>faster|mask)-rcnn_r(?P<depth>50|101)_fpn_4conv1fc'
                  r'(?:-(?P<norm>bn|syncbn|gn|cbn|synccbn)-(?P<scope>head|all))?_1x_coco')
NORM_TYPES = {'bn': 'BN', 'syncbn': 'SyncBN', 'gn': 'GN', 'cbn': 'CBN', 'synccbn': 'SyncCBN'}
# Layer classes built on CPU in one process, where cpu_smoke_cfg turns SyncBN into BN (SyncCBN
# stays SyncCBN: in one process it normalizes as CBN).
NORM_CLASSES = {'BN': nn.BatchNorm2d, 'SyncBN': nn.BatchNorm2d, 'GN': nn.GroupNorm,
                'CBN': CrossIterationBatchNorm2d, 'SyncCBN': SyncCrossIterationBatchNorm2d}
CBN_NORMS = ('CBN', 'SyncCBN')


@pytest.fixture(autouse=True)
def _one_thread():
    """Run torch on one thread: on a loaded 2-core machine two threads per process spin and
    wait on each other (measured: 4 of the configs in 26 s instead of 97 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_configs_cover_the_18_rows_of_tables_4_and_5():
    names = [p.stem for p in CONFIGS if p.parent.name != 'demo']
    assert all(NAME.fullmatch(n) for n in names), names
    rows = [n for n in names if '-synccbn-' not in n]  # SyncCBN: no row of the paper
    assert len(rows) == len(set(rows)) == 18
    assert len(names) - len(rows) == 1  # mask-rcnn_r50_fpn_4conv1fc-synccbn-head_1x_coco


def check_settings(cfg: Config, row: dict) -> None:
    """The config matches its row (from the file name) and the paper's training recipe."""
    model = cfg.model
    assert model.type == {'faster': 'FasterRCNN', 'mask': 'MaskRCNN'}[row['model']]
    assert model.backbone.depth == int(row['depth'])
    head_norm = NORM_TYPES.get(row['norm'])
    heads = [model.neck, model.roi_head.bbox_head]
    assert model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    if row['model'] == 'mask':
        assert model.roi_head.mask_head.num_convs == 4
        heads.append(model.roi_head.mask_head)
    for head in heads:
        norm_cfg = head.get('norm_cfg')
        assert (norm_cfg and norm_cfg.type) == head_norm
        if head_norm == 'GN':
            assert norm_cfg.num_groups == 32
    all_layers = row['scope'] == 'all'
    backbone = model.backbone
    assert backbone.norm_cfg.type == (head_norm if all_layers else 'BN')
    assert backbone.norm_cfg.requires_grad
    assert backbone.frozen_stages == 1 and backbone.norm_eval == (not all_layers)
    if head_norm in CBN_NORMS:
        assert all(head.norm_cfg.window_size == 4 for head in heads)
        assert 'mmdet_cbn' in cfg.custom_imports.imports
        assert [dict(h) for h in cfg.custom_hooks] == [
            dict(type='CBNBurnInHook', burnin_epochs=3)]
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (
        'SGD', 0.02, 0.9, 1e-4)
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.param_scheduler[-1].milestones == [8, 11]


def check_layers(model: nn.Module, row: dict) -> None:
    """Norm layers sit where the row puts them; conv biases only where no norm follows."""
    head_norm = NORM_TYPES.get(row['norm'])
    convs = [*model.neck.lateral_convs, *model.neck.fpn_convs,
             *model.roi_head.bbox_head.shared_convs]
    assert len(model.roi_head.bbox_head.shared_convs) == 4
    if row['model'] == 'mask':
        assert len(model.roi_head.mask_head.convs) == 4
        convs += model.roi_head.mask_head.convs
    for conv in convs:
        assert isinstance(conv, ConvModule)
        if head_norm is None:
            assert not conv.with_norm and conv.conv.bias is not None
        else:
            assert type(conv.norm) is NORM_CLASSES[head_norm]
            assert conv.conv.bias is None
    backbone = model.backbone
    backbone_norm = head_norm if row['scope'] == 'all' else 'BN'
    frozen = [backbone.norm1, *[m for m in backbone.layer1.modules() if _is_norm(m)]]
    trained = [m for layer in (backbone.layer2, backbone.layer3, backbone.layer4)
               for m in layer.modules() if _is_norm(m)]
    assert all(type(m) is NORM_CLASSES[backbone_norm] for m in frozen + trained)
    model.train()
    assert not any(m.training for m in frozen)
    assert all(m.training == (row['scope'] == 'all') for m in trained)
    if head_norm in CBN_NORMS:  # CBNBurnInHook paired every layer with its conv
        cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        assert all(m.window_size == 4 and m.paired_conv is not None for m in cbn)


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BN-like (BN, SyncBN, CBN) or GN layer."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def shrink(cfg: Config) -> None:
    """Cut the work, mostly that of the 4-conv RoI heads (about 0.23 GFLOP per box RoI).

    Train on 2 images with 16 sampled RoIs each; test 2 images with 20 proposals and at
    most 5 detections (mask RoIs) each; no validation in training, no checkpoint.
    """
    cfg.train_dataloader.dataset.indices = 2
    cfg.test_dataloader.dataset.indices = 2
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    cfg.model.train_cfg.rcnn.sampler.num = 16
    cfg.model.test_cfg.rpn.update(nms_pre=100, max_per_img=20)
    cfg.model.test_cfg.rcnn.max_per_img = 5


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_evaluates(config: Path, digits_coco: Path, tmp_path: Path):
    row = NAME.fullmatch(config.stem)
    cfg = Config.fromfile(config)
    if row:
        check_settings(cfg, row.groupdict())
    with_mask = 'mask_head' in cfg.model.roi_head
    cfg = cpu_smoke_cfg(cfg, digits_coco, tmp_path, with_mask=with_mask)
    shrink(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    for kind in ('bbox', 'segm') if with_mask else ('bbox', ):
        assert f'coco/{kind}_mAP' in metrics
    if row:
        check_layers(runner.model, row.groupdict())
