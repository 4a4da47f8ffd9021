# mmseg's PSPNet R50-D8 on Cityscapes 512x1024, 40k iterations at 4 GPUs x 2 images,
# with per-GPU BN (2 images per batch) instead of SyncBN: the baseline CBN must beat.
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py']
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
