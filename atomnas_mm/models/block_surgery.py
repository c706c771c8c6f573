"""Removing atoms from an :class:`~atomnas_mm.models.blocks.AtomicBlock`, as
pure functions of the block (docs/method.md, "Shrinking").

An atom is one hidden channel of one kernel size, numbered in concatenated
hidden order. :func:`remove_atoms` slices the expand conv, the depthwise
group, the SE and the projection and returns the parameter remapping that
the optimizer state and the EMA copy follow; the search reaches it through
:class:`~atomnas_mm.search.units.AtomUnit`, the backbone when it narrows to a
checkpoint's widths.
"""
import torch
import torch.nn as nn

from .blocks import dw_key
from .fast_forms import drop_block_caches
from .surgery import REMOVED, slice_conv_module


def atom_outputs(block):
    """Eval-mode output of each atom when its gamma is 0: ``act(beta)``."""
    outs = []
    for m in block.dw.values():
        # A copy: mmcv activations work in place.
        beta = m.norm.bias.detach().clone() if m.norm.bias is not None \
            else m.conv.weight.new_zeros(m.conv.out_channels)
        if m.with_activation:
            beta = m.activate(beta.view(1, -1, 1, 1)).flatten()
        outs.append(beta)
    return torch.cat(outs)


def check_atom_keep(block, keep):
    """Validate surviving atom indices; return them as a sorted LongTensor.

    Raises:
        ValueError: Unsorted, repeated or out-of-range indices, or no atom
            left in a block without residual.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if len(keep) and (keep.min() < 0 or keep.max() >= block.num_atoms
                      or (keep[1:] <= keep[:-1]).any()):
        raise ValueError(f'keep: atom indices must be sorted, unique and '
                         f'in [0, {block.num_atoms}), got {keep.tolist()}')
    if not len(keep) and not block.use_res:
        raise ValueError('keep: a block without residual must keep an atom')
    return keep


def _removed_mask(block, keep):
    mask = torch.ones(block.num_atoms, dtype=torch.bool)
    mask[torch.as_tensor(keep, dtype=torch.long).cpu()] = False
    return mask


def atom_removal_error_bound(block, keep):
    """Bound on the eval-output change :func:`remove_atoms` makes.

    Removed atoms output the constant ``a = act(beta)``. Without SE the
    constant is folded exactly (bound 0). With SE its squeeze part is folded
    too, but the gated part ``a * gate(x)`` depends on the input: the
    projection input may change by up to ``sum |W_proj[:, c] * a_c|`` over
    the removed atoms (per output channel; the maximum is returned).

    Returns:
        float: 0.0 when exact.
    """
    if block.se is None or block.project is None:
        return 0.0
    removed = _removed_mask(block, keep)
    if not removed.any():
        return 0.0
    const = atom_outputs(block)[removed].abs()
    weight = block.project.conv.weight.detach().flatten(1)[:, removed].abs()
    return float((weight @ const).max())


def remove_atoms(block, keep, fold=True):
    """Remove the atoms of ``block`` not in ``keep``, in place.

    Args:
        block (AtomicBlock): The block.
        keep (Tensor): Sorted indices of the surviving atoms.
        fold (bool): Fold the removed atoms' constant output (eval mode,
            gamma ~ 0) into the projection BN's running mean (or the identity
            bias of an emptied block), so eval outputs do not change. In SE
            blocks only the squeeze part is folded (into the squeeze conv's
            bias); see :func:`atom_removal_error_bound`.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping for the
        optimizer and the EMA copy.
    """
    keep = check_atom_keep(block, keep)
    # The cached forward state and inference form hold the modules and
    # tensors about to be replaced: drop them now, so that the memory is
    # free when the shrink returns (not at the next forward).
    drop_block_caches(block)
    removed = _removed_mask(block, keep)
    weights = block.penalty_weight
    remap = {}
    if fold and removed.any():
        const = atom_outputs(block) * removed.to(weights.dtype)
        if block.se is None:
            project_shift = \
                block.project.conv.weight.detach().flatten(1) @ const
        else:  # the gated part depends on the input: not folded
            squeeze = block.se.conv1.conv
            squeeze.bias.data += squeeze.weight.detach().flatten(1) @ const
            project_shift = const.new_zeros(block.out_channels)
    if not len(keep):
        norm = block.project.norm
        bias = torch.zeros_like(norm.running_mean)
        if fold and removed.any():
            bias = (project_shift - norm.running_mean) / torch.sqrt(
                norm.running_var + norm.eps) * norm.weight.detach() + \
                norm.bias.detach()
        for p in block.parameters():
            remap[p] = REMOVED
        block.expand = block.se = block.project = None
        block.dw = nn.ModuleDict()
        block.penalty_weight = weights[:0]
        block.register_buffer('bias', bias.to(weights))
        return remap

    keep = keep.to(weights.device)
    if block.expand is not None:
        slice_conv_module(block.expand, keep, remap, dim=0)
    offset = 0
    for k, h in block.atom_groups():
        local = keep[(keep >= offset) & (keep < offset + h)] - offset
        key = dw_key(k)
        if len(local):
            slice_conv_module(block.dw[key], local, remap, dim=0)
        else:
            for p in block.dw[key].parameters():
                remap[p] = REMOVED
            del block.dw[key]
        offset += h
    if block.se is not None:
        slice_conv_module(block.se.conv1, keep, remap, dim=1)
        slice_conv_module(block.se.conv2, keep, remap, dim=0)
    slice_conv_module(block.project, keep, remap, dim=1)
    if fold and removed.any():
        block.project.norm.running_mean -= project_shift.to(
            block.project.norm.running_mean)
    block.penalty_weight = weights.index_select(0, keep)
    return remap
