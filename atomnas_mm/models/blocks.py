"""The atomic inverted-residual block (docs/method.md, "Block").

Fused layout: one 1x1 expand conv to ``sum(hidden)`` channels, a depthwise
conv per kernel size over its slice of those channels, optional
squeeze-excite, one 1x1 projection + BN, and the identity shortcut when
shapes allow. One *atom* is one hidden channel of one kernel size; atoms are
numbered in concatenated hidden order (kernel groups in ``kernel_sizes``
order). This module holds the module and what it is (atoms, kernel groups,
gammas); its faster forward forms are in ``fast_forms``, the removal of
atoms in ``block_surgery``, its deploy form in ``deploy`` and the reference
checkpoint layout in ``tools/model_converters/atomnas_to_mm.py``.
"""
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule

from .fast_forms import (drop_inference_cache, inference_forward,
                         per_kernel_forward)


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
            it, ``sum(hidden)`` must equal ``in_channels`` and the block has
            no searchable atoms.
        penalty_weight (Tensor, optional): Weight of each atom in the L1
            penalty (its cost over the mean atom cost), in atom order.
            Defaults to ones.
        se_channels (int, optional): Squeeze channels of the SE module;
            None means no SE.
        conv_cfg, norm_cfg, act_cfg (dict): mmcv layer configs.
        with_cp (bool): Use gradient checkpointing in training.
    """

    def __init__(self, in_channels, out_channels, stride, kernel_sizes, hidden,
                 has_expand=True, penalty_weight=None, se_channels=None,
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
        if penalty_weight is None:
            penalty_weight = torch.ones(total)
        self.register_buffer('penalty_weight', torch.as_tensor(
            penalty_weight, dtype=torch.float32).reshape(total))
        if not total:
            # An emptied residual block: identity plus the folded constant.
            self.register_buffer('bias', torch.zeros(out_channels))

    # -- atoms ------------------------------------------------------------------
    @property
    def kernel_sizes(self):
        """Kernel sizes of the live branches, in order."""
        return [int(name[1:]) for name in self.dw]

    @property
    def hidden(self):
        """Hidden channels per live branch, in order."""
        return [m.conv.out_channels for m in self.dw.values()]

    @property
    def num_atoms(self):
        """Number of atoms (hidden channels of all kernel sizes)."""
        return sum(self.hidden)

    @property
    def searchable(self):
        """Whether the block has atoms the search may remove.

        The one definition used by the penalty, the costs and the surgery:
        a block with an expand conv and at least one atom left.
        """
        return self.has_expand and self.num_atoms > 0

    @property
    def se_channels(self):
        """Squeeze channels of the SE module, or None."""
        return self.se.conv1.conv.out_channels if self.se is not None else None

    def atom_groups(self):
        """``[(kernel_size, width), ...]`` of the live kernel groups."""
        return list(zip(self.kernel_sizes, self.hidden))

    def gammas(self):
        """Depthwise-BN scales of the atoms, in atom order (differentiable)."""
        weights = [m.norm.weight for m in self.dw.values()]
        if not weights:
            return self.penalty_weight.new_zeros(0)
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    # -- forward ----------------------------------------------------------------
    #: Training-mode form per device type (``x.device.type``): 'per_kernel'
    #: (:func:`~atomnas_mm.models.fast_forms.per_kernel_forward`: no wide
    #: tensor, no split/cat) or 'modules' (the fused modules as they are:
    #: wide expand, split, cat). Same outputs, gradients and BN statistics;
    #: the speed of each is measured in docs/benchmarks.md. Set on the class
    #: or on a block.
    train_forms = {'cpu': 'per_kernel', 'cuda': 'per_kernel'}
    #: In eval mode without autograd (``no_grad`` / ``inference_mode``, as in
    #: mmengine's val/test loops) run a cached inference form
    #: (:func:`~atomnas_mm.models.fast_forms.inference_forward`: BN folded,
    #: the kernel groups in one zero-padded depthwise conv). It is rebuilt whenever a module or one of the
    #: folded tensors is replaced or written in place (version counters: the
    #: optimizer, ``load_state_dict``, BN statistics updates, the surgery) and
    #: on ``train()`` / ``eval()`` / ``to()``. Writes through ``.data`` do not
    #: count as in-place writes: call ``eval()`` again after them (mmengine's
    #: EMA swap is followed by ``eval()`` in its loops). False disables it.
    cache_inference = True

    def forward(self, x):
        if self.project is None:
            return x + self.bias.view(1, -1, 1, 1)
        if not self.training and self.cache_inference \
                and not torch.is_grad_enabled():
            out = inference_forward(self, x)
            if out is not None:
                return out
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._residual_branch, x, use_reentrant=False)
        else:
            out = self._residual_branch(x)
        return x + out if self.use_res else out

    def _residual_branch(self, x):
        if self.training and self.train_forms.get(x.device.type) == \
                'per_kernel':
            out = per_kernel_forward(self, x)
            if out is not None:
                return out
        return self._module_branch(x)

    def _module_branch(self, x):
        """The fused modules as they are: wide expand, split, cat."""
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

    def train(self, mode=True):
        drop_inference_cache(self)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace tensor data without a version bump
        drop_inference_cache(self)
        return super()._apply(fn, *args, **kwargs)
