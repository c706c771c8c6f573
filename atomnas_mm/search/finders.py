"""Finders: which modules of a model form channel units.

A finder is a small registered part (registry ``SEARCH``) called as
``finder(model, skipped, claimed)``: it yields the units it recognises in
``model`` (:class:`~atomnas_mm.search.units.ChannelUnit` or
:class:`~atomnas_mm.search.units.AtomUnit`), adds the ids of the modules it
took to ``claimed`` and appends ``(module name, reason)`` to ``skipped`` for
every block it recognised but cannot prove safe to narrow. A finder only
takes channel sets whose removal it can state exactly: every layer that
produces or reads them is known, and no residual addition, concatenation
or grouped convolution couples them to other channels.
"""
import torch.nn as nn
import torch.nn.functional as F

from ..models.blocks import AtomicBlock
from ..registry import SEARCH
from .units import AtomUnit, ChannelUnit
from .tracing import TracingFinder


def _bn(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _plain_conv(conv, groups=1):
    return isinstance(conv, nn.Conv2d) and conv.groups == groups


def _named(model, claimed, type_names):
    for name, module in model.named_modules():
        if id(module) not in claimed and type(module).__name__ in type_names:
            yield name, module


@SEARCH.register_module()
class AtomNASFinder:
    """The atoms of every searchable :class:`AtomicBlock` (one unit per
    block, named by the block's path)."""

    def __call__(self, model, skipped, claimed):
        for name, module in model.named_modules():
            if isinstance(module, AtomicBlock) and module.searchable:
                claimed.add(id(module))
                yield AtomUnit(name, module)


@SEARCH.register_module()
class MobileNetV2Finder:
    """The hidden channels of mmpretrain's MobileNetV2 ``InvertedResidual``
    (``conv = [expand, depthwise, project]``, ConvModules).

    Unit ``<block>.conv.1.bn`` (the depthwise BN's path): gated by the depthwise BN; produced by the
    expand conv and BN and the depthwise conv; read by the projection conv,
    whose BN takes the removed channels' constant (exact: 1x1). A block
    without expansion (its hidden channels are the previous block's output,
    tied to the stem) is skipped.
    """

    def __call__(self, model, skipped, claimed):
        for name, block in _named(model, claimed, {'InvertedResidual'}):
            convs = getattr(block, 'conv', None)
            if not isinstance(convs, nn.Sequential) or not all(
                    hasattr(c, 'conv') and hasattr(c, 'norm') for c in convs):
                continue  # another InvertedResidual (MobileNetV3's)
            if len(convs) != 3:
                skipped.append((name, 'no expansion conv: its hidden '
                                'channels are the block input, not searched'))
                continue
            expand, dw, project = convs
            hidden = dw.conv.out_channels
            if not (_plain_conv(expand.conv) and _plain_conv(project.conv)
                    and _bn(expand.norm) and _bn(dw.norm)
                    and _bn(project.norm) and dw.conv.groups == hidden
                    == dw.conv.in_channels == expand.conv.out_channels):
                skipped.append((name, 'not the expand/depthwise/project '
                                'layout with BNs: not searched'))
                continue
            claimed.add(id(block))
            yield ChannelUnit(
                f'{name}.conv.1.{dw.norm_name}', dw.norm,
                producers=[expand.conv, expand.norm, dw.conv, dw.norm],
                consumers=[(project.conv, project.norm)],
                act=dw.activate if dw.with_activation else None)


@SEARCH.register_module()
class InvertedResidualFinder:
    """The hidden channels of mmpretrain's ``utils.InvertedResidual``
    (MobileNetV3, EfficientNet): ``expand_conv``, ``depthwise_conv``,
    optional ``se`` (SELayer), ``linear_conv``, ConvModules.

    Unit ``<block>.depthwise_conv.bn``: gated by the depthwise BN; produced
    by the expand conv and BN, the depthwise conv and the SE's excite conv;
    read by the SE's squeeze conv (a removed channel's pooled constant goes
    into its bias: exact) and by the projection, whose BN takes the
    constant (exact without SE; with SE the constant passes the
    input-dependent gate: bounded). Blocks without an expand conv are
    skipped.
    """

    def __call__(self, model, skipped, claimed):
        for name, block in _named(model, claimed, {'InvertedResidual'}):
            if not hasattr(block, 'depthwise_conv') or not hasattr(
                    block, 'linear_conv'):
                continue
            if not getattr(block, 'with_expand_conv', False):
                skipped.append((name, 'no expansion conv: its hidden '
                                'channels are the block input, not searched'))
                continue
            expand, dw, project = (block.expand_conv, block.depthwise_conv,
                                   block.linear_conv)
            se = block.se if getattr(block, 'with_se', False) else None
            hidden = dw.conv.out_channels
            layout = (_plain_conv(expand.conv) and _plain_conv(project.conv)
                      and all(_bn(getattr(c, 'norm', None))
                              for c in (expand, dw, project))
                      and dw.conv.groups == hidden == dw.conv.in_channels)
            if se is not None:
                layout = layout and all(
                    _plain_conv(c.conv) and c.conv.bias is not None and
                    not c.with_norm for c in (se.conv1, se.conv2)) and \
                    se.conv2.conv.out_channels == hidden
            if not layout:
                skipped.append((name, 'not the expand/depthwise/(SE)/project '
                                'layout with BNs: not searched'))
                continue
            claimed.add(id(block))
            producers = [expand.conv, expand.norm, dw.conv, dw.norm]
            consumers = [(project.conv, project.norm)]
            if se is not None:
                producers.append(se.conv2.conv)
                consumers.insert(0, (se.conv1.conv, 'bias'))
            yield ChannelUnit(
                f'{name}.depthwise_conv.{dw.norm_name}', dw.norm,
                producers=producers, consumers=consumers,
                act=dw.activate if dw.with_activation else None,
                gated=project.conv if se is not None else None,
                pooled=dw.conv if se is not None else None)


@SEARCH.register_module()
class ResNetFinder:
    """The inner channels of ResNet blocks (mmpretrain's and mmdet's
    ``BasicBlock`` and ``Bottleneck``; also ResNetV1c/V1d, ResNet-D stems
    aside).

    A Bottleneck gives two units, named by their BN's path (``bn1``,
    ``bn2``): conv1's outputs, read by conv2 (a padded 3x3, so a removed
    channel's constant is folded into norm2 exactly in the interior and
    bounded at the borders), and conv2's outputs, read by the 1x1 conv3
    (exact); a BasicBlock gives the first. The block outputs (norm3 / norm2)
    feed the residual addition and are never units. Blocks with grouped
    convs (ResNeXt), deformable convs or plugins are skipped.
    """

    def __call__(self, model, skipped, claimed):
        for name, block in _named(model, claimed,
                                  {'Bottleneck', 'BasicBlock'}):
            if not all(hasattr(block, a) for a in ('conv1', 'conv2',
                                                    'norm1', 'norm2')):
                continue
            bottleneck = hasattr(block, 'conv3')
            convs = [block.conv1, block.conv2] + (
                [block.conv3] if bottleneck else [])
            norms = [block.norm1, block.norm2] + (
                [block.norm3] if bottleneck else [])
            why = None
            if getattr(block, 'with_dcn', False) or getattr(
                    block, 'with_plugins', False):
                why = 'deformable conv or plugins: not searched'
            elif not all(_plain_conv(c) for c in convs):
                why = ('grouped conv (ResNeXt) couples its channel groups: '
                       'not searched')
            elif not all(_bn(n) for n in norms):
                why = 'norms are not BatchNorm: not searched'
            if why:
                skipped.append((name, why))
                continue
            claimed.add(id(block))
            act = getattr(block, 'relu', F.relu)
            yield ChannelUnit(f'{name}.{block.norm1_name}', block.norm1,
                              producers=[block.conv1, block.norm1],
                              consumers=[(block.conv2, block.norm2)],
                              act=act)
            if bottleneck:
                yield ChannelUnit(f'{name}.{block.norm2_name}', block.norm2,
                                  producers=[block.conv2, block.norm2],
                                  consumers=[(block.conv3, block.norm3)],
                                  act=act)


#: Finders tried on every model, in this order (a module claimed by one is
#: not offered to the next). The tracing finder comes last and searches
#: only models in which the others claimed nothing.
DEFAULT_FINDERS = (AtomNASFinder(), MobileNetV2Finder(),
                   InvertedResidualFinder(), ResNetFinder(), TracingFinder())
