"""Pairing CBN with its conv in real mmdet modules built through the registry with norm_cfg."""
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from torch import nn

import mmdet_cbn
from mmdet_cbn import CrossIterationBatchNorm2d, cbn_layers, pair_cbn_layers

CBN = dict(type='CBN', requires_grad=True, window_size=2)


@pytest.fixture(autouse=True)
def mmdet_scope():
    """Build in mmdet's scope even if a Runner of another test changed the default scope."""
    register_all_modules(init_default_scope=True)

MODULES = {
    'resnet50_all_stages': (
        dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
             norm_cfg=CBN, norm_eval=False, style='pytorch'),
        lambda: torch.randn(2, 3, 64, 64)),
    'resnet18': (
        dict(type='ResNet', depth=18, norm_cfg=CBN, norm_eval=False),
        lambda: torch.randn(2, 3, 64, 64)),
    'resnext50_deep_stem_avg_down': (
        dict(type='ResNeXt', depth=50, groups=4, base_width=4, deep_stem=True, avg_down=True,
             norm_cfg=CBN, norm_eval=False),
        lambda: torch.randn(2, 3, 64, 64)),
    'fpn': (
        dict(type='FPN', in_channels=[8, 16, 32], out_channels=16, num_outs=4, norm_cfg=CBN),
        lambda: [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]),
    'shared_4conv_1fc_bbox_head': (
        dict(type='Shared4Conv1FCBBoxHead', in_channels=16, conv_out_channels=16,
             fc_out_channels=32, roi_feat_size=7, num_classes=3, norm_cfg=CBN),
        lambda: torch.randn(6, 16, 7, 7)),
    'fcn_mask_head': (
        dict(type='FCNMaskHead', num_convs=4, in_channels=16, conv_out_channels=16,
             num_classes=3, norm_cfg=CBN),
        lambda: torch.randn(6, 16, 14, 14)),
}


def expected_cbn_count(model):
    return sum(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())


@pytest.mark.parametrize('name', list(MODULES))
def test_every_cbn_in_mmdet_modules_is_paired_and_trains(name):
    cfg, make_input = MODULES[name]
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    count = expected_cbn_count(model)
    assert count > 0
    pairs = pair_cbn_layers(model)
    assert len(pairs) == count
    for cbn_name, conv_name in pairs.items():
        conv = model.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d)
        assert model.get_submodule(cbn_name).paired_conv is conv
    model.train()
    for _ in range(3):  # window 2: the second and third steps use the compensated history
        out = model(make_input())
        out = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().sum() for o in out if o is not None).backward()
    assert all(layer.steps == 3 and len(layer.histories) == 1
               and layer.histories[0].filled == 1 for _, layer in cbn_layers(model))


def test_registered_norm_is_recognised_as_batchnorm_by_openmmlab_tools():
    from mmcv.cnn import build_norm_layer, is_norm
    name, layer = build_norm_layer(dict(type='CBN', window_size=3, requires_grad=False), 8,
                                   postfix=1)
    assert name == 'bn1' and isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert isinstance(layer, mmdet_cbn.CrossIterationBatchNorm2d) and is_norm(layer)
    assert layer.window_size == 3 and not layer.weight.requires_grad
    with pytest.raises(TypeError, match='window'):
        build_norm_layer(dict(type='CBN', windowsize=3), 8)


def test_resnet_norm_eval_and_frozen_stages_treat_cbn_like_bn():
    model = MODELS.build(dict(type='ResNet', depth=18, norm_cfg=CBN, norm_eval=True,
                              frozen_stages=1))
    pair_cbn_layers(model)
    model.train()
    assert all(not m.training for _, m in cbn_layers(model))
    assert not model.layer1[0].bn1.weight.requires_grad
    assert model.layer2[0].bn1.weight.requires_grad


def test_unpaired_cbn_error_names_the_module():
    model = MODELS.build(dict(type='ResNet', depth=18, norm_cfg=CBN, norm_eval=False))
    model.layer1[0].bn1 = CrossIterationBatchNorm2d(32)  # no 32-channel conv before it
    with pytest.raises(RuntimeError, match=r'layer1\.0\.bn1'):
        pair_cbn_layers(model)
