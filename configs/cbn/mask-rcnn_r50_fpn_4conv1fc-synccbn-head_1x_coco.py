# Table 5's Mask R50 CBN head with SyncCBN: statistics pooled across GPUs and iterations.
_base_ = './mask-rcnn_r50_fpn_4conv1fc-cbn-head_1x_coco.py'
# Window 4 over 4 GPUs x 4 images: 64 images per statistic (CBN: 16, SyncBN: 16).
norm_cfg = dict(type='SyncCBN', requires_grad=True, window_size=4)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
# Do not set sync_bn: SyncCBN synchronizes itself (sync_bn would make it SyncBatchNorm).
