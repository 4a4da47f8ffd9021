"""CBN in MMSegmentation 1.2.2: the stack, ``configs/mmseg``, pairing in mmseg's heads, a
one-iteration run scored by ``IoUMetric`` on the digits segmentation set, and the smoke run of
``experiments/seg_demo.py``.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

import mmdet_cbn
from digits_seg import SEG_CLASSES, label_map, make_digits_seg

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'configs/mmseg'
CONFIGS = sorted(CONFIG_DIR.glob('*.py'))
CITYSCAPES = re.compile(r'(?P<algo>pspnet|deeplabv3plus)_r50-d8-(?P<norm>cbn|bn|syncbn)'
                        r'_4xb2-(?P<sched>40k|80k)_cityscapes-512x1024')
NORM_TYPES = {'cbn': 'CBN', 'bn': 'BN', 'syncbn': 'SyncBN', 'gn': 'GN'}
HEADS = ('backbone', 'decode_head', 'auxiliary_head')
# Keys that select the CBN gradient: the configs leave it at the layer's default.
GRADIENT_KEYS = ('backprop_past_stats', 'detach_compensation')


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: two threads per process spin against each other on a loaded 2-core
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def digits_seg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny digits segmentation set (8 train and 4 val images, 64x64)."""
    root = tmp_path_factory.mktemp('digits_seg')
    make_digits_seg(root, num_train=8, num_val=4, seed=0)
    return root


def test_stack_has_mmseg_1_2_2():
    import mmseg
    import mmseg.models  # noqa: F401  (imports ftfy and regex at start-up)

    assert mmseg.__version__ == '1.2.2'
    runtime = (REPO / 'requirements/runtime.txt').read_text().split()
    extras = (REPO / 'requirements/extras.txt').read_text().split()
    assert 'mmsegmentation==1.2.2' in runtime and {'ftfy', 'regex'} <= set(extras)
    assert 'mmseg' in (REPO / 'tools/install.sh').read_text()  # the "installed" probe


def mmseg_config(name: str) -> Path:
    """The path of one of mmseg's packaged configs (what ``mmseg::NAME`` in ``_base_`` means)."""
    import mmseg

    return Path(mmseg.__file__).parent / '.mim/configs' / name


def _plain(node):
    """A config node as plain containers, without the ``_scope_`` keys that inheriting through
    ``mmseg::`` adds."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if k != '_scope_'}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _norm_cfgs(node, path: str = 'model'):
    """Every ``norm_cfg`` under a config node, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'norm_cfg':
                yield f'{path}.{key}', value
            else:
                yield from _norm_cfgs(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _norm_cfgs(value, f'{path}[{i}]')


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_config_loads(config: Path):
    cfg = Config.fromfile(config)
    assert cfg.default_scope == 'mmseg'
    norm = next(n for n in ('cbn', 'syncbn', 'bn', 'gn') if f'-{n}_' in config.stem)
    norms = dict(_norm_cfgs(cfg.model))
    assert len(norms) == 3 and {n.type for n in norms.values()} == {NORM_TYPES[norm]}, norms
    if norm == 'cbn':
        assert 'mmdet_cbn' in cfg.custom_imports.imports
        for n in norms.values():
            assert n.window_size * cfg.train_dataloader.batch_size >= 16
            assert not set(GRADIENT_KEYS) & set(n)
        hooks = [h for h in cfg.get('custom_hooks', []) if h.type == 'CBNBurnInHook']
        assert len(hooks) == 1 and 0 < hooks[0].burnin_iters < cfg.train_cfg.max_iters
    row = CITYSCAPES.fullmatch(config.stem)
    if row:  # mmseg's own config, with only the normalizer changed
        algo, sched = row['algo'], row['sched']
        mmseg_cfg = Config.fromfile(
            mmseg_config(f'{algo}/{algo}_r50-d8_4xb2-{sched}_cityscapes-512x1024.py'))
        assert mmseg_cfg.model.backbone.norm_cfg.type == 'SyncBN'
        for key in ('train_cfg', 'optim_wrapper', 'param_scheduler', 'train_dataloader',
                    'test_dataloader', 'val_evaluator'):
            assert _plain(cfg[key]) == _plain(mmseg_cfg[key]), key
        for part in ('type', 'pretrained', 'data_preprocessor'):
            assert _plain(cfg.model[part]) == _plain(mmseg_cfg.model[part]), part
        for head in HEADS:
            ours = {k: v for k, v in _plain(cfg.model[head]).items() if k != 'norm_cfg'}
            theirs = {k: v for k, v in _plain(mmseg_cfg.model[head]).items() if k != 'norm_cfg'}
            assert ours == theirs, head
        assert cfg.train_cfg.max_iters == int(sched[:-1]) * 1000


def test_cityscapes_configs_cover_pspnet_and_deeplabv3plus():
    rows = {(m['algo'], m['norm'], m['sched']) for p in CONFIGS
            if (m := CITYSCAPES.fullmatch(p.stem))}
    assert rows == {(a, n, s) for a in ('pspnet', 'deeplabv3plus') for n in ('cbn', 'bn', 'syncbn')
                    for s in ('40k', '80k')}


def _small_model(config: str | Path, norm_cfg: dict | None = None) -> nn.Module:
    """An mmseg model from ``config`` built from scratch (no pretrained weights), norm
    optionally replaced, in train mode."""
    import mmseg.models  # noqa: F401  (registers mmseg's models)
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(config)
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    if norm_cfg is not None:
        for head in HEADS:
            cfg.model[head].norm_cfg = norm_cfg
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model).train()


