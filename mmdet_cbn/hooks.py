"""``CBNBurnInHook``: pairs CBN layers, marks iterations and drives the burn-in window."""
from __future__ import annotations

import contextlib
import copy
import time
from itertools import islice

import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info
from mmengine.hooks import CheckpointHook, Hook, LoggerHook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.dataset import DefaultSampler
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import DataLoader

from .cbn import CrossIterationBatchNorm2d
from .sync_cbn import SyncCrossIterationBatchNorm2d
from .pairing import cbn_layers, pair_cbn_layers
from .precise_stats import load_population_statistics, population_statistics

__all__ = ['CBNBurnInHook', 'check_sync_bn']

_CBN_TYPES = ('CBN', 'CrossIterationBatchNorm2d', CrossIterationBatchNorm2d, 'SyncCBN',
              'SyncCrossIterationBatchNorm2d', SyncCrossIterationBatchNorm2d, 'CBNBurnInHook')


def _sync_bn_message(sync_bn: object) -> str:
    return (f"sync_bn={sync_bn!r} is set in the config: in a distributed run mmengine's Runner "
            'converts every _BatchNorm of the model to SyncBatchNorm '
            '(mmengine.model.convert_sync_batchnorm), CBN layers included, so the run would '
            'train SyncBN instead of CBN. Fix: remove sync_bn from the config; for CBN '
            "statistics pooled across the GPUs as well, norm_cfg=dict(type='SyncCBN', ...) "
            "(or mmdet_cbn.convert_cbn(model, sync=True)).")


def _mentions_cbn(node: object) -> bool:
    """Whether a config node builds a CBN layer or the CBN hook anywhere inside."""
    if isinstance(node, dict):
        return node.get('type') in _CBN_TYPES or any(map(_mentions_cbn, node.values()))
    if isinstance(node, (list, tuple)):
        return any(map(_mentions_cbn, node))
    return False


def check_sync_bn(cfg) -> None:
    """Refuse a distributed config with CBN layers or ``CBNBurnInHook`` and ``sync_bn``,
    before the Runner is built (``tools/train.py`` calls it).

    The Runner would replace every CBN layer by SyncBatchNorm, then, on CPU modules, stop
    with DDP's "SyncBatchNorm layers only work with GPU modules", which does not say why;
    on GPUs ``CBNBurnInHook`` stops the run before training.

    Args:
        cfg: an mmengine ``Config`` with its ``launcher`` set.

    Raises:
        RuntimeError: naming the cause and the fix.
    """
    if cfg.get('sync_bn') is None or cfg.get('launcher', 'none') == 'none':
        return
    if _mentions_cbn(cfg.get('model')) or _mentions_cbn(cfg.get('custom_hooks')):
        raise RuntimeError(f'The config builds CBN layers, but {_sync_bn_message(cfg.sync_bn)}')


