"""Inference-only conversion of AtomNAS models (deploy mode).

``deploy_model`` is a pure function: it returns a converted copy of an
eval-mode model and leaves the input untouched. In the copy

* every BatchNorm that follows a conv is folded into the conv (weights
  scaled, bias added), everywhere in the model (stem, blocks, head);
* every :class:`AtomicBlock` becomes a :class:`DeployedAtomicBlock` whose
  kernel groups are padded (centred, with zeros) to the largest kernel size
  of the block and merged into ONE depthwise conv, so the block runs
  ``expand -> depthwise -> [SE] -> project`` without ``split`` / ``cat``.

A ``k x k`` depthwise filter with padding ``k // 2`` computes the same as the
``K x K`` filter with the ``k x k`` one in its centre and padding ``K // 2``,
for any stride, so eval outputs are unchanged up to float rounding. The
converted model cannot be trained, shrunk or loaded from AtomNAS
checkpoints (its state_dict differs); convert after loading.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn

from .blocks import AtomicBlock


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
        if self.project is None:
            return x + self.bias.view(1, -1, 1, 1)
        out = x if self.expand is None else self.expand(x)
        out = self.dw_act(self.dw(out))
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.use_res else out


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


def deploy_block(block):
    """A :class:`DeployedAtomicBlock` for a BN-folded :class:`AtomicBlock`."""
    if block.project is None:
        return DeployedAtomicBlock(None, None, None, None, None, True,
                                   bias=block.bias)
    branches = list(block.dw.values())
    acts = {type(b.activate) if b.with_activation else None
            for b in branches}
    if len(acts) != 1:
        raise ValueError('deploy: kernel branches with different activations')
    dw = merge_depthwise([b.conv for b in branches])
    act = copy.deepcopy(branches[0].activate) \
        if branches[0].with_activation else nn.Identity()
    expand = _conv_act(block.expand) if block.expand is not None else None
    return DeployedAtomicBlock(expand, dw, act, block.se,
                               _conv_act(block.project), block.use_res)


def deploy_model(model):
    """Convert an eval-mode AtomNAS model (backbone or whole classifier)
    for inference; the input model is left unchanged.

    Args:
        model (nn.Module): Model holding :class:`AtomicBlock` s.

    Returns:
        nn.Module: The converted copy, in eval mode, whose eval outputs
        equal the input's up to float rounding.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        fuse_conv_bn(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, AtomicBlock):
                parent_name, _, child = name.rpartition('.')
                parent = model.get_submodule(parent_name) if parent_name \
                    else model
                if not name:
                    return deploy_block(m)
                setattr(parent, child, deploy_block(m))
    return model
