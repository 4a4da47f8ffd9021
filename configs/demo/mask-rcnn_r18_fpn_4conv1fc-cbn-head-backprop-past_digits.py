# As mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py (CBN in the neck and the RoI heads,
# window 8, burn-in 2 epochs), with backprop_past_stats=True: the gradient also flows through
# the compensated past statistics, i.e. it is the exact gradient of CBN's forward. With the
# paper's constant past statistics the conv outputs drift away from their running statistics
# at this learning rate, which the eval-mode model pays for (README, "Small-scale evidence").
_base_ = './mask-rcnn_r18_fpn_4conv1fc-cbn-head_digits.py'
norm_cfg = dict(type='CBN', requires_grad=True, window_size=8, backprop_past_stats=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