class CBNBurnInHook(Hook):
    """Window 1 (plain BN) for the first epochs or iterations, then each layer's ``window_size``.

    Before training it pairs every CBN layer of the model with the conv that feeds it, logs how
    many were paired, and fails with the list of unpaired layers if any, or if the model has
    no CBN layer (``sync_bn`` in the config replaces them all in a distributed run: the error
    says so). Before every training
    iteration it marks a new iteration on every CBN layer (so layers called several times per
    iteration, or under gradient accumulation, count iterations exactly) and sets the window
    from ``runner.epoch`` / ``runner.iter``, so a resumed run continues with the right window;
    it logs each change and records the window as ``train/cbn_window``.

    CBN statistics are per process, and mmengine saves rank 0's model only: before each
    checkpoint the hook gathers every rank's CBN state into it (``cbn_rank_states``), and on
    load gives each rank its own back. Resumed with another number of ranks, the windows start
    empty (logged). SyncCBN layers hold the same state on every rank: it is saved once, in the
    model's, and resumes with any number of ranks.

    **Statistics for evaluation.** Before every validation during training and before the
    last checkpoint (if a ``CheckpointHook`` saves one) it re-estimates the running statistics
    of every BN-like layer (BN and CBN) at the current weights: ``precise_batches`` training
    batches forwarded without gradient, each layer normalizing with its batch's statistics,
    and their exact pooled mean and variance (:func:`mmdet_cbn.population_statistics`).
    Nothing of training changes (random states, CBN histories and data order are kept). The
    running averages of training lag weights that drift fast along directions the normalized
    forward ignores (a channel's mean), which CBN's training forward tolerates and BN's rarely
    meets (``docs/eval_statistics.md``). At its logging interval the hook records the
    fraction of compensated past variances that were clamped at 0, ``train/cbn_clamped_var``
    (all layers) and ``train/cbn_clamped_var_max`` (the worst layer).

    Args:
        burnin_epochs: epochs with window 1 (paper: 3 on COCO). Exclusive with ``burnin_iters``.
            Under an iteration-based loop it counts ``len(train_dataloader)`` iterations each.
        burnin_iters: iterations with window 1.
        precise_batches: training batches for the re-estimation (costs as many forward
            passes without gradient); 0 keeps the running statistics of training (exponential
            averages of the window statistics).
    """

    priority = 'NORMAL'

    def __init__(self, burnin_epochs: int | None = None, burnin_iters: int | None = None,
                 precise_batches: int = 100) -> None:
        if (burnin_epochs is None) == (burnin_iters is None):
            raise ValueError('CBNBurnInHook needs exactly one of burnin_epochs or burnin_iters '
                             f'(got burnin_epochs={burnin_epochs!r}, '
                             f'burnin_iters={burnin_iters!r})')
        length = burnin_epochs if burnin_iters is None else burnin_iters
        if not isinstance(length, int) or length < 0:
            raise ValueError(f'CBNBurnInHook burn-in length must be an integer >= 0, got '
                             f'{length!r}')
        if not isinstance(precise_batches, int) or precise_batches < 0:
            raise ValueError(f'CBNBurnInHook precise_batches must be an integer >= 0, got '
                             f'{precise_batches!r}')
        self.burnin_epochs = burnin_epochs
        self.burnin_iters = burnin_iters
        self.precise_batches = precise_batches
        self._window_logged: bool | None = None
        self._rank_states: dict | None = None
        self._training = False  # validations in between re-estimate the statistics
        self._estimated_at: int | None = None  # the iteration of the last re-estimation
        self._estimation_loader = None  # iteration-based loops: a loader of its own

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def before_train(self, runner) -> None:
        if self.burnin_epochs is not None and not isinstance(runner.train_loop,
                                                             EpochBasedTrainLoop):
            self.burnin_iters = self.burnin_epochs * len(runner.train_dataloader)
            runner.logger.info(f'CBNBurnInHook: iteration-based loop, burn-in of '
                               f'{self.burnin_epochs} epochs = {self.burnin_iters} iterations')
            self.burnin_epochs = None
        model = self._model(runner)
        layers = cbn_layers(model)
        sync_bn = runner.cfg.get('sync_bn') if runner.cfg else None
        if not layers:
            raise RuntimeError(
                'CBNBurnInHook is configured but the model has no CBN layer. '
                + (f'The cause: {_sync_bn_message(sync_bn)}' if sync_bn is not None else
                   "Fix: norm_cfg=dict(type='CBN', ...) where the model should use CBN, or "
                   'remove CBNBurnInHook from custom_hooks.'))
        if sync_bn is not None:  # a run without a launcher ignores sync_bn
            runner.logger.warning(f'CBNBurnInHook: {_sync_bn_message(sync_bn)}')
        pairs = pair_cbn_layers(model)
        runner.logger.info(f'CBN: {len(pairs)} of {len(layers)} CBN layers paired with the conv '
                           f'that feeds them')

    def in_burnin(self, epoch: int, iteration: int) -> bool:
        """Whether the (0-based) epoch / iteration is in the burn-in period."""
        if self.burnin_epochs is not None:
            return epoch < self.burnin_epochs
        return iteration < self.burnin_iters

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        burnin = self.in_burnin(runner.epoch, runner.iter)
        layers = cbn_layers(self._model(runner))
        for _, layer in layers:
            layer.new_iteration()
            layer.set_window(1 if burnin else layer.window_size)
        if layers:
            window = layers[0][1].window
            runner.message_hub.update_scalar('train/cbn_window', window)
            if burnin != self._window_logged:
                phase = 'burn-in: plain BN statistics' if burnin else 'cross-iteration'
                runner.logger.info(f'CBN window {window} from epoch {runner.epoch + 1}, '
                                   f'iteration {runner.iter + 1} ({phase})')
                self._window_logged = burnin

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._log_clamped_variances(runner, batch_idx)
        if self.is_last_train_iter(runner) and not self._epoch_based(runner):
            self._re_estimate_before_last_checkpoint(runner)
        self._gather_before_save(runner, by_epoch=False)

    def _log_clamped_variances(self, runner, batch_idx: int) -> None:
        """At the logger's interval, the fraction of compensated past variances that were
        below 0 (clamped) since the last time: over all CBN layers (``train/cbn_clamped_var``)
        and in the worst layer (``train/cbn_clamped_var_max``). The layers count on their
        device; this is the diagnostic's only host sync."""
        interval = next((h.interval for h in runner.hooks if isinstance(h, LoggerHook)), 50)
        if not (self.every_n_inner_iters(batch_idx, interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            return
        layers = [layer for _, layer in cbn_layers(self._model(runner))]
        if not layers:
            return
        counts = torch.stack([layer.clamped_variances for layer in layers]).cpu()
        for layer in layers:
            layer.clamped_variances.zero_()
        clamped, compensated = counts.sum(0).tolist()
        if compensated:  # none during burn-in
            per_layer = counts[:, 0] / counts[:, 1].clamp_min(1)
            runner.message_hub.update_scalar('train/cbn_clamped_var', clamped / compensated)
            runner.message_hub.update_scalar('train/cbn_clamped_var_max',
                                             per_layer.max().item())

    def after_train_epoch(self, runner) -> None:
        bad = {name: int(layer.nonfinite_batches) for name, layer in
               cbn_layers(self._model(runner)) if int(layer.nonfinite_batches)}
        if bad:
            runner.logger.warning(
                f'CBN: non-finite batch statistics were kept out of the history and running '
                f'statistics: {bad} (layer: batches so far). Check the loss and learning rate.')
        if self.is_last_train_epoch(runner) and self._epoch_based(runner):
            self._re_estimate_before_last_checkpoint(runner)
        self._gather_before_save(runner, by_epoch=True)

    def before_train_epoch(self, runner) -> None:
        self._training = True

    def after_train(self, runner) -> None:
        self._training = False

    def before_val_epoch(self, runner) -> None:
        if self._training:
            self._re_estimate_statistics(runner)

    def _re_estimate_before_last_checkpoint(self, runner) -> None:
        if any(isinstance(hook, CheckpointHook) for hook in runner.hooks):
            self._re_estimate_statistics(runner)

    @staticmethod
    def _epoch_based(runner) -> bool:
        return isinstance(runner.train_loop, EpochBasedTrainLoop)

    def _re_estimate_statistics(self, runner) -> None:
        """Running statistics of every BN-like layer re-estimated at the current weights from
        ``precise_batches`` training batches (once per iteration count)."""
        if not self.precise_batches or self._estimated_at == runner.iter:
            return
        self._estimated_at = runner.iter
        model = self._model(runner)
        optim_wrapper = runner.optim_wrapper

        def forward(batch) -> None:  # in the training forward's precision (autocast of Amp)
            with (optim_wrapper.optim_context(model) if isinstance(optim_wrapper, OptimWrapper)
                  else contextlib.nullcontext()):
                model._run_forward(model.data_preprocessor(batch, True), mode='loss')

        began = time.perf_counter()
        stats = population_statistics(
            model, islice(self._estimation_loader_of(runner), self.precise_batches), forward)
        load_population_statistics(model, stats)
        runner.logger.info(f'CBN: running statistics of {len(stats)} norm layers re-estimated '
                           f'at the current weights from {self.precise_batches} training '
                           f'batches in {time.perf_counter() - began:.1f} s')

    def _estimation_loader_of(self, runner):
        """The training loader where its iteration is over (the end of an epoch, of training);
        in the middle of an iteration-based run a loader of its own, which leaves the
        training's (infinite) sampler and workers where they are: built from
        ``cfg.train_dataloader``, or, without a config, the training dataset with a shuffling
        sampler of the run's seed."""
        if self._epoch_based(runner) or self.is_last_train_iter(runner):
            return runner.train_dataloader
        if self._estimation_loader is None:
            loader_cfg = copy.deepcopy(runner.cfg.get('train_dataloader'))
            if loader_cfg is not None:
                loader_cfg['persistent_workers'] = False
                self._estimation_loader = runner.build_dataloader(loader_cfg, seed=runner.seed)
            else:
                loader = runner.train_dataloader
                self._estimation_loader = DataLoader(
                    loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                    sampler=DefaultSampler(loader.dataset, shuffle=True, seed=runner.seed))
        return self._estimation_loader

    def _gather_before_save(self, runner, by_epoch: bool) -> None:
        """On every rank, when the ``CheckpointHook`` is about to save (it runs after this
        hook): collect each rank's CBN state on rank 0."""
        rank, world_size = get_dist_info()
        saver = next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)
        layers = _per_rank_layers(self._model(runner))
        if world_size == 1 or not layers or saver is None or saver.by_epoch != by_epoch:
            return
        if by_epoch:
            due = saver.every_n_epochs(runner, saver.interval, saver.save_begin) or (
                saver.save_last and saver.is_last_train_epoch(runner))
        else:
            due = saver.every_n_train_iters(runner, saver.interval, saver.save_begin) or (
                saver.save_last and saver.is_last_train_iter(runner))
        if not due:
            return
        state = {name: {key: value.cpu() for key, value in layer.state_dict().items()
                        if key not in ('weight', 'bias')}
                 for name, layer in layers}
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(state, gathered, dst=0)
        self._rank_states = gathered

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._rank_states is not None:
            checkpoint['cbn_rank_states'] = self._rank_states
            self._rank_states = None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Before the model loads ``checkpoint``: put this rank's CBN state in its state dict
        (or, from another number of ranks, no history at all)."""
        states = checkpoint.get('cbn_rank_states')
        if states is None:
            return
        rank, world_size = get_dist_info()
        weights = checkpoint['state_dict']
        own = states[rank] if len(states) == world_size else None
        names = [name for name, _ in _per_rank_layers(self._model(runner))]
        histories = tuple(f'{name}.cbn_history.' for name in names)
        for key in [k for k in weights if k.startswith(histories)]:  # rank 0's call sites
            del weights[key]
        if own is not None:
            for name in names:
                weights.update({f'{name}.{key}': value for key, value in own.get(name, {}).items()})
        else:
            runner.logger.warning(
                f'CBN: the checkpoint holds the CBN state of {len(states)} ranks, this run has '
                f'{world_size}: CBN windows start empty (running statistics: rank 0\'s).')


def _per_rank_layers(model) -> list[tuple[str, CrossIterationBatchNorm2d]]:
    """The CBN layers whose state differs from rank to rank (not SyncCBN)."""
    return [(name, layer) for name, layer in cbn_layers(model)
            if not isinstance(layer, SyncCrossIterationBatchNorm2d)]
