# Table 4, row 8: GN (32 groups) in the backbone and the head.
_base_ = './faster-rcnn_r50_fpn_4conv1fc-gn-head_1x_coco.py'
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
# The stem and first stage stay frozen (frozen_stages=1); norm_eval only acts
# on _BatchNorm layers and is set as in the other all-layer rows.
# A GN backbone needs GN-pretrained weights. As mmdet's own configs/gn/*gn-all*
# do, start from Detectron's ImageNet GN ResNet-50, which takes caffe-style
# input: BGR in [0, 255], mean subtracted, std 1.
model = dict(
    data_preprocessor=dict(
        mean=[103.530, 116.280, 123.675],
        std=[1.0, 1.0, 1.0],
        bgr_to_rgb=False),
    backbone=dict(
        frozen_stages=1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron/resnet50_gn')))
