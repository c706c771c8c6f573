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
from .units import AtomUnit, ChannelUnit, ResidualUnit
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


def _mbv2_block(block):
    """Whether ``block`` is an mmpretrain MobileNetV2 ``InvertedResidual``
    of ConvModules with BNs (``conv = [(expand,) depthwise, project]``)."""
    convs = getattr(block, 'conv', None)
    return isinstance(convs, nn.Sequential) and len(convs) in (2, 3) and \
        all(hasattr(c, 'conv') and _bn(getattr(c, 'norm', None))
            for c in convs) and hasattr(block, 'use_res_connect') and \
        _plain_conv(convs[-1].conv) and (
            len(convs) == 2 or _plain_conv(convs[0].conv))


def _act(conv_module):
    return conv_module.activate if conv_module.with_activation else None


@SEARCH.register_module()
class MobileNetV2StreamFinder:
    """The channels between mmpretrain MobileNetV2's blocks: the stem, each
    residual stream and the last conv.

    * Stem (``conv1``) -> the first block. Without expansion (the stock
      net) its channels run through the first block's depthwise conv to its
      projection: unit ``layer1.0.conv.0.bn`` gated by that depthwise BN
      (produced by the stem and the depthwise, read by the 1x1 projection:
      exact). With expansion: unit ``conv1.bn`` read by the expand conv.
    * Residual streams: a block without residual connection starts a stream
      (its projection writes it), every following residual block adds its
      projection; the blocks after it (their expand convs), the next
      stream's first block and the last conv read it. A
      :class:`~atomnas_mm.search.units.ResidualUnit` named by the first
      projection's BN, gated jointly by every writer's BN (``combine``),
      exact (1x1 readers). A stream that leaves the backbone (its stage in
      ``out_indices``) or is read by a depthwise conv (a block without
      expansion) is skipped.
    * Last conv (``conv2``) -> global average pooling -> the classifier's
      ``fc``: unit ``conv2.bn``, the removed channels' constant into the
      fc's bias (exact). Only in an ``ImageClassifier`` whose neck is
      ``GlobalAveragePooling`` and head a ``LinearClsHead`` reading
      ``out_indices=(7, )``; else skipped.

    Args:
        stem, streams, last_conv (bool): Which units to take.
        combine (str): How a stream channel's writers' scales combine
            (:class:`~atomnas_mm.search.units.ResidualUnit`).
    """

    def __init__(self, stem=True, streams=True, last_conv=True,
                 combine='max'):
        if combine not in ResidualUnit.COMBINE:
            raise ValueError(f'combine: one of {ResidualUnit.COMBINE}, got '
                             f'{combine!r}')
        self.stem, self.streams, self.last_conv = stem, streams, last_conv
        self.combine = combine

    def __call__(self, model, skipped, claimed):
        heads = {id(m.backbone): m for m in model.modules()
                 if isinstance(getattr(m, 'backbone', None), nn.Module)}
        for name, net in _named(model, claimed, {'MobileNetV2'}):
            if not (hasattr(net, 'layers') and hasattr(net, 'conv1')
                    and hasattr(net, 'conv2')):
                continue
            claimed.add(id(net))
            yield from self._units(name + '.' if name else '', net,
                                   heads.get(id(net)), skipped)

    def _units(self, prefix, net, owner, skipped):
        blocks = []  # (layer index, path, block)
        for i, layer_name in enumerate(net.layers[:-1]):
            for j, block in enumerate(getattr(net, layer_name)):
                if not _mbv2_block(block):
                    skipped.append((f'{prefix}{layer_name}.{j}', 'not the '
                                    'MobileNetV2 block layout: its stream '
                                    'is not searched'))
                    return
                blocks.append((i, f'{prefix}{layer_name}.{j}', block))
        if not blocks:
            return
        if self.stem:
            yield from self._stem(prefix, net, blocks[0], skipped)
        streams = []
        for entry in blocks:
            if entry[2].use_res_connect and streams:
                streams[-1].append(entry)
            else:
                streams.append([entry])
        if self.streams:
            for k, stream in enumerate(streams):
                if stream[0][2].use_res_connect:  # the first block
                    skipped.append((stream[0][1], 'its stream starts at the '
                                    'stem (the first block is residual): '
                                    'not searched'))
                    continue
                after = streams[k + 1][0] if k + 1 < len(streams) else None
                unit = self._stream(prefix, net, stream, after, skipped)
                if unit is not None:
                    yield unit
        if self.last_conv:
            unit = self._last(prefix, net, owner, skipped)
            if unit is not None:
                yield unit

    def _stem(self, prefix, net, first, skipped):
        _, path, block = first
        stem = net.conv1
        if not (_plain_conv(stem.conv) and _bn(stem.norm)):
            skipped.append((f'{prefix}conv1', 'stem is not conv + BN: not '
                            'searched'))
            return
        if block.use_res_connect:
            skipped.append((f'{prefix}conv1', 'the stem\'s channels feed a '
                            'residual addition: not searched'))
            return
        if len(block.conv) == 3:
            expand = block.conv[0]
            yield ChannelUnit(f'{prefix}conv1.{stem.norm_name}', stem.norm,
                              producers=[stem.conv, stem.norm],
                              consumers=[(expand.conv, expand.norm)],
                              act=_act(stem))
            return
        dw, project = block.conv
        if dw.conv.groups != dw.conv.in_channels or \
                dw.conv.out_channels != dw.conv.in_channels:
            skipped.append((path, 'first block is not depthwise: the stem '
                            'is not searched'))
            return
        # the first block's hidden channels are the stem's: one unit
        skipped[:] = [s for s in skipped if s[0] != path]
        yield ChannelUnit(f'{path}.conv.0.{dw.norm_name}', dw.norm,
                          producers=[stem.conv, stem.norm, dw.conv, dw.norm],
                          consumers=[(project.conv, project.norm)],
                          act=_act(dw))

    def _stream(self, prefix, net, stream, after, skipped):
        first = stream[0][1]
        ends = {i for i, _, _ in stream}
        leaving = [i for i in net.out_indices if i in ends and (
            after is None or after[0] != i)]
        if leaving:
            skipped.append((first, f'its stream is an output of the backbone '
                            f'(out_indices {leaving[0]}): not searched'))
            return None
        readers = [entry for entry in stream[1:]] + (
            [after] if after is not None else [])
        if any(len(block.conv) != 3 for _, _, block in readers):
            skipped.append((first, 'its stream is read by a depthwise conv '
                            '(a block without expansion): not searched'))
            return None
        gates, producers, acts = [], [], []
        for _, _, block in stream:
            project = block.conv[-1]
            gates.append(project.norm)
            producers += [project.conv, project.norm]
            acts.append(_act(project))
        consumers = [(block.conv[0].conv, block.conv[0].norm)
                     for _, _, block in readers]
        reads = list(range(1, len(stream))) + (
            [len(stream)] if after is not None else [])
        if after is None:
            consumers.append((net.conv2.conv, net.conv2.norm))
            reads.append(len(stream))
            if not (_plain_conv(net.conv2.conv) and _bn(net.conv2.norm)):
                skipped.append((first, 'the last conv is not conv + BN: the '
                                'last stream is not searched'))
                return None
        block = stream[0][2]
        return ResidualUnit(
            f'{first}.conv.{len(block.conv) - 1}.{block.conv[-1].norm_name}',
            gates, producers, consumers, reads, acts, combine=self.combine)

    def _last(self, prefix, net, owner, skipped):
        where = f'{prefix}conv2'
        head = getattr(owner, 'head', None)
        neck = getattr(owner, 'neck', None)
        fc = getattr(head, 'fc', None)
        conv2 = net.conv2
        if owner is None or type(neck).__name__ != 'GlobalAveragePooling' or \
                type(head).__name__ != 'LinearClsHead' or \
                not isinstance(fc, nn.Linear) or fc.bias is None or \
                tuple(net.out_indices) != (len(net.layers) - 1, ):
            skipped.append((where, 'the last conv\'s outputs leave the '
                            'backbone to a reader other than global average '
                            'pooling and a LinearClsHead: not searched'))
            return None
        if not (_plain_conv(conv2.conv) and _bn(conv2.norm)):
            skipped.append((where, 'not conv + BN: not searched'))
            return None
        return ChannelUnit(f'{where}.{conv2.norm_name}', conv2.norm,
                           producers=[conv2.conv, conv2.norm],
                           consumers=[(fc, 'bias')], act=_act(conv2))


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
    feed the residual addition: they gate the stage streams
    (:class:`ResNetStreamFinder`), not these units. Blocks with grouped
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


