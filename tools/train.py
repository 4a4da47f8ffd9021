"""Train a detector: mmdet's own ``tools/train.py``, same command line, with mmdet-cbn.

``CBN`` and ``CBNBurnInHook`` are registered, and mmdet's script runs with the fixes for the
pinned stack of :mod:`mmdet_cbn.compat` (safe loading of Runner checkpoints for ``--resume``
and ``load_from``; launched with ``--launcher pytorch`` without CUDA, training on CPU over
gloo).
"""
from mmdet_cbn.compat import run_mmdet_tool

if __name__ == '__main__':
    run_mmdet_tool('train')
