# The paper's Mask R-CNN family (FPN, 4conv1fc box head, 4-conv mask head) scaled down to
# train from scratch on a 2-core CPU: the handwritten-digits dataset of
# experiments/digits_coco.py (128 px images, 10 classes), a half-width ResNet-18,
# 64-channel neck and heads, 2 images per batch. The backbone normalizes with GroupNorm: like
# the paper's frozen-BN ImageNet backbone, and unlike a BN backbone trained at 2 images, it
# does not depend on which images share the batch, so only the head normalizer does.
# BN in the FPN neck and the RoI box and mask heads ("head BN"); the CBN variant
# (mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py) changes only that norm and adds the hook.
# Data: python experiments/make_digits_coco.py data/digits_coco_demo --num-train 400 --num-val 100
# (experiments/demo.py generates it and trains both variants).
_base_ = '../_base_/mask-rcnn_r50_fpn_4conv1fc_1x_coco.py'

width = 32  # ResNet base width (64 for the standard ResNet-18)
channels = 64  # FPN and RoI head width (256 in the paper's configs)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(
        depth=18,
        base_channels=width,
        frozen_stages=-1,
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        in_channels=[width, 2 * width, 4 * width, 8 * width],
        out_channels=channels,
        norm_cfg=norm_cfg),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        # Digits are 12-40 px: anchors of 16-256 px instead of 32-512.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(
            in_channels=channels,
            conv_out_channels=channels,
            fc_out_channels=256,
            num_classes=10,
            norm_cfg=norm_cfg),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(
            in_channels=channels,
            conv_out_channels=channels,
            num_classes=10,
            norm_cfg=norm_cfg)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

# Data: no flip (a mirrored digit is not the same digit), images kept at 128 px.
data_root = 'data/digits_coco_demo/'
metainfo = dict(classes=tuple(str(d) for d in range(10)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/val.json',
        data_prefix=dict(img='images/val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

# From scratch, 2 images per batch: SGD at lr 0.02 (not scaled down with the batch: this
# schedule is far shorter than COCO's), 200 iterations of warm-up, lr / 10 after epochs 6 and 7
# (the shape of mmdet's 1x schedule, 12 epochs with milestones 8 and 11, shrunk to 8 epochs).
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[6, 7], gamma=0.1)
]
optim_wrapper = dict(
    optimizer=dict(lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0))
auto_scale_lr = dict(enable=False)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1),
    visualization=dict(draw=False))
randomness = dict(seed=0)
