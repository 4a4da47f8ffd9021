"""mmdet-cbn: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for OpenMMLab.

Importing the package registers, here, the norm layers ``'CBN'`` and ``'SyncCBN'`` in the
OpenMMLab root model registry (so ``norm_cfg=dict(type='CBN', window_size=4)`` works wherever
mmcv builds a norm layer) and ``CBNBurnInHook`` in the hook registry; and, in
:mod:`mmdet_cbn.functional`, the operator ``torch.ops.mmdet_cbn.conv_weight_grad``
(``torch.library``), which compiled CBN steps call. Nothing else changes globally: the fixes
for the pinned stack (:mod:`mmdet_cbn.compat`) apply only where asked for.
"""
from .cbn import CrossIterationBatchNorm2d
from .pairing import cbn_layers, convert_cbn, pair_cbn_layers
from .precise_stats import load_population_statistics, population_statistics
from .sync_cbn import SyncCrossIterationBatchNorm2d

__version__ = '0.1.0'
__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'pair_cbn_layers',
           'convert_cbn', 'cbn_layers', 'population_statistics', 'load_population_statistics',
           '__version__']

try:
    import mmengine  # noqa: F401
except ImportError:  # the layer itself needs only torch
    pass
else:
    from mmengine.registry import HOOKS, MODELS

    from .hooks import CBNBurnInHook

    MODELS.register_module('CBN', module=CrossIterationBatchNorm2d)
    MODELS.register_module('SyncCBN', module=SyncCrossIterationBatchNorm2d)
    HOOKS.register_module(module=CBNBurnInHook)
    __all__ += ['CBNBurnInHook']
