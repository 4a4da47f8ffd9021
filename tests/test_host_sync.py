"""No host syncs: a CBN training step queues its device work and never waits for it.

On CUDA a step that reads a device value (``.item()``, ``int(t)``, ``nonzero``) or copies
host data into a device tensor (``t[i] = 5``, ``cpu_tensor.to(device)``, through pageable host
memory) makes the host wait for every queued kernel. CI has no GPU, so
the step runs on PyTorch's ``meta`` device (shapes only, the same device-generic code path)
under a dispatch mode that records those operations. ``benchmarks/cuda_suite.sh`` checks the
same on a real GPU with ``torch.cuda.set_sync_debug_mode('error')``
(``test_cuda_training_and_eval_steps_never_wait_for_the_device``).
"""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers

READS_DEVICE_VALUE = {'_local_scalar_dense', 'nonzero', 'masked_select', 'unique', 'item',
                      'is_nonzero'}


class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that make a CUDA host sync when their tensors live on a device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._python_scalars: list[torch.Tensor] = []  # kept alive: their ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split('.')[0]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type != 'cpu' for t in tensors)
        if name in READS_DEVICE_VALUE and on_device:
            self.syncs.append(str(func))
        if name == 'copy_' and any(args[1] is t for t in self._python_scalars):
            self.syncs.append(f'{func} of a Python number into a device tensor')
        elif name == 'copy_' and on_device and args[1].device.type == 'cpu':
            self.syncs.append(f'{func} from host memory')
        elif (name == '_to_copy' and args[0].device.type == 'cpu'
              and torch.device(kwargs.get('device') or 'cpu').type != 'cpu'):
            self.syncs.append(f'{func} from host memory')
        out = func(*args, **kwargs)
        if name == 'scalar_tensor':  # what `t[i] = number` copies from (host memory on CUDA)
            self._python_scalars.append(out)
        return out


@pytest.fixture
def meta_autocast(monkeypatch):
    """``torch.autocast`` knows no 'meta' device: make it a no-op there."""
    autocast = torch.autocast

    def patched(device_type, *args, **kwargs):
        if device_type == 'meta':
            return contextlib.nullcontext()
        return autocast(device_type, *args, **kwargs)
    monkeypatch.setattr(torch, 'autocast', patched)


def test_recorder_catches_the_usual_host_syncs():
    t = torch.zeros(3, device='meta')
    for sync in (lambda: t.__setitem__(1, 5), lambda: torch.ones(3).to('meta'),
                 lambda: t.copy_(torch.ones(3)), lambda: t.sum().item(), lambda: t.nonzero()):
        with HostSyncRecorder() as recorder, contextlib.suppress(NotImplementedError,
                                                                 RuntimeError):
            sync()  # meta tensors have no values to read: .item() and nonzero raise
        assert recorder.syncs, sync
    with HostSyncRecorder() as recorder:
        t[1].fill_(5)
        torch.where(t > 0, t, 0).sum()
    assert not recorder.syncs


@pytest.mark.parametrize('options', [dict(window_size=4), dict(window_size=4, bias=True),
                                     dict(window_size=4, grad_nu_stride=2),
                                     dict(window_size=4, detach_compensation=True),
                                     dict(window_size=4, compensation='none'),
                                     dict(window_size=1)])
def test_training_and_eval_steps_have_no_host_sync(options, meta_autocast):
    bias = options.pop('bias', False)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias),
                          CrossIterationBatchNorm2d(6, **options)).to('meta')
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(batch):
        optimizer.zero_grad()
        out = model(torch.randn(batch, 4, 9, 9, device='meta'))
        (out * torch.randn_like(out)).sum().backward()
        optimizer.step()

    for _ in range(4):  # allocations and a full history
        step(2)
    with HostSyncRecorder() as recorder:
        step(2)
        step(32)  # many examples: the sampled path takes every s^2-th one
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4, 9, 9, device='meta'))
    assert recorder.syncs == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('options', [dict(), dict(grad_nu_stride=2),
                                     dict(detach_compensation=True)])
def test_cuda_training_and_eval_steps_never_wait_for_the_device(options):
    """On a real GPU: no ``.item()``, no data-dependent shapes in a training step with a full
    window and in eval (the NaN guard stays on the device)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=True),
                          CrossIterationBatchNorm2d(6, window_size=4, **options)).cuda()
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        optimizer.zero_grad()
        out = model(torch.randn(2, 4, 9, 9, device='cuda'))
        (out * torch.randn_like(out)).sum().backward()
        optimizer.step()

    for _ in range(4):  # first allocations, the conv check and a full history
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4, 9, 9, device='cuda'))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(model[1].running_var).all()
