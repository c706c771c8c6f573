"""The ONNX Runtime form of AtomNAS nets: kernel groups aligned with zeros.

ONNX Runtime on a CPU runs convolutions fastest in its blocked channel
layout (NCHWc, blocks of 16 channels with AVX-512, 8 with AVX2). A conv
whose channels are not a multiple of the block, and every ``Split``, leaves
that layout: the graph then reorders tensors back and forth around it. An
AtomNAS block as built (one wide expand, ``Split`` into kernel groups of
37, 145, ... channels, ``Concat``) hits both, which is why AtomNAS-A ran at
0.39x MobileNetV2's speed there (docs/benchmarks.md, "Deployment").

:func:`onnx_model` converts an eval-mode model into an exact form without
either: BN folded into the convs; per block, the kernel groups are gathered
into *parts* (a part is one or more kernel groups, its depthwise kernels
zero-padded to the part's largest), each part gets its own 1x1 expand conv
and depthwise conv, widened with zero channels to a multiple of ``align``;
the parts are concatenated (aligned, so ``Concat`` stays blocked) before one
projection conv. Zero channels output ``act(0)`` into zero projection
columns (and zero SE squeeze columns), so outputs are unchanged up to float
rounding. ``merge='merged'`` (the default, the fastest measured at batch 1
and 32: docs/benchmarks.md, "Deployment") makes one part per block, i.e.
``deploy_model``'s merged depthwise conv, aligned; ``'split'`` one part per
kernel group; ``'auto'`` chooses per block (:func:`choose_parts`: padded
multiply-adds plus a fixed cost per part).
"""
import copy
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn

from .blocks import AtomicBlock

__all__ = ['DEFAULT_ALIGN', 'PART_OVERHEAD', 'MERGE_MODES', 'OnnxAtomicBlock',
           'choose_parts', 'onnx_block', 'onnx_model', 'pad_channels']

#: ONNX Runtime's NCHWc block on AVX-512 CPUs (8 on AVX2: 16 is aligned
#: there too, at a few more multiply-adds).
DEFAULT_ALIGN = 16
#: Fixed cost of one part, in multiply-adds, for :func:`choose_parts`
#: (one more conv pair and concat input; measured, docs/benchmarks.md).
PART_OVERHEAD = 2e5
MERGE_MODES = ('auto', 'split', 'merged')


def ceil_to(n, align):
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def pad_channels(tensor, size, dim=0):
    """``tensor`` widened with zeros along ``dim`` to ``size``."""
    extra = size - tensor.shape[dim]
    if extra < 0:
        raise ValueError(f'pad_channels: {tensor.shape[dim]} channels do not '
                         f'fit in {size}')
    if not extra:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


def _set_partitions(n):
    """Every partition of ``range(n)`` into non-empty sets."""
    if n == 0:
        yield []
        return
    for rest in _set_partitions(n - 1):
        for i in range(len(rest)):
            yield rest[:i] + [rest[i] + [n - 1]] + rest[i + 1:]
        yield rest + [[n - 1]]


def _part_cost(block, part, align, pixels, overhead):
    """Padded multiply-adds of one part at ``pixels`` input pixels."""
    convs = [list(block.dw.values())[g].conv for g in part]
    size = max(c.kernel_size[0] for c in convs)
    width = ceil_to(sum(c.out_channels for c in convs), align)
    stride = convs[0].stride[0] * convs[0].stride[1]
    out_pixels = pixels / stride
    expand = block.in_channels * pixels if block.expand is not None else 0
    return width * (expand + (size * size + block.out_channels) * out_pixels) \
        + overhead