def _train_steps(model: nn.Module, steps: int, size: int = 64, batch: int = 2) -> None:
    """``steps`` SGD steps of the segmentor's losses on random images and labels."""
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, generator=generator)
        samples = []
        for _ in range(batch):
            sample = SegDataSample(metainfo=dict(img_shape=(size, size), pad_shape=(size, size)))
            labels = torch.randint(0, 19, (1, size, size), generator=generator)
            sample.gt_sem_seg = PixelData(data=labels)
            samples.append(sample)
        losses = model.loss(images, samples)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


MODELS_TO_PAIR = {
    # PSP head (pyramid pooling module: 1x1, 2x2, 3x3 and 6x6 pooled maps) + FCN auxiliary head
    'pspnet': CONFIG_DIR / 'pspnet_r50-d8-cbn_4xb2-40k_cityscapes-512x1024.py',
    # depthwise-separable ASPP (1x1 branch, dilated depthwise 3x3 + pointwise), image pooling
    # on a 1x1 map, c1 bottleneck, separable decoder convs + FCN auxiliary head
    'deeplabv3plus': CONFIG_DIR / 'deeplabv3plus_r50-d8-cbn_4xb2-40k_cityscapes-512x1024.py',
    # plain ASPP with dilated 3x3 convs (DeepLabV3), mmseg's own config with CBN swapped in
    'deeplabv3': 'deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py',
}


