# Table 5: Mask R-CNN R101-FPN, fixed-BN backbone, CBN in the head.
_base_ = './mask-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(
            type='Pretrained', checkpoint='torchvision://resnet101')))
