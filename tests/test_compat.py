"""The stack fixes of :mod:`mmdet_cbn.compat`."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import CheckpointLoader, Runner
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


def test_checkpoint_holds_runner_objects_that_torch_refuses(runner_checkpoint: Path) -> None:
    """The stack really needs the fix: mmengine's own local loader fails on it."""
    checkpoint = torch.load(runner_checkpoint, weights_only=False)
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    with pytest.raises(pickle.UnpicklingError):
        mmengine_checkpoint.load_from_local(str(runner_checkpoint), map_location='cpu')


def test_apply_registers_local_loader_idempotently() -> None:
    compat.apply()
    compat.apply()
    assert CheckpointLoader._get_checkpoint_loader('/some/epoch_1.pth') is compat.load_from_local
    assert CheckpointLoader._get_checkpoint_loader('https://x/y.pth') is not \
        compat.load_from_local


def test_runner_resumes_from_its_checkpoint(runner_checkpoint: Path, tmp_path: Path) -> None:
    compat.apply()
    saved = torch.load(runner_checkpoint, weights_only=False)
    runner = _runner(tmp_path, max_epochs=2, resume_from=runner_checkpoint)
    runner.train()
    assert runner.epoch == 2
    assert runner.iter == 4, 'two iterations restored from the checkpoint plus two new ones'
    history = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(history) == 4
    assert history[:2].tolist() == saved['message_hub']['log_scalars']['train/loss'].data[0]\
        .tolist()


def test_runner_resume_fails_without_the_fix(runner_checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    schemes = dict(CheckpointLoader._schemes)
    schemes[''] = mmengine_checkpoint.load_from_local
    monkeypatch.setattr(CheckpointLoader, '_schemes', schemes)
    runner = _runner(tmp_path, max_epochs=2, resume_from=runner_checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        runner.train()


def test_load_checkpoint_and_missing_file(runner_checkpoint: Path) -> None:
    compat.apply()
    model = _Regressor()
    mmengine_checkpoint.load_checkpoint(model, str(runner_checkpoint), map_location='cpu')
    saved = torch.load(runner_checkpoint, weights_only=False)['state_dict']
    assert torch.equal(model.linear.weight, saved['linear.weight'])
    with pytest.raises(FileNotFoundError):
        compat.load_from_local(str(runner_checkpoint.with_name('missing.pth')))


def test_teardown_distributed_leaves_the_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist

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
