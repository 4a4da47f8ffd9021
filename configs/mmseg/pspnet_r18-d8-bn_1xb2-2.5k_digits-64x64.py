# The segmentation study of experiments/seg_demo.py: mmseg's PSPNet (PSP head + FCN auxiliary
# head) on a small ResNet-18-D8 trained from scratch on the 64x64 digits set
# (experiments/digits_seg.py: the scanned digits' ink pixels as 10 classes + background on
# cluttered canvases), 1 process x 2 images per batch, BN everywhere. seg_demo.py sets
# data_root, the seed and the schedule length.
_base_ = [
    'mmseg::_base_/models/pspnet_r50-d8.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py'
]
norm_cfg = dict(type='BN', requires_grad=True)  # one process: BN, not SyncBN
crop_size = (64, 64)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # from scratch
    # ResNet-18's first 3 stages at quarter width (16, 32, 64 channels), output stride 8
    backbone=dict(
        depth=18, num_stages=3, strides=(1, 2, 1), dilations=(1, 1, 2), out_indices=(0, 1, 2),
        stem_channels=16, base_channels=16, norm_cfg=norm_cfg),
    # no dropout: it slows this short from-scratch schedule down
    decode_head=dict(in_channels=64, in_index=2, channels=64, dropout_ratio=0.0,
                     num_classes=11, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=32, in_index=1, channels=32, dropout_ratio=0.0,
                        num_classes=11, norm_cfg=norm_cfg))
max_iters = 2500
optim_wrapper = dict(optimizer=dict(lr=0.05))  # from scratch: 5x mmseg's fine-tuning lr
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=100),
    checkpoint=dict(interval=max_iters),
    visualization=dict(draw=False))
env_cfg = dict(cudnn_benchmark=False)

# The digits set: images/{train,val}/*.png, label maps masks/{train,val}/*.png (values 0..10).
dataset_type = 'BaseSegDataset'
data_root = 'data/digits_seg'
metainfo = dict(classes=('background', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'))
# No flips or rescaling: a mirrored digit is another glyph, and the digits vary in size already.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
test_pipeline = train_pipeline
dataset = dict(
    type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.png',
    seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **dataset, pipeline=train_pipeline,
        data_prefix=dict(img_path='images/train', seg_map_path='masks/train')))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **dataset, pipeline=test_pipeline,
        data_prefix=dict(img_path='images/val', seg_map_path='masks/val')))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
