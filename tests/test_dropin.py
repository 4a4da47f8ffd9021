"""CBN as a drop-in for BatchNorm2d: what a BN user does to a model works on CBN too.

PyTorch's ``BatchNorm2d`` is the reference where CBN's window is 1; the literal reference
(``cbn_reference.py``) where it is larger.
"""
import pytest
import torch
from torch import nn

from mmdet_cbn import CrossIterationBatchNorm2d


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_running_statistics_move_as_batchnorms(dtype, momentum):
    """Window 1 running statistics equal BN's over several steps, to the dtype's precision:
    float64 buffers move by a float64 momentum."""
    cbn = CrossIterationBatchNorm2d(6, window_size=1, momentum=momentum).to(dtype)
    bn = nn.BatchNorm2d(6, momentum=momentum).to(dtype)
    for _ in range(6):
        y = torch.randn(4, 6, 5, 5, dtype=dtype) * 3 + 2
        torch.testing.assert_close(cbn(y), bn(y))
    tolerance = dict(rtol=1e-15, atol=1e-15) if dtype == torch.float64 else {}
    torch.testing.assert_close(cbn.running_mean, bn.running_mean, **tolerance)
    torch.testing.assert_close(cbn.running_var, bn.running_var, **tolerance)
    assert cbn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 6