_RESNETS = {'ResNet', 'ResNetV1c', 'ResNetV1d', 'ResNeXt', 'ResNet_CIFAR'}


def _resnet_block(block):
    """Why ``block`` is not a BasicBlock / Bottleneck whose stream side
    (conv1, the last conv and BN, the downsample) is plain, or None."""
    if type(block).__name__ not in ('BasicBlock', 'Bottleneck') or not all(
            hasattr(block, a) for a in ('conv1', 'norm1', 'conv2', 'norm2')):
        return 'not a ResNet BasicBlock / Bottleneck'
    if getattr(block, 'with_plugins', False):
        return 'plugins'
    last, norm = _last_of(block)
    if not (_plain_conv(block.conv1) and _plain_conv(last)):
        return 'its conv1 or last conv is grouped'
    if not all(_affine_bn(n) for n in (block.norm1, norm)):
        return 'its norms are not BatchNorm with affine scales'
    ds = block.downsample
    if ds is not None and _downsample(ds) is None:
        return 'its downsample is not (average pooling,) 1x1 conv, BN'
    return None


def _last_of(block):
    """The conv and BN writing a block's residual branch."""
    if hasattr(block, 'conv3'):
        return block.conv3, block.norm3
    return block.conv2, block.norm2


def _affine_bn(norm):
    return _bn(norm) and norm.weight is not None and norm.track_running_stats


