"""Channel surgery on plain layers, as pure functions of modules.

Everything here edits modules in place and returns (or fills) a *remap*
``{old Parameter: ParamChange}`` that the optimizer state and the EMA copy
follow (``atomnas_mm.search.shrink``). The AtomNAS block's own surgery
(:func:`~atomnas_mm.models.block_surgery.remove_atoms`) and the channel
units of other models (``atomnas_mm.search.units``) are built from these.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn


class ParamChange(NamedTuple):
    """What became of a parameter in a surgery: ``new`` is ``old`` indexed
    by ``steps`` (``((dim, index), ...)``, applied in order), or None when it
    was removed."""

    new: Optional[nn.Parameter]
    steps: Tuple = ()

    def apply(self, tensor):
        """``tensor`` (shaped like the old parameter) sliced like it."""
        for dim, index in self.steps:
            tensor = index_select_like(tensor, dim, index)
        return tensor


REMOVED = ParamChange(None)


def compose(remap):
    """Chain the entries of ``remap`` whose ``new`` was sliced again in the
    same surgery (a layer between two units), so every old parameter maps to
    the parameter the model holds now; intermediate ones are dropped."""
    news = {id(c.new) for c in remap.values() if c.new is not None}
    out = {}
    for old, change in remap.items():
        if id(old) in news:
            continue  # an intermediate tensor
        while change.new is not None and change.new in remap:
            later = remap[change.new]
            change = ParamChange(later.new, change.steps + later.steps)
        out[old] = change
    return out


def index_select_like(tensor, dim, index):
    """``tensor.index_select(dim, index)`` keeping its memory format."""
    out = tensor.index_select(dim, index.to(tensor.device))
    if tensor.dim() == 4:
        # Exact strides (DDP buckets compare them): is_contiguous() accepts
        # both layouts for 1x1 and depthwise weights.
        n, c, h, w = tensor.shape
        if tensor.stride() == (h * w * c, 1, w * c, c) != (c * h * w, h * w,
                                                          w, 1):
            out = torch.empty(out.shape, dtype=out.dtype, device=out.device,
                              memory_format=torch.channels_last).copy_(out)
    return out


def slice_param(module, name, dim, index, remap):
    """Replace ``module.<name>`` by its ``index`` slice on ``dim``."""
    old = module._parameters[name]
    new = nn.Parameter(index_select_like(old.detach(), dim, index),
                       requires_grad=old.requires_grad)
    module._parameters[name] = new
    remap[old] = ParamChange(new, ((dim, index), ))


def slice_norm(norm, index, remap):
    """Keep the ``index`` channels of a BN layer (affine and statistics)."""
    for name in ('weight', 'bias'):
        if norm._parameters.get(name) is not None:
            slice_param(norm, name, 0, index, remap)
    for name in ('running_mean', 'running_var'):
        if norm._buffers.get(name) is not None:
            norm._buffers[name] = norm._buffers[name].index_select(
                0, index.to(norm._buffers[name].device))
    norm.num_features = len(index)


def slice_conv(conv, index, remap, dim):
    """Keep the ``index`` output (dim 0, with the bias) or input (dim 1)
    channels of a conv; a depthwise conv (``groups == in_channels``) keeps
    them on both sides."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    if dim == 1 and conv.groups > 1:
        raise ValueError(f'slice_conv: the input of a grouped conv '
                         f'(groups={conv.groups}) is sliced with its output')
    slice_param(conv, 'weight', dim, index, remap)
    if dim == 0:
        if conv.bias is not None:
            slice_param(conv, 'bias', 0, index, remap)
        if depthwise:
            conv.in_channels = conv.groups = len(index)
        conv.out_channels = len(index)
    else:
        conv.in_channels = len(index)


def slice_conv_module(cm, index, remap, dim):
    """Slice an mmcv ConvModule on its output (dim 0, with its norm) or its
    input (dim 1)."""
    slice_conv(cm.conv, index, remap, dim)
    if dim == 0:
        cm.out_channels = len(index)
        if cm.conv.groups > 1:
            cm.in_channels = len(index)
        if cm.with_norm:
            slice_norm(cm.norm, index, remap)
    else:
        cm.in_channels = len(index)
