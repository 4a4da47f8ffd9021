# As pspnet_r18-d8-bn_1xb2-2.5k_digits-64x64.py with GroupNorm instead of BN everywhere: 8
# groups (the narrowest layer, the stem's first, has 8 channels).
_base_ = ['./pspnet_r18-d8-bn_1xb2-2.5k_digits-64x64.py']
norm_cfg = dict(type='GN', num_groups=8, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
