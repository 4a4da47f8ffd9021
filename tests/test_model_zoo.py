"""CBN in mmdet's model zoo: mmdet 3.3's own packaged configs with every BN/GN/SyncBN as CBN.

Each case loads a config from ``mmdet/.mim/configs``, switches every norm layer to
``dict(type='CBN', window_size=3, requires_grad=True)``, drops pretrained weights, unfreezes
every stage and norm layer (so that every CBN layer trains), shrinks the proposal and test
settings, then pairs the CBN layers, trains 3 iterations (SGD through mmengine's
``OptimWrapper``, ``model.train_step``) on two small random images with a few random boxes
(and masks), and runs one eval forward (``model.val_step``).

Behaviour checked: every CBN layer is paired; every CBN layer runs in training; the losses
are finite; ``steps`` counts iterations (3), not calls; ``num_call_sites`` is the number of
times a layer runs per iteration (5 for a head shared across the FPN levels); gradient
checkpointing (``with_cp=True``) trains exactly like the same model without it; the eval
forward returns predictions for each image. Run with ``pytest -s`` to see the per-architecture
counts.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmdet.utils import register_all_modules
from mmengine.logging import MMLogger
from mmengine.optim import OptimWrapper
from mmengine.structures import InstanceData
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet_cbn import cbn_layers, pair_cbn_layers
from smoke import drop_pretrained, load_mmdet_config, walk

CBN_CFG = dict(type='CBN', window_size=3, requires_grad=True)
# Norm types replaced by CBN (sync norms included: a single CPU process).
NORM_TYPES = frozenset({'BN', 'BN2d', 'GN', 'SyncBN', 'MMSyncBN', 'NaiveSyncBN'})
ITERS = 3
IMG_SIZE = 64
NUM_BOXES = (2, 3)

# config: under mmdet/.mim/configs; covers: what the case is for; model: overrides of
# cfg.model; shared_head: prefix of the modules run once per FPN level; with_mask: mask head.
ARCHS: dict[str, dict[str, Any]] = {
    'fcos_r50_gn_head': dict(
        config='fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
        covers='one-stage, GN head shared across 5 FPN levels, caffe ResNet-50',
        shared_head='bbox_head.'),
    'mask_rcnn_r50_gn_all': dict(
        config='gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py',
        covers='two-stage, GN everywhere (backbone, FPN, 4conv1fc box head, mask head)',
        with_mask=True),
    'retinanet_regnetx_800mf': dict(
        config='regnet/retinanet_regnetx-800MF_fpn_1x_coco.py',
        covers='RegNetX backbone: grouped 3x3 convs'),
    'retinanet_r18': dict(
        config='retinanet/retinanet_r18_fpn_1x_coco.py',
        covers='ResNet-18: BasicBlock'),
    'retinanet_r18_with_cp': dict(
        config='retinanet/retinanet_r18_fpn_1x_coco.py',
        covers='ResNet-18 with gradient checkpointing (with_cp=True)',
        model=dict(backbone=dict(with_cp=True))),
    'yolox_nano': dict(
        config='yolox/yolox_nano_8xb8-300e_coco.py',
        covers='YOLOX: CSPDarknet, PAFPN and head with depthwise separable convs'),
    'rtmdet_tiny': dict(
        config='rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
        covers='RTMDet: CSPNeXt with depthwise convs; SepBN head: one conv shared by 3 levels, '
               'a norm layer per level'),
}


@pytest.fixture(autouse=True)
def mmdet_scope():
    """Build in mmdet's scope even if a Runner of another test changed the default scope."""
    register_all_modules(init_default_scope=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Run torch on one thread: on a loaded 2-core machine two threads per process spin and
    wait on each other (measured here: RegNetX-800MF and ResNet-18 in 3.5 s instead of 50 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _default_norms(node: dict) -> dict[str, dict]:
    """The ``*norm_cfg`` arguments of ``node``'s class whose defaults are BN/GN and not set."""
    kind = node.get('type')
    cls = MODELS.get(kind) if isinstance(kind, str) else None
    if not inspect.isclass(cls):
        return {}
    return {name: param.default
            for name, param in inspect.signature(cls.__init__).parameters.items()
            if name.endswith('norm_cfg') and name not in node
            and isinstance(param.default, dict) and param.default.get('type') in NORM_TYPES}


def to_cbn(model_cfg: dict) -> int:
    """Replace every BN/GN/SyncBN config under ``model_cfg`` by CBN; return how many.

    Norms that a module builds by default (FCOS's and ATSS's GN heads: ``norm_cfg`` is not in
    the config) are set explicitly first."""
    replaced = 0

    def visit(node: dict, _key: Any) -> None:
        nonlocal replaced
        node.update(_default_norms(node))
        for key, value in node.items():
            if isinstance(value, dict) and value.get('type') in NORM_TYPES:
                node[key] = copy.deepcopy(CBN_CFG)  # GN's num_groups etc. dropped
                replaced += 1

    walk(model_cfg, visit)
    return replaced


def prepare(model_cfg: dict) -> None:
    """No pretrained weights, every stage and norm layer trainable, small proposal counts."""
    def visit(node: dict, key: Any) -> None:
        drop_pretrained(node)
        if 'norm_eval' in node:
            node['norm_eval'] = False
        if 'frozen_stages' in node:
            node['frozen_stages'] = -1
        if isinstance(node.get('nms_pre'), int):
            node['nms_pre'] = min(node['nms_pre'], 200)
        if isinstance(node.get('max_per_img'), int):
            node['max_per_img'] = min(node['max_per_img'], 64 if key == 'rpn_proposal' else 20)
        if key == 'sampler' and isinstance(node.get('num'), int):
            node['num'] = min(node['num'], 32)

    walk(model_cfg, visit)
    # YOLOX resizes whole batches to 320-640 pixels every 10 iterations: keep the images small.
    model_cfg.get('data_preprocessor', {}).pop('batch_augments', None)


def build_model(arch: dict) -> tuple[torch.nn.Module, int]:
    """Build the detector of ``arch``; return it and the number of norm configs replaced."""
    cfg = load_mmdet_config(arch['config'])
    model_cfg = copy.deepcopy(cfg.model)
    for part, overrides in arch.get('model', {}).items():
        model_cfg[part].update(overrides)
    replaced = to_cbn(model_cfg)
    prepare(model_cfg)
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter's initialiser
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model, replaced


def make_batch(num_classes: int, with_mask: bool) -> dict:
    """Two random ``IMG_SIZE`` images with a few random boxes (and box-shaped masks)."""
    rng = np.random.RandomState(0)
    inputs, samples = [], []
    for idx, num in enumerate(NUM_BOXES):
        inputs.append(torch.from_numpy(
            rng.randint(0, 256, size=(3, IMG_SIZE, IMG_SIZE)).astype(np.uint8)))
        xy = rng.uniform(0, IMG_SIZE * 0.6, size=(num, 2))
        wh = rng.uniform(IMG_SIZE * 0.15, IMG_SIZE * 0.4, size=(num, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, IMG_SIZE - 1)], axis=1)
        sample = DetDataSample(metainfo=dict(
            img_id=idx, img_shape=(IMG_SIZE, IMG_SIZE), ori_shape=(IMG_SIZE, IMG_SIZE),
            scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        gt = InstanceData()
        gt.bboxes = torch.tensor(boxes, dtype=torch.float32)
        gt.labels = torch.tensor(rng.randint(0, num_classes, size=num), dtype=torch.long)
        if with_mask:
            masks = np.zeros((num, IMG_SIZE, IMG_SIZE), dtype=np.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
                mask[y1:y2 + 1, x1:x2 + 1] = 1
            gt.masks = BitmapMasks(masks, IMG_SIZE, IMG_SIZE)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def num_classes_of(model: torch.nn.Module) -> int:
    head = getattr(model, 'bbox_head', None) or model.roi_head.bbox_head
    return head.num_classes


def train(model: torch.nn.Module, batch: dict) -> tuple[list[float], Counter]:
    """Pair, then train ``ITERS`` SGD iterations; return the losses and CBN calls per layer."""
    calls: Counter = Counter()
    hooks = [layer.register_forward_pre_hook(
        lambda m, _args, name=name: calls.update([name]) if m.training else None)
        for name, layer in cbn_layers(model)]
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9),
                         clip_grad=dict(max_norm=10.0))
    model.train()
    losses = []
    torch.manual_seed(0)
    try:
        for _ in range(ITERS):
            log_vars = model.train_step(copy.deepcopy(batch), optim)
            losses.append(float(log_vars['loss'].detach()))
    finally:
        for hook in hooks:
            hook.remove()
    return losses, calls


@pytest.mark.parametrize('name', list(ARCHS))
def test_model_zoo_architecture_trains_with_cbn_everywhere(name):
    arch = ARCHS[name]
    model, replaced = build_model(arch)
    layers = cbn_layers(model)
    assert replaced > 0 and layers, f'{name}: no norm layer became CBN'
    others = [n for n, m in model.named_modules()
              if isinstance(m, (_BatchNorm, nn.GroupNorm)) and n not in dict(layers)]
    assert not others, f'{name}: norm layers left as BN/GN: {others}'
    pairs = pair_cbn_layers(model)  # strict: raises naming any unpaired layer
    print(f'\n{name} ({arch["config"]}; {arch["covers"]}): {len(layers)} CBN layers, '
          f'{len(pairs)} paired')
    assert sorted(pairs) == sorted(n for n, _ in layers)
    for cbn_name, conv_name in pairs.items():
        assert model.get_submodule(cbn_name).paired_conv is model.get_submodule(conv_name)

    batch = make_batch(num_classes_of(model), arch.get('with_mask', False))
    losses, calls = train(model, batch)
    print(f'{name}: losses {[round(v, 4) for v in losses]}')

    problems = []  # collected so that one failing check does not hide the others
    if not all(math.isfinite(v) for v in losses):
        problems.append(f'non-finite losses {losses}')
    not_run = [n for n, _ in layers if calls[n] == 0]
    if not_run:
        problems.append(f'{len(not_run)} CBN layers never ran in training: {not_run[:5]}')

    expected_calls = calls  # calls per layer in ITERS iterations, each call one call site
    if arch.get('model', {}).get('backbone', {}).get('with_cp'):
        # Checkpointing reruns the forward in backward: the reference is the same model
        # without it, which must train identically (same losses, same parameters).
        plain_arch = {**arch, 'model': {'backbone': {'with_cp': False}}}
        plain, _ = build_model(plain_arch)
        pair_cbn_layers(plain)
        plain_losses, expected_calls = train(plain, batch)
        if not np.allclose(losses, plain_losses, rtol=1e-6, atol=1e-6):
            problems.append(f'with_cp losses {losses} != without with_cp {plain_losses}')
        plain_params = dict(plain.named_parameters())
        diff = max((p - plain_params[n]).abs().max().item()
                   for n, p in model.named_parameters())
        if diff > 1e-6:
            problems.append(f'with_cp parameters differ from without with_cp by {diff:.3g}')

    model.eval()
    with torch.no_grad():
        results = model.val_step(copy.deepcopy(batch))
    if len(results) != len(NUM_BOXES):
        problems.append(f'{len(results)} predictions for {len(NUM_BOXES)} images')
    for result in results:
        pred = result.pred_instances
        if not (pred.bboxes.dim() == 2 and pred.bboxes.shape[1] == 4
                and len(pred.scores) == len(pred.labels) == len(pred.bboxes)):
            problems.append(f'malformed prediction {pred}')
        if arch.get('with_mask') and len(pred.masks) != len(pred.bboxes):
            problems.append(f'{len(pred.masks)} masks for {len(pred.bboxes)} boxes')

    # steps count iterations, not calls (a shared head is called once per FPN level).
    wrong_steps = Counter(layer.steps for n, layer in layers if calls[n] and layer.steps != ITERS)
    if wrong_steps:
        problems.append(f'steps != {ITERS} after {ITERS} iterations: '
                        f'{dict(wrong_steps)} (steps: number of layers)')
    # num_call_sites: how many times the layer runs per iteration.
    wrong_sites = Counter(
        (expected_calls[n] // ITERS, getattr(layer, 'num_call_sites', None))
        for n, layer in layers
        if calls[n] and getattr(layer, 'num_call_sites', None) != expected_calls[n] // ITERS)
    if wrong_sites:
        problems.append('num_call_sites wrong: {(expected, reported): number of layers} = '
                        f'{dict(wrong_sites)}')
    if 'shared_head' in arch:
        head = [n for n, _ in layers if n.startswith(arch['shared_head'])]
        print(f'{name}: {len(head)} head CBN layers, calls per iteration '
              f'{sorted({expected_calls[n] // ITERS for n in head})}')
        assert head and all(expected_calls[n] == 5 * ITERS for n in head)  # 5 FPN levels
        sites = {getattr(model.get_submodule(n), 'num_call_sites', None) for n in head}
        if sites != {5}:
            problems.append(f'shared head CBN num_call_sites {sites}, expected {{5}}')
    assert not problems, f'{name}:\n' + '\n'.join(problems)
