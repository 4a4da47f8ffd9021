# mmseg's PSPNet R50-D8 on Cityscapes 512x1024, 40k iterations at 4 GPUs x 2 images,
# with CBN instead of SyncBN in the backbone, the PSP head with its pyramid pooling module
# and the FCN auxiliary head. Statistics stay per GPU: no cross-GPU synchronisation.
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmdet_cbn'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', requires_grad=True, window_size=8)  # 8 x 2 images = 16
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
# Window 1 (plain BN statistics) for the first quarter of the schedule (the paper: 3 of 12
# epochs on COCO), then window 8.
custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=10000)]
