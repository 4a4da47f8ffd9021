# As mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py (CBN in the neck and the RoI heads,
# window 8, burn-in 2 epochs), with the authors' gradient: the compensated past statistics
# held constant in the backward (detach_compensation=True) instead of the exact gradient.
_base_ = './mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py'
norm_cfg = dict(type='CBN', requires_grad=True, window_size=8, detach_compensation=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