def _downsample(ds):
    """``(conv, bn)`` of a downsample ``[(AvgPool2d,) 1x1 conv, BN]`` whose
    pooling keeps a constant map constant, or None."""
    layers = list(ds) if isinstance(ds, nn.Sequential) else []
    if len(layers) < 2 or not (_plain_conv(layers[-2]) and _affine_bn(
            layers[-1])) or layers[-2].kernel_size != (1, 1):
        return None
    for pool in layers[:-2]:
        if not (isinstance(pool, nn.AvgPool2d) and (
                not pool.count_include_pad or not pool.padding)):
            return None
    return layers[-2], layers[-1]


def _stem(net):
    """``(conv, bn, act)`` of the stem's last conv, or why not."""
    if getattr(net, 'deep_stem', False):
        stem = list(getattr(net, 'stem', []))
        if stem and all(hasattr(m, 'conv') for m in stem):  # ConvModules
            last = stem[-1]
            layers = (last.conv, getattr(last, 'norm', None),
                      _act(last) if hasattr(last, 'with_activation') else
                      None)
        elif len(stem) >= 3:  # mmdet: conv, BN, ReLU, ...
            layers = tuple(stem[-3:])
        else:
            return 'the deep stem is not conv, BN, ReLU layers'
    else:
        layers = (getattr(net, 'conv1', None), getattr(net, 'norm1', None),
                  getattr(net, 'relu', None))
    conv, norm, act = layers
    if not (_plain_conv(conv) and _affine_bn(norm) and isinstance(
            act, (nn.ReLU, nn.ReLU6))):
        return 'the stem is not conv, BN, ReLU'
    return conv, norm, act


