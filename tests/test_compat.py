"""The stack fixes of :mod:`mmdet_cbn.compat`."""

from __future__ import annotations

import io
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mmengine_checkpoint
from torch.utils.data import Dataset

from mmdet_cbn import compat


class _Points(Dataset):
    """Eight 2-D points with a linear target."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        x = torch.tensor([float(index), 1.0])
        return dict(inputs=x, target=x @ torch.tensor([0.5, -1.0]))


class _Regressor(BaseModel):
    """A linear model with the train/val/test interface of mmengine."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor, mode: str = 'tensor'):
        pred = self.linear(inputs).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((pred - target) ** 2).mean())
        return pred


def _runner(work_dir: Path, max_epochs: int, resume_from: Path | None = None) -> Runner:
    return Runner(
        model=_Regressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_Points(), batch_size=4, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1)),
        load_from=None if resume_from is None else str(resume_from),
        resume=resume_from is not None,
        randomness=dict(seed=0),
        experiment_name=f'{work_dir.name}_{max_epochs}_{resume_from is not None}',
    )


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by mmengine's Runner after one epoch (two iterations)."""
    work_dir = tmp_path_factory.mktemp('compat_runner')
    _runner(work_dir, max_epochs=1).train()
    return work_dir / 'epoch_1.pth'


@pytest.fixture(autouse=True)
def _weights_only_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep torch's default ``weights_only=True``, whatever the environment says."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    monkeypatch.delenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', raising=False)


class _Payload:
    """Pickles as a call of ``print``: stands for any callable a malicious file could carry."""

    def __reduce__(self):
        return print, ('PAYLOAD RAN',)


def test_checkpoint_holds_runner_objects_that_torch_refuses(runner_checkpoint: Path) -> None:
    """The stack really needs the fix: mmengine's own local loader fails on it."""
    checkpoint = torch.load(runner_checkpoint, weights_only=False)
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    with pytest.raises(pickle.UnpicklingError):
        mmengine_checkpoint.load_from_local(str(runner_checkpoint), map_location='cpu')


def test_allowlist_covers_the_globals_of_runner_checkpoints(runner_checkpoint: Path) -> None:
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(runner_checkpoint))
    # HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, 'mean') etc.
    assert needed == {'mmengine.logging.history_buffer.HistoryBuffer', 'builtins.getattr',
                      'numpy.ndarray', 'numpy.dtype', 'numpy._core.multiarray._reconstruct',
                      'numpy._core.multiarray.scalar'}
    allowed = {entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'
               for entry in compat.runner_checkpoint_allowlist()}
    assert needed <= allowed


