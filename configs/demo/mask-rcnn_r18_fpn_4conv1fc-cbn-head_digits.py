# As mask-rcnn_r18_fpn_4conv1fc-bn-head_digits.py with CBN instead of BN in the FPN neck and
# the RoI box and mask heads. 2 images per batch, so window 8 (window x batch = 16). Window 1
# (plain BN statistics) for the first 2 of the 8 epochs: the paper's fraction (3 of 12 epochs
# on COCO). The default, exact gradient (the authors' detached one: ...-cbn-head-detached_...).
_base_ = './mask-rcnn_r18_fpn_4conv1fc-bn-head_digits.py'
custom_imports = dict(imports=['mmdet_cbn'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', requires_grad=True, window_size=8)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=2)]
