"""AtomNAS backbone: the supernet and the searched nets, built from rows."""
import copy

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.model import Sequential
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import MODELS
from ..archs import get_arch, supernet_rows
from ..blocks import AtomicBlock
from ..cost import atom_weights

ARCH_KEYS = {'rows', 'stem_channels', 'last_channels', 'act_cfg', 'se_ratio'}


def check_rows(rows):
    """Validate architecture rows; raise ValueError naming the bad field."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f'arch: rows must be a non-empty list, got {rows!r}')
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 6:
            raise ValueError(
                f'arch: row {i} must be [out_channels, repeats, stride, '
                f'kernel_sizes, hidden_per_kernel, has_expand], got {row!r}')
        out, repeats, stride, kernels, hidden, _ = row
        if not (isinstance(out, int) and out > 0):
            raise ValueError(f'arch: row {i} out_channels must be a positive '
                             f'int, got {out!r}')
        if not (isinstance(repeats, int) and repeats > 0):
            raise ValueError(f'arch: row {i} repeats must be a positive int, '
                             f'got {repeats!r}')
        if stride not in (1, 2):
            raise ValueError(f'arch: row {i} stride must be 1 or 2, got '
                             f'{stride!r}')
        if len(kernels) != len(hidden):
            raise ValueError(
                f'arch: row {i} kernel_sizes {list(kernels)} and '
                f'hidden_per_kernel {list(hidden)} differ in length')
        for k in kernels:
            if not isinstance(k, int) or k <= 0 or k % 2 == 0:
                raise ValueError(f'arch: row {i} kernel size {k!r} must be a '
                                 'positive odd int')
        if len(set(kernels)) != len(kernels):
            raise ValueError(f'arch: row {i} kernel_sizes {list(kernels)} '
                             'repeat a kernel size')
        for h in hidden:
            if not isinstance(h, int) or h < 0:
                raise ValueError(f'arch: row {i} hidden width {h!r} must be '
                                 'a non-negative int')


@MODELS.register_module()
class AtomNAS(BaseBackbone):
    """AtomNAS backbone (supernet or searched net).

    Args:
        arch (str | dict): A zoo name (``'supernet'``, ``'atomnas_a'``, ...,
            ``'atomnas_c_plus'``) or a dict with ``rows`` in the published
            format and optional ``stem_channels``, ``last_channels``.
        stem_channels (int, optional): Stem width; defaults to the arch's.
        last_channels (int, optional): Head 1x1 conv width; defaults to the
            arch's or 1280.
        in_channels (int): Input image channels (1 for grey images).
        out_indices (Sequence[int], optional): Outputs: 0..6 (generally
            ``0..num_stages - 1``) are the stages, ``num_stages`` is the head
            conv. Defaults to the head conv, i.e. (7,) for the zoo archs.
        frozen_stages (int): Freeze the stem (0) and stages up to this one;
            -1 freezes nothing.
        conv_cfg (dict, optional): Conv config.
        norm_cfg (dict): Norm config.
        act_cfg (dict, optional): Activation; ReLU, or Swish for ``_plus``.
        se_ratio (float, optional): SE squeeze ratio of the block input
            channels; 0.5 for ``_plus``, else None.
        norm_eval (bool): Keep BN layers in eval mode during training.
        with_cp (bool): Gradient checkpointing in the blocks.
        init_cfg (dict | list[dict], optional): Initialization config.
    """

    def __init__(self, arch='supernet', stem_channels=None, last_channels=None,
                 in_channels=3, out_indices=None, frozen_stages=-1, conv_cfg=None,
                 norm_cfg=dict(type='BN', momentum=0.01, eps=1e-3),
                 act_cfg=None, se_ratio=None, norm_eval=False, with_cp=False,
                 init_cfg=[dict(type='Kaiming', layer=['Conv2d']),
                           dict(type='Constant', val=1,
                                layer=['_BatchNorm', 'GroupNorm'])]):
        super().__init__(init_cfg)
        if isinstance(arch, str):
            spec = get_arch(arch)
            if arch == 'supernet' and stem_channels is not None:
                spec['rows'] = supernet_rows(stem_channels)
        elif isinstance(arch, dict) and 'rows' in arch:
            unknown = set(arch) - ARCH_KEYS
            if unknown:
                raise ValueError(f'arch: unknown keys {sorted(unknown)}; '
                                 f'allowed {sorted(ARCH_KEYS)}')
            spec = copy.deepcopy(dict(arch))
        else:
            raise ValueError(f'arch: expected a zoo name or a dict with '
                             f'"rows", got {arch!r}')
        check_rows(spec['rows'])
        self.stem_channels = stem_channels or spec.get('stem_channels', 32)
        self.last_channels = last_channels or spec.get('last_channels', 1280)
        act_cfg = act_cfg or spec.get('act_cfg', dict(type='ReLU'))
        se_ratio = se_ratio if se_ratio is not None else spec.get('se_ratio')
        self.act_cfg, self.se_ratio = copy.deepcopy(act_cfg), se_ratio
        rows = self._expand_repeats(spec['rows'])
        first = rows[0]
        if not first[5] and sum(first[4]) != self.stem_channels:
            raise ValueError(
                f'stem_channels: {self.stem_channels} does not match the '
                f'first block, which has no expand conv and hidden {first[4]}')

        # Stages: consecutive blocks with the same output channels.
        stage_of = []
        for i, row in enumerate(rows):
            new = i == 0 or row[0] != rows[i - 1][0]
            stage_of.append((stage_of[-1] + 1 if stage_of else 0) if new
                            else stage_of[-1])
        self.num_stages = stage_of[-1] + 1
        if out_indices is None:
            out_indices = (self.num_stages, )
        for index in out_indices:
            if index not in range(0, self.num_stages + 1):
                raise ValueError(f'out_indices: {index} must be in range(0, '
                                 f'{self.num_stages + 1})')
        if frozen_stages not in range(-1, self.num_stages + 1):
            raise ValueError(f'frozen_stages: {frozen_stages} must be in '
                             f'range(-1, {self.num_stages + 1})')
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        cfg = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.in_channels = in_channels
        self.conv1 = ConvModule(in_channels, self.stem_channels, 3, 2, 1, **cfg)
        weights, _ = atom_weights(rows, self.stem_channels)
        stages = [[] for _ in range(self.num_stages)]
        in_ch = self.stem_channels
        for row, stage, weight in zip(rows, stage_of, weights):
            out, _, stride, kernels, hidden, has_expand = row
            se = round(se_ratio * in_ch) if se_ratio else None
            stages[stage].append(AtomicBlock(
                in_ch, out, stride, kernels, hidden, has_expand,
                atom_cost=weight, se_channels=se, with_cp=with_cp, **cfg))
            in_ch = out
        self.layers = []
        for i, blocks in enumerate(stages):
            name = f'layer{i + 1}'
            self.add_module(name, Sequential(*blocks))
            self.layers.append(name)
        self.conv2 = ConvModule(in_ch, self.last_channels, 1, **cfg)
        self._freeze_stages()

    @staticmethod
    def _expand_repeats(rows):
        blocks = []
        for out, repeats, stride, kernels, hidden, has_expand in rows:
            for i in range(repeats):
                blocks.append([out, 1, stride if i == 0 else 1, list(kernels),
                               list(hidden), bool(has_expand)])
        return blocks

    def blocks(self):
        """All AtomicBlocks in forward order."""
        return [b for name in self.layers for b in getattr(self, name)]

    def arch_rows(self):
        """The current architecture as rows in the published format."""
        return [[b.out_channels, 1, b.stride, b.kernel_sizes, b.hidden,
                 b.has_expand] for b in self.blocks()]

    def arch_dict(self):
        """The current architecture as an ``arch`` dict.

        Holds rows, stem and head widths, activation and SE ratio, so that
        ``AtomNAS(arch=m.arch_dict())`` rebuilds the same network.
        """
        return dict(rows=self.arch_rows(), stem_channels=self.stem_channels,
                    last_channels=self.last_channels,
                    act_cfg=copy.deepcopy(self.act_cfg),
                    se_ratio=self.se_ratio)

    def forward(self, x):
        x = self.conv1(x)
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        if self.num_stages in self.out_indices:
            outs.append(self.conv2(x))
        return tuple(outs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse weights of another architecture instead of skipping them."""
        ours = [k for k in state_dict if k.startswith(prefix)]
        if ours:
            own = {prefix + k: v.shape for k, v in self.state_dict().items()}
            problems = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, '
                        f'model {tuple(own[k])}' for k in ours
                        if k in own and state_dict[k].shape != own[k]]
            problems += [f'{k}: not in the model' for k in ours
                         if k not in own and k[len(prefix):].startswith('layer')]
            problems += [f'{k}: not in the checkpoint' for k in own
                         if k not in state_dict
                         and k[len(prefix):].startswith('layer')]
            if problems:
                raise ValueError(
                    'AtomNAS: the checkpoint holds another architecture than '
                    f'the model ({len(problems)} mismatches, e.g. '
                    f'{problems[:3]}). Build the backbone with the stored '
                    "rows (checkpoint meta['atomnas_arch'], arch.json) or "
                    'keep AtomShrinkHook in the config.')
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            modules = [self.conv1] + [getattr(self, self.layers[i])
                                      for i in range(self.frozen_stages)]
            for m in modules:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
