"""The atomic inverted-residual block in the fused layout (DESIGN.md).

One 1x1 expand conv to ``sum(hidden)`` channels, a depthwise conv per kernel
size over its slice of those channels, optional squeeze-excite, one 1x1
projection + BN, and the identity shortcut when shapes allow. One atom is one
hidden channel of one kernel size.
"""
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule


def dw_key(kernel_size):
    """Name of the depthwise branch of a kernel size (stable across shrinks)."""
    return f'k{kernel_size}'


class AtomicBlock(BaseModule):
    """Mixed-kernel inverted-residual block.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the depthwise convs.
        kernel_sizes (list[int]): Odd kernel sizes of the branches.
        hidden (list[int]): Hidden channels per kernel size; 0 drops it.
        has_expand (bool): Whether the block has a 1x1 expand conv; without
            it, ``sum(hidden)`` must equal ``in_channels``.
        atom_cost (Tensor, optional): Penalty weight of each atom, in
            concatenated hidden order. Defaults to ones.
        se_channels (int, optional): Squeeze channels of the SE module;
            None means no SE.
        conv_cfg, norm_cfg, act_cfg (dict): mmcv layer configs.
        with_cp (bool): Use gradient checkpointing in training.
    """

    def __init__(self, in_channels, out_channels, stride, kernel_sizes, hidden,
                 has_expand=True, atom_cost=None, se_channels=None,
                 conv_cfg=None, norm_cfg=dict(type='BN'),
                 act_cfg=dict(type='ReLU'), with_cp=False, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        live = [(k, h) for k, h in zip(kernel_sizes, hidden) if h > 0]
        total = sum(h for _, h in live)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.has_expand, self.with_cp = stride, has_expand, with_cp
        self.use_res = stride == 1 and in_channels == out_channels
        if total == 0 and not self.use_res:
            raise ValueError('hidden: a block without residual needs at least '
                             f'one atom, got {list(hidden)}')
        if not has_expand and total != in_channels:
            raise ValueError(f'hidden: a block without expand conv needs '
                             f'sum(hidden) == in_channels ({in_channels}), '
                             f'got {list(hidden)}')
        cfg = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        self.expand = ConvModule(in_channels, total, 1, act_cfg=act_cfg, **cfg) \
            if has_expand and total else None
        self.dw = nn.ModuleDict({
            dw_key(k): ConvModule(h, h, k, stride, k // 2, groups=h,
                                  act_cfg=act_cfg, **cfg)
            for k, h in live})
        self.se = None
        if se_channels and total:
            from mmpretrain.models.utils import SELayer
            self.se = SELayer(total, squeeze_channels=se_channels,
                              conv_cfg=conv_cfg,
                              act_cfg=(act_cfg, dict(type='Sigmoid')))
        self.project = ConvModule(total, out_channels, 1, act_cfg=None, **cfg) \
            if total else None
        if atom_cost is None:
            atom_cost = torch.ones(total)
        self.register_buffer('atom_cost', torch.as_tensor(
            atom_cost, dtype=torch.float32).reshape(total))
        if not total:
            # An emptied residual block: identity plus the folded constant.
            self.register_buffer('bias', torch.zeros(out_channels))

    @property
    def kernel_sizes(self):
        """Kernel sizes of the live branches, in order."""
        return [int(name[1:]) for name in self.dw]

    @property
    def hidden(self):
        """Hidden channels per live branch, in order."""
        return [m.conv.out_channels for m in self.dw.values()]

    def _residual_branch(self, x):
        if self.expand is not None:
            x = self.expand(x)
        branches = list(self.dw.values())
        if len(branches) == 1:
            x = branches[0](x)
        else:
            chunks = torch.split(x, self.hidden, dim=1)
            x = torch.cat([m(c) for m, c in zip(branches, chunks)], dim=1)
        if self.se is not None:
            x = self.se(x)
        return self.project(x)

    def forward(self, x):
        if self.project is None:
            return x + self.bias.view(1, -1, 1, 1)
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._residual_branch, x, use_reentrant=False)
        else:
            out = self._residual_branch(x)
        return x + out if self.use_res else out
