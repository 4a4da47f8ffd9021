# As pspnet_r18-d8-bn_1xb2-2.5k_digits-64x64.py with CBN instead of BN everywhere (backbone,
# PSP head with its pooled 1x1 branch, FCN auxiliary head): window 8 (8 x 2 images = 16).
_base_ = ['./pspnet_r18-d8-bn_1xb2-2.5k_digits-64x64.py']
custom_imports = dict(imports=['mmdet_cbn'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', requires_grad=True, window_size=8)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
# Window 1 for the first quarter of the iterations (the paper: 3 of 12 epochs on COCO).
custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=625)]
