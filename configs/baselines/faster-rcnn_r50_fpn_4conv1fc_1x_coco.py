# Table 4, row 1: fixed-BN backbone, no normalizer in the head.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
