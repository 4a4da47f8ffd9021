"""Pairing every CBN layer with the convolution that feeds it, and converting BN models to CBN.

A CBN layer compensates its statistics with respect to the weights of the conv right before
it, so it needs that conv's weight and input at every training step. Modules register their
children in construction order, and every norm-after-conv block in mmcv, mmdet and torchvision
(``ConvModule``, ResNet/ResNeXt ``Bottleneck``/``BasicBlock``, stems, ``downsample``
Sequentials, FPN and RoI heads) builds its conv before its norm. So the conv that feeds a CBN
layer is the nearest ``nn.Conv2d`` before it in ``named_modules()`` order with as many output
channels. At run time each training step checks that the CBN input *is* that conv's output,
so a wrong guess is an error, never silent.
"""
from __future__ import annotations

from torch import nn

from .cbn import CrossIterationBatchNorm2d
from .sync_cbn import SyncCrossIterationBatchNorm2d

__all__ = ['pair_cbn_layers', 'convert_cbn', 'cbn_layers']


def cbn_layers(model: nn.Module) -> list[tuple[str, CrossIterationBatchNorm2d]]:
    """All CBN layers of ``model`` with their module paths."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, CrossIterationBatchNorm2d)]


def pair_cbn_layers(model: nn.Module, strict: bool = True) -> dict[str, str]:
    """Pair every CBN layer of ``model`` with the conv that produces its input.

    Idempotent. Layers with ``compensation='none'`` need no conv and are paired when one is
    found, left alone otherwise.

    Args:
        model: any module tree (an mmdet detector, a torchvision model...).
        strict: raise when a Taylor-compensated CBN layer has no conv before it.

    Returns:
        ``{cbn_path: conv_path}`` for the layers paired.

    Raises:
        RuntimeError: naming every unpaired layer and the fix, if ``strict``.
    """
    pairs: dict[str, str] = {}
    unpaired: list[str] = []
    last_conv: tuple[str, nn.Conv2d] | None = None
    # every path to a shared module: a conv shared by the levels of a head, each level with
    # its own norm (RTMDet's SepBN head), feeds each of those norms
    for name, module in model.named_modules(remove_duplicate=False):
        inside_last_conv = last_conv is not None and name.startswith(last_conv[0] + '.')
        if isinstance(module, nn.Conv2d) and not inside_last_conv:
            last_conv = (name, module)  # a conv's own sub-convs (SAConv2d's) don't feed a norm
        elif isinstance(module, CrossIterationBatchNorm2d):
            module.layer_name = name or module.layer_name
            if last_conv is not None and last_conv[1].out_channels == module.num_features:
                module.pair(last_conv[1], name)
                pairs[name] = last_conv[0]
                last_conv = None
            elif module.compensation == 'taylor':
                unpaired.append(name)
    if unpaired and strict:
        raise RuntimeError(
            f'{len(unpaired)} CBN layer(s) have no nn.Conv2d with matching output channels '
            f'right before them: {", ".join(unpaired)}. CBN compensates its statistics with the '
            'weights of the conv that feeds it, so it must directly follow one (as in '
            "ConvModule with order ('conv', 'norm', 'act')). Fix: use BN/GN for these layers, "
            "or CBN with compensation='none' (Naive CBN).")
    return pairs


def convert_cbn(module: nn.Module, window_size: int = 4, compensation: str = 'taylor',
                burnin_iters: int = 0, *, sync: bool = False, **kwargs) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by CBN and pair the new layers.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: parameters (``bias=False``
    included), running statistics, ``requires_grad``, device and dtype carry over; the input
    module is changed in place and returned (or the new layer, when ``module`` itself is a
    BatchNorm2d). ``sync=True`` makes :class:`SyncCrossIterationBatchNorm2d` layers (extra
    keyword ``process_group``). Extra keyword arguments go to the layer.
    """
    layer = SyncCrossIterationBatchNorm2d if sync else CrossIterationBatchNorm2d
    converted = _convert(module, layer, dict(window_size=window_size, compensation=compensation,
                                             burnin_iters=burnin_iters, **kwargs))
    if not isinstance(converted, CrossIterationBatchNorm2d):
        pair_cbn_layers(converted)
    return converted


def _convert(module: nn.Module, layer: type, cbn_kwargs: dict) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossIterationBatchNorm2d):
        # the device and dtype of the layer's parameters, else of its running statistics
        floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        new = layer(module.num_features, module.eps, module.momentum, module.affine,
                    module.track_running_stats, device=floats[0].device if floats else None,
                    dtype=floats[0].dtype if floats else None,
                    bias=module.bias is not None, **cbn_kwargs)
        new.load_state_dict(module.state_dict(), strict=False)
        for name, parameter in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(parameter.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child, layer, cbn_kwargs))
    return module
