# Table 4, row 7: SyncBN in the backbone and the head.
_base_ = './faster-rcnn_r50_fpn_4conv1fc-syncbn-head_1x_coco.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
# norm_eval=False lets the backbone normalizers train: with True, mmdet's
# ResNet.train() puts every _BatchNorm (BN, SyncBN, CBN) in eval mode. The stem
# and first stage stay frozen (frozen_stages=1: parameters fixed, eval mode).
model = dict(
    backbone=dict(frozen_stages=1, norm_cfg=norm_cfg, norm_eval=False))
