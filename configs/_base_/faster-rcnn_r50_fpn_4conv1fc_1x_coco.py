# Faster R-CNN R50-FPN with the 4conv1fc box head, trained as in the CBN paper
# (Yao et al., CVPR 2021, Sec. 5.2): COCO 2017, 4 GPUs x 4 images, SGD with
# lr 0.02 for a batch of 16, momentum 0.9, weight decay 1e-4, 12 epochs with
# the lr divided by 10 after epochs 8 and 11 (mmdet's schedule_1x).
# Backbone: mmdet's "fixed BN" (BN statistics frozen by norm_eval=True, stem
# and first stage frozen by frozen_stages=1). No normalizer in the head: the
# rows of Tables 4 and 5 add theirs to the FPN neck and the RoI box head.
# With a norm_cfg, mmcv's ConvModule (bias='auto') builds the neck and head
# convs without bias, the normalizer's shift replacing it; here they keep it.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py'
]
model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))

# 4 images per GPU: the per-GPU batch size is what BN statistics see.
train_dataloader = dict(batch_size=4)
# The lr 0.02 of schedule_1x is for 16 images (4 GPUs x 4): scale it linearly
# when the total batch differs.
auto_scale_lr = dict(enable=True, base_batch_size=16)
