# Tables 4 (row 5) and 5: fixed-BN backbone, CBN in the head.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
custom_imports = dict(imports=['mmdet_cbn'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', requires_grad=True, window_size=4)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
# Window 1 (plain BN statistics) for the first 3 epochs, then window_size.
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
