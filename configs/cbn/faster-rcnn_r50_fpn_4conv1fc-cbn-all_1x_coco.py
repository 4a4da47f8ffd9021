# Table 4, row 9: CBN in the backbone and the head.
_base_ = './faster-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'
norm_cfg = dict(type='CBN', requires_grad=True, window_size=4)
# norm_eval=False lets the backbone normalizers train: with True, mmdet's
# ResNet.train() puts every _BatchNorm (BN, SyncBN, CBN) in eval mode. The stem
# and first stage stay frozen (frozen_stages=1: parameters fixed, eval mode).
# The CBN layers load the ImageNet BN weights (same state-dict keys).
model = dict(
    backbone=dict(frozen_stages=1, norm_cfg=norm_cfg, norm_eval=False))