@pytest.mark.parametrize('name', list(MODELS_TO_PAIR))
def test_every_cbn_layer_of_mmseg_models_pairs_and_trains(name: str):
    norm_cfg = dict(type='CBN', requires_grad=True, window_size=2)
    if name == 'deeplabv3':
        model = _small_model(mmseg_config(MODELS_TO_PAIR[name]), norm_cfg)
    else:
        model = _small_model(MODELS_TO_PAIR[name])
    layers = mmdet_cbn.cbn_layers(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert layers and len(layers) == len(norms)  # every norm layer is CBN
    pairs = mmdet_cbn.pair_cbn_layers(model)
    assert set(pairs) == {n for n, _ in layers}
    for cbn_name, conv_name in pairs.items():
        conv, cbn = model.get_submodule(conv_name), model.get_submodule(cbn_name)
        assert cbn.paired_conv is conv and conv.out_channels == cbn.num_features
    depthwise = [n for n in pairs.values() if model.get_submodule(n).groups > 1]
    dilated = [n for n in pairs.values() if max(model.get_submodule(n).dilation) > 1]
    assert dilated and (name != 'deeplabv3plus' or depthwise)
    # Two steps with the full window (8 in the configs, no burn-in outside a Runner): the
    # second uses the first's statistics; every layer checks at run time that its input is its
    # paired conv's output.
    _train_steps(model, steps=2, size=32 if name == 'pspnet' else 64)
    assert all(layer.window == layer.window_size > 1 and int(layer.num_batches_tracked) == 2
               for _, layer in layers)


@pytest.mark.parametrize('norm', ['BN', 'CBN'])
def test_pooled_1x1_map_with_batch_1_raises_like_bn(norm: str):
    from mmengine.registry import DefaultScope
    from mmseg.models.decode_heads import PSPHead

    norm_cfg = dict(type=norm, requires_grad=True)
    if norm == 'CBN':
        norm_cfg['window_size'] = 8
    with DefaultScope.overwrite_default_scope('mmseg'):  # its loss is in mmseg's registry
        head = PSPHead(in_channels=16, channels=8, num_classes=3, pool_scales=(1, 2),
                       norm_cfg=norm_cfg).train()
    assert head.psp_modules[0][0].output_size == 1  # the image-level (1x1) pooled branch
    layers = [layer for _, layer in mmdet_cbn.cbn_layers(head)]
    if norm == 'CBN':
        mmdet_cbn.pair_cbn_layers(head)

    def step(images: torch.Tensor) -> torch.Tensor:
        for layer in layers:  # what CBNBurnInHook does before every training iteration
            layer.new_iteration()
        return head([images])

    x = torch.randn(1, 16, 8, 8)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        step(x)
    if norm == 'CBN':
        # Once the window holds past statistics, one image is enough, unlike BN.
        step(torch.randn(2, 16, 8, 8))
        assert torch.isfinite(step(x)).all()
    head.eval()  # inference uses the running statistics
    assert torch.isfinite(head([x])).all()


def test_digits_seg_masks_are_the_ink_pixels(digits_seg: Path):
    from PIL import Image
    import numpy as np

    data = json.loads((digits_seg / 'annotations/train.json').read_text())
    image = data['images'][0]
    anns = [a for a in data['annotations'] if a['image_id'] == image['id']]
    mask = np.array(Image.open(digits_seg / 'masks/train' / image['file_name']))
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert (mask == label_map(anns, 64, 64)).all()
    assert sorted(np.unique(mask)[1:]) == sorted({a['category_id'] for a in anns})
    assert sum(a['area'] for a in anns) == (mask > 0).sum()
    assert len(SEG_CLASSES) == 11 and SEG_CLASSES[0] == 'background'


def test_cbn_segmentor_trains_and_is_scored_by_iou_metric(digits_seg: Path, tmp_path: Path):
    cfg = Config.fromfile(CONFIG_DIR / 'pspnet_r18-d8-cbn_1xb2-2.5k_digits-64x64.py')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(digits_seg)
    cfg.train_cfg.max_iters = 2  # iteration 1 at window 1 (burn-in), iteration 2 at window 8
    cfg.custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1)]
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.work_dir = str(tmp_path)
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.train()
    layers = mmdet_cbn.cbn_layers(runner.model)
    norms = [m for m in runner.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == len(norms) == 23  # stem 3, blocks 12, downsample 2, heads 6
    assert all(layer.paired_conv is not None for _, layer in layers)
    assert all(layer.window == 8 and int(layer.num_batches_tracked) == 2 for _, layer in layers)
    metrics = runner.test()
    assert set(metrics) == {'aAcc', 'mIoU', 'mAcc'}
    assert all(0.0 <= float(v) <= 100.0 for v in metrics.values())


def test_seg_demo_quick(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, 'experiments/seg_demo.py', '--quick', '--work-dir', str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ('| BN |', '| CBN |', '| GN |'):
        assert label in proc.stdout
    results = json.loads((tmp_path / 'seg_results.json').read_text())
    assert results['quick'] is True and len(results['runs']) == 3
    for run in results['runs']:
        assert 0.0 <= run['mIoU'] <= 100.0 and run['iterations'] == 6
        assert all(math.isfinite(loss) for _, loss in run['loss_curve'])
        if run['arm'] == 'cbn':
            assert run['cbn_layers'] == run['cbn_paired'] == 23
    assert (tmp_path / 'seg_results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_digits_pspnet_with_cbn_traces_without_graph_breaks():
    """The CBN layers of mmseg's PSPNet (ResNet-18-D8, PPM on 1x1-6x6 pooled maps, FCN
    auxiliary head) trace whole in training mode: dynamo finds no graph break in the
    backbone and both heads, windows full."""
    model = _small_model(CONFIG_DIR / 'pspnet_r18-d8-cbn_1xb2-2.5k_digits-64x64.py')
    mmdet_cbn.pair_cbn_layers(model)

    def features(images):
        feats = model.extract_feat(images)
        return model.decode_head(feats), model.auxiliary_head(feats)
    for _ in range(3):  # eager first (the one-time conv check), windows filling
        decoded, auxiliary = features(torch.randn(2, 3, 32, 32))
        (decoded.square().mean() + auxiliary.square().mean()).backward()
    explanation = torch._dynamo.explain(features)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert all(layer.steps == 4 for _, layer in mmdet_cbn.cbn_layers(model))
