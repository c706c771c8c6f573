"""Inference-only conversion of AtomNAS models (deploy mode).

``deploy_model`` is a pure function: it returns a converted copy of an
eval-mode model and leaves the input untouched. In the copy every BatchNorm
that follows a conv is folded into the conv (stem, blocks, head), and every
:class:`~atomnas_mm.models.blocks.AtomicBlock` becomes a
:class:`DeployedAtomicBlock` (:func:`deploy_block`): the kernel groups
padded to the largest kernel size and merged into ONE depthwise conv, so the
block runs ``expand -> depthwise -> [SE] -> project`` without split/cat.
Eval outputs are unchanged up to float rounding. The converted model cannot
be trained, shrunk or loaded from AtomNAS checkpoints; convert after loading.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn
from torch.nn.modules import module as _nn_module

from .blocks import AtomicBlock
from .fast_forms import FUSED_ACTS, ConvStep, conv_forward, fusable, tracing

__all__ = ['DeployedAtomicBlock', 'deploy_block', 'deploy_model',
           'merge_depthwise']


def deploy_model(model):
    """Convert an eval-mode AtomNAS model (backbone, classifier or a single
    block) for inference; the input model is left unchanged.

    Args:
        model (nn.Module): Model holding :class:`AtomicBlock` s.

    Returns:
        nn.Module: The converted copy, in eval mode.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        fuse_conv_bn(model)
        if isinstance(model, AtomicBlock):
            return deploy_block(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, AtomicBlock):
                parent_name, _, child = name.rpartition('.')
                setattr(model.get_submodule(parent_name), child,
                        deploy_block(m))
    return model


def deploy_block(block):
    """The inference form of ``block``, whose BNs must already be folded
    into the convs (``mmcv.cnn.fuse_conv_bn``): one merged depthwise conv.

    Returns:
        DeployedAtomicBlock: Shares the SE module with ``block``.
    """
    if block.project is None:
        return DeployedAtomicBlock(None, None, None, None, None, True,
                                   bias=block.bias)
    branches = list(block.dw.values())
    acts = {type(b.activate) if b.with_activation else None
            for b in branches}
    if len(acts) != 1:
        raise ValueError('deploy: kernel branches with different '
                         'activations')
    dw = merge_depthwise([b.conv for b in branches])
    act = copy.deepcopy(branches[0].activate) \
        if branches[0].with_activation else nn.Identity()
    expand = _conv_act(block.expand) if block.expand is not None else None
    return DeployedAtomicBlock(expand, dw, act, block.se,
                               _conv_act(block.project), block.use_res)


class DeployedAtomicBlock(nn.Module):
    """An :class:`AtomicBlock` with folded BNs and merged kernel groups.

    Args:
        expand (nn.Module | None): Folded expand conv (+ activation).
        dw (nn.Conv2d | None): The merged depthwise conv (with bias).
        dw_act (nn.Module): Activation after the depthwise conv.
        se (nn.Module | None): Squeeze-excite module, unchanged.
        project (nn.Conv2d | None): Folded projection conv (with bias).
        use_res (bool): Identity shortcut.
        bias (Tensor | None): Constant of an emptied residual block.
    """

    def __init__(self, expand, dw, dw_act, se, project, use_res, bias=None):
        super().__init__()
        self.expand, self.dw, self.dw_act = expand, dw, dw_act
        self.se, self.project, self.use_res = se, project, use_res
        if bias is not None:
            self.register_buffer('bias', bias.clone())
        else:
            self.bias = None

    def forward(self, x):
        return deployed_forward(self, x)


def _deployed_step(layer, act=None):
    """A :class:`ConvStep` of a deployed conv (``Conv2d`` or
    ``Sequential(Conv2d, act)``), or None when it is not a plain conv."""
    if isinstance(layer, nn.Sequential) and len(layer) == 2:
        layer, act = layer
    if type(layer) is not nn.Conv2d or layer.padding_mode != 'zeros' \
            or layer.dilation != (1, 1) or isinstance(layer.padding, str) \
            or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if isinstance(act, nn.Identity):
        act = None
    return ConvStep(layer.weight, layer.bias, list(layer.stride),
                     list(layer.padding), layer.groups, act,
                     FUSED_ACTS.get(type(act)))


def deployed_forward(block, x):
    """``DeployedAtomicBlock.forward``: the oneDNN fusion of the cached
    inference form (conv + activation, projection + residual) on a CPU in
    float32 without autograd; anywhere else, or traced (ONNX), the modules
    as they are.

    Args:
        block (DeployedAtomicBlock): The deployed block.
        x (Tensor): Its input.
    """
    if block.project is None:
        return x + block.bias.view(1, -1, 1, 1)
    fuse = (fusable(x) and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not tracing()
            and not (_nn_module._global_forward_hooks
                     or _nn_module._global_forward_pre_hooks))
    steps = [None if block.expand is None else _deployed_step(block.expand),
             _deployed_step(block.dw, block.dw_act),
             _deployed_step(block.project)]
    if not fuse or steps[1] is None or steps[2] is None or (
            block.expand is not None and steps[0] is None):
        out = x if block.expand is None else block.expand(x)
        out = block.dw_act(block.dw(out))
        if block.se is not None:
            out = block.se(out)
        out = block.project(out)
        return x + out if block.use_res else out
    out = x if steps[0] is None else conv_forward(x, steps[0], True)
    out = conv_forward(out, steps[1], True)
    if block.se is not None:
        out = block.se(out)
    return conv_forward(out, steps[2], True,
                         residual=x if block.use_res else None)


def _conv_act(cm):
    """A BN-folded ConvModule as ``Sequential(conv, act)`` (or the conv)."""
    if tuple(cm.order) != ('conv', 'norm', 'act'):
        raise ValueError(f'deploy: ConvModule order {cm.order} is not '
                         "('conv', 'norm', 'act')")
    if cm.with_activation:
        return nn.Sequential(cm.conv, cm.activate)
    return cm.conv


def merge_depthwise(convs):
    """One depthwise conv equal to ``cat([conv(chunk) for ...])``.

    A ``k x k`` filter with padding ``k // 2`` equals the ``K x K`` filter
    holding it in its centre with padding ``K // 2``, for any stride.

    Args:
        convs (list[nn.Conv2d]): Depthwise convs (groups == channels), same
            stride, odd kernel sizes, padding ``k // 2``, in channel order.

    Returns:
        nn.Conv2d: Depthwise conv of the largest kernel size, with bias.
    """
    size = max(c.kernel_size[0] for c in convs)
    channels = sum(c.out_channels for c in convs)
    ref = convs[0]
    weights, biases = [], []
    for c in convs:
        k = c.kernel_size[0]
        if (c.groups != c.in_channels or c.groups != c.out_channels
                or c.kernel_size != (k, k) or c.padding != (k // 2, k // 2)
                or c.stride != ref.stride or c.dilation != (1, 1)):
            raise ValueError(f'deploy: cannot merge {c}')
        pad = (size - k) // 2
        weights.append(F.pad(c.weight.detach(), [pad] * 4))
        biases.append(c.bias.detach() if c.bias is not None else
                      c.weight.new_zeros(c.out_channels))
    merged = nn.Conv2d(channels, channels, size, ref.stride, size // 2,
                       groups=channels, bias=True).to(ref.weight)
    with torch.no_grad():
        merged.weight.copy_(torch.cat(weights))
        merged.bias.copy_(torch.cat(biases))
    return merged