def choose_parts(block, merge='auto', align=DEFAULT_ALIGN, pixels=1.0,
                 overhead=PART_OVERHEAD):
    """Which kernel groups of ``block`` share a part (group indices).

    Args:
        block (AtomicBlock): The block.
        merge (str): ``'auto'``: the partition of least padded multiply-adds
            plus ``overhead`` per part; ``'split'``: one part per kernel
            group; ``'merged'``: one part.
        align (int): Channel alignment of every part.
        pixels (float): Input pixels (H * W) of the block.
        overhead (float): Fixed cost of a part, in multiply-adds.

    Returns:
        list[list[int]]: The parts, each a list of kernel-group indices.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f'merge must be one of {MERGE_MODES}, got {merge!r}')
    n = len(block.dw)
    if merge == 'split' or block.expand is None:
        return [[i] for i in range(n)]
    if merge == 'merged':
        return [list(range(n))]
    return min(_set_partitions(n), key=lambda parts: sum(
        _part_cost(block, p, align, pixels, overhead) for p in parts))


def _activation(conv_module):
    return copy.deepcopy(conv_module.activate) \
        if conv_module.with_activation else nn.Identity()


class OnnxAtomicBlock(nn.Module):
    """An :class:`AtomicBlock` (BN folded) in parts of aligned widths.

    Runs ``cat([act(dw_i(act(expand_i(x)))) for parts]) -> [SE] ->
    project`` (+ identity); without an expand conv the input is split.

    Args:
        block (AtomicBlock): The block, BN already folded into its convs
            (``mmcv.cnn.fuse_conv_bn``); not changed.
        parts (list[list[int]]): Kernel-group indices of each part
            (:func:`choose_parts`).
        align (int): Every part's width is rounded up to a multiple of it
            with zero channels (not without an expand conv: the input
            width is given).
    """

    def __init__(self, block, parts, align=DEFAULT_ALIGN):
        super().__init__()
        self.use_res = block.use_res
        self.expands, self.dws = nn.ModuleList(), nn.ModuleList()
        self.se = self.project = None
        self.widths, self.parts = [], [list(p) for p in parts]
        if block.project is None:  # emptied residual block
            self.register_buffer('bias', block.bias.detach().clone())
            return
        self.bias = None
        if sorted(itertools.chain(*parts)) != list(range(len(block.dw))):
            raise ValueError(f'parts {parts} must cover the {len(block.dw)} '
                             'kernel groups once each')
        branches = list(block.dw.values())
        if len({type(b.activate) if b.with_activation else None
                for b in branches}) != 1:
            raise ValueError('deploy: kernel branches with different '
                             'activations')
        self.dw_act = _activation(branches[0])
        self.expand_act = _activation(block.expand) if block.expand \
            is not None else None
        offsets = [0] + list(itertools.accumulate(block.hidden))
        index = []  # original hidden channel of every new one; -1: zero
        for part in parts:
            ids = torch.cat([torch.arange(offsets[g], offsets[g + 1])
                             for g in part])
            width = ceil_to(len(ids), align) if block.expand is not None \
                else len(ids)
            self.widths.append(width)
            index.append(pad_channels(ids + 1, width) - 1)
            if block.expand is not None:
                src = block.expand.conv
                conv = nn.Conv2d(src.in_channels, width, 1).to(src.weight)
                conv.weight.data = pad_channels(src.weight.detach()[ids],
                                                width)
                conv.bias.data = pad_channels(_bias(src)[ids], width)
                self.expands.append(conv)
            convs = [branches[g].conv for g in part]
            size = max(c.kernel_size[0] for c in convs)
            dw = nn.Conv2d(width, width, size, convs[0].stride, size // 2,
                           groups=width).to(convs[0].weight)
            dw.weight.data = pad_channels(torch.cat([F.pad(
                c.weight.detach(), [(size - c.kernel_size[0]) // 2] * 4)
                for c in convs]), width)
            dw.bias.data = pad_channels(torch.cat([_bias(c) for c in convs]),
                                        width)
            self.dws.append(dw)
        index = torch.cat(index)
        live = index >= 0
        src = block.project.conv
        self.project = nn.Conv2d(len(index), src.out_channels, 1).to(
            src.weight)
        self.project.weight.data = _scatter(src.weight.detach(), index, 1)
        self.project.bias.data = _bias(src).clone()
        if block.se is not None:
            se = self.se = copy.deepcopy(block.se)
            squeeze, excite = se.conv1.conv, se.conv2.conv
            squeeze.weight = nn.Parameter(_scatter(squeeze.weight.detach(),
                                                   index, 1))
            squeeze.in_channels = len(index)
            excite.weight = nn.Parameter(_scatter(excite.weight.detach(),
                                                  index, 0))
            excite.bias = nn.Parameter(_scatter(_bias(excite), index, 0))
            excite.out_channels = len(index)
        assert live.sum() == sum(block.hidden)

    def forward(self, x):
        if self.project is None:
            return x + self.bias.view(1, -1, 1, 1)
        if len(self.expands):
            outs = [self.dw_act(dw(self.expand_act(expand(x))))
                    for expand, dw in zip(self.expands, self.dws)]
        else:
            chunks = x.split(self.widths, 1) if len(self.dws) > 1 else [x]
            outs = [self.dw_act(dw(c)) for dw, c in zip(self.dws, chunks)]
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.use_res else out


def _bias(conv):
    return conv.bias.detach() if conv.bias is not None else \
        conv.weight.new_zeros(conv.out_channels)


def _scatter(tensor, index, dim):
    """``tensor`` with its ``dim`` re-indexed by ``index`` (-1: zeros)."""
    live = index >= 0
    shape = list(tensor.shape)
    shape[dim] = len(index)
    out = tensor.new_zeros(shape)
    src = tensor.index_select(dim, index[live])
    if dim == 0:
        out[live] = src
    else:
        out[:, live] = src
    return out


def onnx_block(block, pixels=1.0, align=DEFAULT_ALIGN, merge='merged'):
    """The ONNX Runtime form of one eval-mode :class:`AtomicBlock` (BN
    folded on a copy; ``block`` is unchanged).

    Args:
        block (AtomicBlock): The block.
        pixels (float): Its input's H * W (for ``merge='auto'``).
        align (int): Channel alignment (1: none).
        merge (str): See :func:`choose_parts`.

    Returns:
        OnnxAtomicBlock
    """
    block = copy.deepcopy(block).eval()
    with torch.no_grad():
        fuse_conv_bn(block)
        parts = choose_parts(block, merge, align, pixels) \
            if block.project is not None else []
        return OnnxAtomicBlock(block, parts, align).eval()


def onnx_model(model, example, align=DEFAULT_ALIGN, merge='merged'):
    """An eval-mode model holding AtomicBlocks, converted for ONNX Runtime.

    A pure function: the converted copy has every conv-following BN folded
    and every :class:`AtomicBlock` replaced by its :func:`onnx_block`; its
    outputs equal ``model``'s up to float rounding.

    Args:
        model (nn.Module): The model (classifier, backbone, ...).
        example (Tensor): An input of the shape to deploy (batch 1 is
            enough); it gives each block's input size to :func:`choose_parts`.
        align (int): Channel alignment (1: none).
        merge (str): See :func:`choose_parts`.

    Returns:
        nn.Module: The converted copy, in eval mode.
    """
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f'align must be a positive int, got {align!r}')
    model = copy.deepcopy(model).eval()
    pixels = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, args: pixels.__setitem__(m, args[0].shape[-2] *
                                           args[0].shape[-1]))
        for m in model.modules() if isinstance(m, AtomicBlock)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        fuse_conv_bn(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, AtomicBlock):
                parts = choose_parts(m, merge, align, pixels.get(m, 1.0)) \
                    if m.project is not None else []
                new = OnnxAtomicBlock(m, parts, align).eval()
                parent, _, child = name.rpartition('.')
                if not name:
                    return new
                setattr(model.get_submodule(parent), child, new)
    return model
