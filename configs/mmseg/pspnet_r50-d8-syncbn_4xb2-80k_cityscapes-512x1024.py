# mmseg's own PSPNet R50-D8 on Cityscapes 512x1024, 80k iterations at 4 GPUs x 2
# images, unchanged: SyncBN over the 4 GPUs (8 images) everywhere. The reference row.
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py']
