"""AtomNAS backbone: the supernet and the searched nets, built from rows."""
import copy

import torch
from mmcv.cnn import ConvModule
from mmengine.model import Sequential
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import MODELS
from ..archs import ARCH_KEYS, Row, get_arch, parse_arch, supernet_rows
from ..block_surgery import check_atom_keep, remove_atoms
from ..blocks import AtomicBlock, dw_key
from ..fast_forms import conv_module_forward, drop_inference_cache

__all__ = ['ARCH_KEYS', 'AtomNAS']


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@MODELS.register_module()
class AtomNAS(BaseBackbone):
    """AtomNAS backbone (supernet or searched net).

    Args:
        arch (str | dict): A zoo name (``'supernet'``, ``'atomnas_a'``, ...,
            ``'atomnas_c_plus'``) or an arch dict: ``rows`` in the published
            format plus any of ``stem_channels`` (default 32),
            ``last_channels`` (1280), ``in_channels`` (3), ``act_cfg``
            (ReLU), ``se_ratio`` (None), ``stage_depths`` (one stage per run
            of equal out_channels). :meth:`arch_dict` writes all of them.
        stem_channels, last_channels, in_channels (int, optional): Override
            the arch's values (``stem_channels`` with ``'supernet'``
            rebuilds the supernet rows for that stem).
        out_indices (Sequence[int], optional): Outputs: ``0..num_stages-1``
            are the stages, ``num_stages`` is the head conv (default).
        frozen_stages (int): Freeze the stem (0) and stages up to this one;
            -1 freezes nothing.
        conv_cfg (dict, optional): Conv config.
        norm_cfg (dict): Norm config.
        act_cfg (dict, optional): Activation; overrides the arch's.
        se_ratio (float, optional): SE squeeze ratio of the block input
            channels; overrides the arch's.
        norm_eval (bool): Keep BN layers in eval mode during training.
        with_cp (bool): Gradient checkpointing in the blocks.
        init_cfg (dict | list[dict], optional): Initialization config.

    Loading a state dict of a narrower net of the same search space (a
    checkpoint taken during or after a search) first removes the atoms the
    checkpoint does not have, keeping the first ``h`` of every kernel group,
    so ``load_checkpoint``, ``get_model(pretrained=...)`` and
    ``init_cfg=Pretrained`` work with the unedited search config. The
    parameter remapping is kept in ``load_remap``: in a Runner,
    AtomShrinkHook makes the optimizer, the EMA copy and DDP follow it at
    ``before_train`` (the Runner builds them before ``init_weights``).
    """

    def __init__(self, arch='supernet', stem_channels=None, last_channels=None,
                 in_channels=None, out_indices=None, frozen_stages=-1,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN', momentum=0.01, eps=1e-3),
                 act_cfg=None, se_ratio=None, norm_eval=False, with_cp=False,
                 init_cfg=[dict(type='Kaiming', layer=['Conv2d']),
                           dict(type='Constant', val=1,
                                layer=['_BatchNorm', 'GroupNorm'])]):
        super().__init__(init_cfg)
        if isinstance(arch, str):
            name, arch = arch, get_arch(arch)
            if name == 'supernet' and stem_channels:
                arch['rows'] = supernet_rows(stem_channels)
        if not isinstance(arch, dict):
            raise ValueError(f'arch: expected a zoo name or a dict with '
                             f'"rows", got {arch!r}')
        overrides = dict(stem_channels=stem_channels,
                         last_channels=last_channels, in_channels=in_channels,
                         act_cfg=act_cfg, se_ratio=se_ratio)
        spec = parse_arch(dict(arch, **{k: v for k, v in overrides.items()
                                        if v is not None}))
        self.stem_channels = spec['stem_channels']
        self.last_channels = spec['last_channels']
        self.in_channels = spec['in_channels']
        self.act_cfg = copy.deepcopy(spec['act_cfg'])
        self.se_ratio = spec['se_ratio']
        self.stage_depths = spec['stage_depths']
        self.num_stages = len(self.stage_depths)
        if out_indices is None:
            out_indices = (self.num_stages, )
        if not isinstance(out_indices, (list, tuple)):
            raise ValueError(f'out_indices: must be a sequence of ints, got '
                             f'{out_indices!r}')
        for index in out_indices:
            if not _is_int(index) or index not in range(self.num_stages + 1):
                raise ValueError(f'out_indices: {index!r} must be in '
                                 f'range(0, {self.num_stages + 1}) (an int)')
        if not _is_int(frozen_stages) or frozen_stages not in range(
                -1, self.num_stages + 1):
            raise ValueError(f'frozen_stages: {frozen_stages!r} must be in '
                             f'range(-1, {self.num_stages + 1}) (an int)')
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        cfg = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=self.act_cfg)
        self.conv1 = ConvModule(self.in_channels, self.stem_channels, 3, 2, 1,
                                **cfg)
        rows = iter(spec['rows'])
        in_ch = self.stem_channels
        self.layers = []
        for i, depth in enumerate(self.stage_depths):
            blocks = []
            for row in (next(rows) for _ in range(depth)):
                se = round(self.se_ratio * in_ch) if self.se_ratio else None
                blocks.append(AtomicBlock(
                    in_ch, row.out_channels, row.stride, row.kernel_sizes,
                    row.hidden, row.has_expand, se_channels=se,
                    with_cp=with_cp, **cfg))
                in_ch = row.out_channels
            self.add_module(f'layer{i + 1}', Sequential(*blocks))
            self.layers.append(f'layer{i + 1}')
        self.conv2 = ConvModule(in_ch, self.last_channels, 1, **cfg)
        self._set_penalty_weights()
        self._freeze_stages()

    def _set_penalty_weights(self):
        """``penalty_weight`` = per-atom FLOPs at 224 px over their mean."""
        from ...search.costs import FLOPsCost, set_penalty_weights
        set_penalty_weights(self, FLOPsCost(224))

    def blocks(self):
        """All AtomicBlocks in forward order."""
        return [b for name in self.layers for b in getattr(self, name)]

    def block_input_sizes(self, input_size):
        """Input side of every block for an ``input_size`` image."""
        from ...search.costs import out_size
        size, sizes = out_size(input_size, 2), []
        for block in self.blocks():
            sizes.append(size)
            size = out_size(size, block.stride)
        return sizes

    def arch_rows(self):
        """The current architecture as one-block rows (published format)."""
        return [Row(b.out_channels, 1, b.stride, tuple(b.kernel_sizes),
                    tuple(b.hidden), b.has_expand).to_list()
                for b in self.blocks()]

    def arch_dict(self):
        """The complete current architecture as an ``arch`` dict, so that
        ``AtomNAS(arch=m.arch_dict())`` rebuilds the same network."""
        return dict(rows=self.arch_rows(), stem_channels=self.stem_channels,
                    last_channels=self.last_channels,
                    in_channels=self.in_channels,
                    act_cfg=copy.deepcopy(self.act_cfg),
                    se_ratio=self.se_ratio,
                    stage_depths=list(self.stage_depths))

    def plan_to_arch(self, arch, where='backbone'):
        """Kept atoms per block (names relative to this backbone) that turn
        this net into ``arch``, keeping the first ``h`` atoms of every kernel.

        Raises:
            ValueError: When ``arch`` is not a narrower net of this one.
        """
        spec = parse_arch(arch)
        for key in ('stem_channels', 'last_channels', 'in_channels'):
            if key in arch and spec[key] != getattr(self, key):
                raise ValueError(f'atomnas_arch: {where}.{key} is '
                                 f'{spec[key]} in the checkpoint, '
                                 f'{getattr(self, key)} in the model')
        rows, blocks = spec['rows'], self.blocks()
        if len(rows) != len(blocks):
            raise ValueError(f'atomnas_arch: {where} has {len(blocks)} '
                             f'blocks, the checkpoint {len(rows)}')
        names = {id(m): n for n, m in self.named_modules()}
        plan = {}
        for i, (row, block) in enumerate(zip(rows, blocks)):
            if (row.out_channels, row.stride, row.has_expand) != (
                    block.out_channels, block.stride, block.has_expand):
                raise ValueError(
                    f'atomnas_arch: {where} block {i}: row {row.to_list()} '
                    f'does not match the model block (out '
                    f'{block.out_channels}, stride {block.stride}, expand '
                    f'{block.has_expand})')
            want = {k: h for k, h in zip(row.kernel_sizes, row.hidden) if h}
            keep = self._keep_first(block, want, f'{where} block {i}')
            if keep is not None:
                plan[names[id(block)]] = keep
        return plan

    @staticmethod
    def _keep_first(block, want, where):
        """Indices keeping the first ``want[k]`` atoms of each kernel group;
        None when the block already has exactly ``want``."""
        have = dict(block.atom_groups())
        for k, h in want.items():
            if have.get(k, 0) < h:
                raise ValueError(f'atomnas_arch: {where}: kernel {k} needs '
                                 f'{h} atoms, the model has {have.get(k, 0)}')
        if want == have:
            return None
        keep, offset = [], 0
        for k, h in have.items():
            keep.extend(range(offset, offset + want.get(k, 0)))
            offset += h
        return torch.tensor(keep, dtype=torch.long)

    #: In eval mode without autograd the stem and head convs run with their
    #: BN folded (cached, like the blocks' inference form:
    #: :attr:`AtomicBlock.cache_inference`). False disables it.
    cache_inference = True

    def forward(self, x):
        x = self._conv_module(self.conv1, x)
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        if self.num_stages in self.out_indices:
            outs.append(self._conv_module(self.conv2, x))
        return tuple(outs)

    def _conv_module(self, module, x):
        if self.cache_inference:
            return conv_module_forward(module, x)
        return module(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Narrow to the checkpoint's widths, then refuse any other
        architecture instead of skipping its weights."""
        for key in [k for k in state_dict if k.startswith(prefix)
                    and k.endswith('.atom_cost')]:  # older checkpoints' name
            state_dict[key[:-len('atom_cost')] + 'penalty_weight'] = \
                state_dict.pop(key)
        self._reshape_to_state_dict(state_dict, prefix)
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
                    "rows (checkpoint meta['atomnas_arch'], arch.json).")
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _reshape_to_state_dict(self, state_dict, prefix):
        """Remove the atoms a (narrower) state dict does not have."""
        names = {id(m): n for n, m in self.named_modules()}
        plan = {}
        for block in self.blocks():
            p = f'{prefix}{names[id(block)]}.'
            if not any(k.startswith(p) for k in state_dict):
                continue
            want = {}
            for k, _ in block.atom_groups():
                weight = state_dict.get(f'{p}dw.{dw_key(k)}.conv.weight')
                if weight is not None and weight.shape[0]:
                    want[k] = int(weight.shape[0])
            try:
                keep = self._keep_first(block, want, names[id(block)])
            except ValueError:
                return  # wider than the model: reported as a mismatch
            if keep is not None:
                plan[block] = keep
        try:
            for block, keep in plan.items():
                check_atom_keep(block, keep)
        except ValueError:
            return  # not a narrowing: reported as a mismatch
        remap = {}
        for block, keep in plan.items():
            remap.update(remove_atoms(block, keep, fold=False))
        # What holds the old parameters (an optimizer or EMA copy built
        # before init_weights) is made to follow by AtomShrinkHook.
        self.load_remap = {**getattr(self, 'load_remap', {}), **remap}
        info = getattr(self, '_params_init_info', None)
        if info is not None:  # inside mmengine's init_weights: register
            for change in remap.values():
                if change.new is not None:
                    info[change.new]['init_info'] = \
                        'narrowed to the checkpoint widths, then loaded'
                    info[change.new]['tmp_mean_value'] = \
                        change.new.data.mean().cpu()

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            modules = [self.conv1] + [getattr(self, self.layers[i])
                                      for i in range(self.frozen_stages)]
            for m in modules:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() replace tensor data without a version bump
        drop_inference_cache(self._modules.get('conv1'),
                             self._modules.get('conv2'))
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode=True):
        drop_inference_cache(self._modules.get('conv1'),
                             self._modules.get('conv2'))
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