def _classifier_fc(owner, net, last):
    """The classifier's ``fc`` when the backbone's last stage is read by
    global average pooling and a LinearClsHead only, else None."""
    head = getattr(owner, 'head', None)
    fc = getattr(head, 'fc', None)
    if owner is None or type(getattr(owner, 'neck', None)).__name__ != \
            'GlobalAveragePooling' or type(head).__name__ != \
            'LinearClsHead' or not isinstance(fc, nn.Linear) or \
            fc.bias is None or _out_indices(net)[-1:] != [last]:
        return None
    return fc


def _out_indices(net):
    stages = len(net.res_layers)
    return sorted(i % stages for i in net.out_indices)


@SEARCH.register_module()
class ResNetStreamFinder:
    """The channels between ResNet blocks (mmpretrain's and mmdet's ResNet,
    ResNetV1c/V1d, ResNeXt, ResNet_CIFAR): each stage's residual stream and
    the stem.

    * Streams: a block with a downsample starts a stream, written by its
      last BN (``bn2`` / ``bn3``) and the downsample's BN; every following
      block without downsample adds its last BN's output; a first stage
      without downsample continues the stem's output (the stem's BN is its
      first writer, through ReLU and max-pooling). ReLU follows every
      addition. Readers: every block's ``conv1`` inside the stream, the next
      stream's first ``conv1`` and downsample conv, and for the last stage
      of an ``ImageClassifier`` with a ``GlobalAveragePooling`` neck and a
      ``LinearClsHead`` its ``fc``. A
      :class:`~atomnas_mm.search.units.ResidualUnit` named by the first
      block's last BN, gated jointly by every writer's BN (``combine``). A
      channel dead in every writer carries a constant along the stream
      (the writers' shifts through the additions and ReLUs), folded into
      each reader: exact for 1x1 readers (Bottleneck ``conv1``, the
      downsample) and for the ``fc`` (its bias), bounded for a BasicBlock's
      padded 3x3 ``conv1`` (``error_bound``).
    * Stem: when the first block has a downsample, the stem's channels
      (its last conv and BN) are read by that block's ``conv1`` and
      downsample conv: a :class:`~atomnas_mm.search.units.ChannelUnit`
      named by the stem's BN.

    A stream with a stage in ``out_indices`` (its output leaves the
    backbone: a detector's neck reads every stage) is skipped, but the last
    stage's of such a classifier. A network with a block of another layout
    (plugins, a grouped ``conv1`` or last conv, a norm that is not BN, a
    downsample that is not ``[(AvgPool2d,) 1x1 conv, BN]``) is skipped as
    a whole; ResNeXt's grouped ``conv2`` is inside the block and does not
    touch its streams. Frozen writers or readers (``frozen_stages``) leave
    the unit out (:func:`~atomnas_mm.search.units.find_units`).

    Args:
        stem, streams (bool): Which units to take.
        combine (str): How a stream channel's writers' scales combine
            (:class:`~atomnas_mm.search.units.ResidualUnit`).
    """

    def __init__(self, stem=True, streams=True, combine='max'):
        if combine not in ResidualUnit.COMBINE:
            raise ValueError(f'combine: one of {ResidualUnit.COMBINE}, got '
                             f'{combine!r}')
        self.stem, self.streams, self.combine = stem, streams, combine

    def __call__(self, model, skipped, claimed):
        heads = {id(m.backbone): m for m in model.modules()
                 if isinstance(getattr(m, 'backbone', None), nn.Module)}
        for name, net in _named(model, claimed, _RESNETS):
            if not (hasattr(net, 'res_layers') and hasattr(
                    net, 'out_indices')):
                continue
            claimed.add(id(net))
            yield from self._units(name + '.' if name else '', net,
                                   heads.get(id(net)), skipped)

    def _units(self, prefix, net, owner, skipped):
        names = {id(m): prefix + n for n, m in net.named_modules()}
        blocks = []  # (stage, block)
        for stage, layer_name in enumerate(net.res_layers):
            for j, block in enumerate(getattr(net, layer_name)):
                why = _resnet_block(block)
                if why is None and j and block.downsample is not None:
                    why = 'a downsample inside its stage'
                if why:
                    skipped.append((names[id(block)], f'{why}: the ResNet '
                                    'streams are not searched'))
                    return
                blocks.append((stage, block))
        if not blocks:
            return
        stem = _stem(net)
        streams = []
        for entry in blocks:
            if entry[1].downsample is None and streams:
                streams[-1].append(entry)
            else:
                streams.append([entry])
        first = blocks[0][1]
        if self.stem and first.downsample is not None:
            if isinstance(stem, str):
                skipped.append((prefix.rstrip('.') or type(net).__name__,
                                f'{stem}: not searched'))
            else:
                conv, norm, act = stem
                ds_conv, ds_norm = _downsample(first.downsample)
                yield ChannelUnit(names[id(norm)], norm,
                                  producers=[conv, norm],
                                  consumers=[(first.conv1, first.norm1),
                                             (ds_conv, ds_norm)], act=act)
        if not self.streams:
            return
        last = len(net.res_layers) - 1
        fc = _classifier_fc(owner, net, last)
        for k, stream in enumerate(streams):
            after = streams[k + 1][0][1] if k + 1 < len(streams) else None
            unit = self._stream(names, net, stream, after, stem, fc, last,
                                skipped)
            if unit is not None:
                yield unit

    def _stream(self, names, net, stream, after, stem, fc, last, skipped):
        block = stream[0][1]
        name = names[id(_last_of(block)[1])]
        ends = {stage for stage, _ in stream}
        leaving = [i for i in _out_indices(net) if i in ends and (
            after is not None or fc is None or i != last)]
        if leaving:
            skipped.append((name, f'its stream is an output of the backbone '
                            f'(out_indices {leaving[0]}), read outside it: '
                            'not searched'))
            return None
        if after is None and fc is None:
            skipped.append((name, 'the last stage\'s stream leaves the '
                            'backbone to a reader other than global average '
                            'pooling and a LinearClsHead: not searched'))
            return None
        gates, producers, post_acts, consumers, reads = [], [], [], [], []
        if block.downsample is None:  # the stem writes the first stage
            if isinstance(stem, str):
                skipped.append((name, f'{stem}: its stream is not '
                                'searched'))
                return None
            conv, norm, act = stem
            gates.append(norm)
            producers += [conv, norm]
            post_acts.append(act)
        for _, block in stream:
            if block.downsample is None:
                consumers.append((block.conv1, block.norm1))
                reads.append(len(gates))
            conv, norm = _last_of(block)
            gates.append(norm)
            producers += [conv, norm]
            relu = getattr(block, 'relu', F.relu)
            post_acts.append(relu if block.downsample is None else None)
            if block.downsample is not None:
                conv, norm = _downsample(block.downsample)
                gates.append(norm)
                producers += [conv, norm]
                post_acts.append(relu)
        if after is not None:
            consumers += [(after.conv1, after.norm1),
                          _downsample(after.downsample)]
            reads += [len(gates)] * 2
        else:
            consumers.append((fc, 'bias'))
            reads.append(len(gates))
        return ResidualUnit(name, gates, producers, consumers, reads,
                            post_acts=post_acts, combine=self.combine)


#: Finders tried on every model, in this order (a module claimed by one is
#: not offered to the next): every unit that can be removed safely, for
#: surgery, checkpoint narrowing and export. The tracing finder comes last
#: and searches only models in which the others claimed nothing.
DEFAULT_FINDERS = (AtomNASFinder(), MobileNetV2Finder(),
                   MobileNetV2StreamFinder(), InvertedResidualFinder(),
                   ResNetFinder(), ResNetStreamFinder(), TracingFinder())
#: The units a search penalises and shrinks unless its config names finders
#: (``AtomShrinkHook(finders=...)``): all but ResNet's streams, which cost
#: 0.3-0.6 points of top-1 on the ResNet-18 demo at 15% and 30% of the
#: FLOPs against its inner channels alone (docs/benchmarks.md).
SEARCH_FINDERS = tuple(f for f in DEFAULT_FINDERS
                       if not isinstance(f, ResNetStreamFinder))
