"""The pinned stack is real: versions, compiled ops, and mmdet's own Faster R-CNN on CPU.

mmdet's packaged ``faster-rcnn_r50_fpn_1x_coco`` config is built on CPU with
pretrained init disabled, trains one iteration on the digits COCO dataset, is
evaluated by mmdet's ``CocoMetric`` (pycocotools) in a test pass, and a checkpoint
saved by the Runner loads back with ``resume=True`` (through torch's safe loader, with
``runner_checkpoint_globals``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import mmcv
import mmdet
import mmengine
import numpy as np
import torch
from mmcv.ops import RoIAlign, nms
from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules
from mmengine.runner import Runner

from digits_coco import DIGITS_CLASSES
from mmdet_cbn.compat import runner_checkpoint_globals
from smoke import cpu_smoke_cfg, load_mmdet_config

FASTER_RCNN = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
MASK_RCNN = 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
BBOX_KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75',
             'coco/bbox_mAP_s', 'coco/bbox_mAP_m', 'coco/bbox_mAP_l')


def test_pinned_versions() -> None:
    assert torch.__version__.split('+')[0] == '2.13.0'
    assert mmengine.__version__ == '0.10.7'
    assert mmcv.__version__ == '2.1.0'
    assert mmdet.__version__ == '3.3.0'
    assert int(np.__version__.split('.')[0]) == 2


def test_mmcv_compiled_ops_run_on_cpu() -> None:
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feats = torch.arange(16.).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])
    pooled = RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=1, aligned=False)(
        feats, rois)
    # Bin centres sit at (1, 1), (3, 1), (1, 3), (3, 3): bilinear samples of the ramp.
    torch.testing.assert_close(pooled.flatten(), torch.tensor([5., 7., 13., 15.]))


def test_opencv_and_mmcv_image_io(tmp_path: Path) -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[5:15, 10:20] = (255, 0, 0)  # blue in BGR
    path = tmp_path / 'image.png'
    assert mmcv.imwrite(image, str(path))
    loaded = mmcv.imread(str(path))
    np.testing.assert_array_equal(loaded, image)
    np.testing.assert_array_equal(mmcv.bgr2rgb(loaded)[10, 15], (0, 0, 255))
    assert mmcv.imresize(loaded, (60, 40), interpolation='nearest').shape == (40, 60, 3)
    assert cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape \
        == (20, 30, 3)


def test_cpu_smoke_cfg_rewrites_mask_rcnn(digits_coco: Path, tmp_path: Path) -> None:
    original = load_mmdet_config(MASK_RCNN)
    original.model.roi_head.mask_head.norm_cfg = dict(type='SyncBN', requires_grad=True)
    original.model.neck.norm_cfg = dict(type='CBN', buffer_num=3)
    before = copy.deepcopy(original)
    cfg = cpu_smoke_cfg(original, digits_coco, tmp_path, img_scale=(96, 64), with_mask=True)

    assert original.to_dict() == before.to_dict(), 'the input config is not modified'
    model = cfg.model
    assert model.backbone.init_cfg is None
    assert model.roi_head.bbox_head.num_classes == model.roi_head.mask_head.num_classes == 10
    assert model.roi_head.mask_head.norm_cfg.type == 'BN'
    assert 'SyncBN' not in cfg.pretty_text
    assert model.neck.norm_cfg == dict(type='CBN', buffer_num=3)
    assert cfg.train_dataloader.num_workers == 0
    assert not cfg.val_dataloader.persistent_workers
    assert cfg.val_evaluator.metric == ['bbox', 'segm']
    assert cfg.train_cfg.max_epochs == 1
    assert cfg.auto_scale_lr == before.auto_scale_lr

    register_all_modules()
    # mmdet's test pipeline loads annotations after the resize, at the original scale.
    for loader, split, mask_size in ((cfg.train_dataloader, 'train', 64),
                                     (cfg.test_dataloader, 'val', 128)):
        dataset = DATASETS.build(loader.dataset)
        assert dataset.metainfo['classes'] == DIGITS_CLASSES
        assert len(dataset) == len(list((digits_coco / 'images' / split).iterdir()))
        sample = dataset[0]
        # 128x128 fitted into (96, 64) with the aspect ratio kept.
        assert tuple(sample['inputs'].shape) == (3, 64, 64)
        instances = sample['data_samples'].gt_instances
        assert len(instances) > 0
        assert instances.masks.masks.shape == (len(instances), mask_size, mask_size)


def test_faster_rcnn_trains_evaluates_and_resumes(digits_coco: Path, tmp_path: Path) -> None:
    register_all_modules()
    cfg = cpu_smoke_cfg(load_mmdet_config(FASTER_RCNN), digits_coco, tmp_path / 'run')
    assert cfg.model.backbone.init_cfg is None
    cfg.train_dataloader.dataset.indices = 2  # one iteration of batch 2 per epoch
    # No validation during training: the test pass below runs the same CocoMetric.
    cfg.update(val_dataloader=None, val_cfg=None, val_evaluator=None,
               experiment_name='faster_rcnn_first')

    runner = Runner.from_cfg(cfg)
    runner.train()
    assert (runner.iter, runner.epoch) == (1, 1)
    checkpoint = tmp_path / 'run' / 'epoch_1.pth'
    assert checkpoint.is_file()

    metrics = runner.test()
    assert set(BBOX_KEYS) <= set(metrics)
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
    assert all(-1.0 <= metrics[key] <= 1.0 for key in BBOX_KEYS)

    resumed_cfg = copy.deepcopy(cfg)
    resumed_cfg.update(resume=True, load_from=str(checkpoint), work_dir=str(tmp_path / 'resumed'),
                       experiment_name='faster_rcnn_resumed')
    resumed_cfg.train_cfg.max_epochs = 2
    resumed = Runner.from_cfg(resumed_cfg)
    with runner_checkpoint_globals():
        resumed.train()
    assert (resumed.iter, resumed.epoch) == (2, 2), 'epoch 1 came from the checkpoint'