def test_runner_resumes_from_its_checkpoint(runner_checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(runner_checkpoint, weights_only=False)
    runner = _runner(tmp_path, max_epochs=2, resume_from=runner_checkpoint)
    with compat.runner_checkpoint_globals():
        runner.train()
    assert runner.epoch == 2
    assert runner.iter == 4, 'two iterations restored from the checkpoint plus two new ones'
    history = runner.message_hub.get_scalar('train/loss')
    assert len(history.data[0]) == 4
    assert history.data[0][:2].tolist() == \
        saved['message_hub']['log_scalars']['train/loss'].data[0].tolist()
    assert history.statistics('mean') == pytest.approx(history.data[0].mean())


def test_runner_resume_fails_outside_the_context(runner_checkpoint: Path, tmp_path: Path) -> None:
    """The allowance ends with the ``with`` block."""
    with compat.runner_checkpoint_globals():
        pass
    runner = _runner(tmp_path, max_epochs=2, resume_from=runner_checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        runner.train()


def test_load_checkpoint(runner_checkpoint: Path) -> None:
    model = _Regressor()
    with compat.runner_checkpoint_globals():
        mmengine_checkpoint.load_checkpoint(model, str(runner_checkpoint), map_location='cpu')
    saved = torch.load(runner_checkpoint, weights_only=False)['state_dict']
    assert torch.equal(model.linear.weight, saved['linear.weight'])


def test_pickled_callable_is_refused_with_the_fix_named(runner_checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    checkpoint = torch.load(runner_checkpoint, weights_only=False)
    checkpoint['meta']['note'] = _Payload()
    path = tmp_path / 'payload.pth'
    torch.save(checkpoint, path)
    runner = _runner(tmp_path / 'work', max_epochs=2, resume_from=path)
    with pytest.raises(pickle.UnpicklingError, match='Unsupported global: GLOBAL print') as err, \
            compat.runner_checkpoint_globals():
        runner.train()
    assert 'PAYLOAD RAN' not in capsys.readouterr().out
    note = ' '.join(err.value.__notes__)
    assert 'torch.serialization.safe_globals' in note and 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' in note


@pytest.mark.parametrize('name', ['__init__', 'register_statistics'])
def test_getattr_reaches_only_history_buffer_statistics(tmp_path: Path, name: str) -> None:
    class Attribute:
        def __reduce__(self):
            return getattr, (HistoryBuffer, name)

    torch.save({'ok': HistoryBuffer([1.0], [1]), 'bad': Attribute()}, tmp_path / 'x.pth')
    with pytest.raises(pickle.UnpicklingError, match=f"refusing getattr.*'{name}'"), \
            compat.runner_checkpoint_globals():
        torch.load(tmp_path / 'x.pth')


def test_numpy_1_checkpoints_load(tmp_path: Path) -> None:
    """numpy 1.x pickled its arrays through ``numpy.core``, numpy 2 through ``numpy._core``."""
    buffer = io.BytesIO()
    values = dict(array=np.arange(3.0), count=np.int64(2), flag=np.bool_(True))
    torch.save(values, buffer, _use_new_zipfile_serialization=False)  # one plain pickle
    path = tmp_path / 'numpy1.pth'
    path.write_bytes(buffer.getvalue().replace(b'numpy._core.', b'numpy.core.'))
    assert b'numpy.core.multiarray\n_reconstruct' in path.read_bytes()
    with compat.runner_checkpoint_globals():
        loaded = torch.load(path)
    np.testing.assert_array_equal(loaded['array'], values['array'])
    assert loaded['count'] == 2 and loaded['flag']


def test_object_arrays_stay_refused(tmp_path: Path) -> None:
    torch.save(np.array([None, 1], dtype=object), tmp_path / 'objects.pth')
    with pytest.raises(pickle.UnpicklingError, match='ObjectDType'), \
            compat.runner_checkpoint_globals():
        torch.load(tmp_path / 'objects.pth')


def test_importing_mmdet_cbn_changes_no_loader_and_no_safe_global() -> None:
    code = textwrap.dedent("""
        import torch
        from mmengine.registry import MODELS
        from mmengine.runner import CheckpointLoader

        def state():
            return dict(CheckpointLoader._schemes), torch.serialization.get_safe_globals()

        before = state()
        import mmdet_cbn
        assert MODELS.get('CBN') is mmdet_cbn.CrossIterationBatchNorm2d
        assert state() == before, 'import mmdet_cbn changed a loader or a safe global'
        """)
    proc = subprocess.run([sys.executable, '-c', code], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_setup_cpu_distributed_sets_mmengine_default_wrapper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ``Runner.wrap_model`` without a config: own buffers per rank, no ``device_ids``."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK='0',
                           WORLD_SIZE='1').items():
        monkeypatch.setenv(key, value)
    cfg = Config(dict(launcher='pytorch', find_unused_parameters=True))
    own = Config(dict(launcher='pytorch', model_wrapper_cfg=dict(type='MyWrapper')))
    try:
        compat.setup_cpu_distributed(cfg)
        compat.setup_cpu_distributed(own)
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
    finally:
        compat.teardown_distributed()
    assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel', device_ids=None,
                                         broadcast_buffers=False, find_unused_parameters=True)
    assert own.model_wrapper_cfg == dict(type='MyWrapper')


def test_teardown_distributed_leaves_the_process_group(tmp_path: Path) -> None:
    compat.teardown_distributed()  # nothing initialized: a no-op
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        compat.teardown_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
