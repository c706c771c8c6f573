"""The atomic inverted-residual block and everything done to its atoms.

Fused layout (docs/method.md, "Block"): one 1x1 expand conv to
``sum(hidden)`` channels, a depthwise conv per kernel size over its slice of
those channels, optional squeeze-excite, one 1x1 projection + BN, and the
identity shortcut when shapes allow. One *atom* is one hidden channel of one
kernel size; atoms are numbered in concatenated hidden order (kernel groups
in ``kernel_sizes`` order).

The block owns its atom operations: their gammas (:meth:`gammas`), their
kernel groups (:meth:`atom_groups`), their removal with the parameter
remapping optimizer and EMA need (:meth:`remove_atoms`), its inference form
(:meth:`deploy_form`) and the mapping from fused tensors to its state dict
(:meth:`state_from_parts`). Adding a layer to the block means changing this
module only.
"""
import copy
import operator
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch.nn.modules import module as _nn_module

from .surgery import REMOVED, slice_conv_module


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
        atom_cost (Tensor, optional): Penalty weight of each atom, in atom
            order. Defaults to ones.
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
            return self.atom_cost.new_zeros(0)
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    def _atom_outputs(self):
        """Eval-mode output of each atom when its gamma is 0: ``act(beta)``."""
        outs = []
        for m in self.dw.values():
            # A copy: mmcv activations work in place.
            beta = m.norm.bias.detach().clone() if m.norm.bias is not None \
                else m.conv.weight.new_zeros(m.conv.out_channels)
            if m.with_activation:
                beta = m.activate(beta.view(1, -1, 1, 1)).flatten()
            outs.append(beta)
        return torch.cat(outs)

    def removal_error_bound(self, keep):
        """Bound on the eval-output change :meth:`remove_atoms` makes.

        Removed atoms output the constant ``a = act(beta)``. Without SE the
        constant is folded exactly (bound 0). With SE its squeeze part is
        folded too, but the gated part ``a * gate(x)`` depends on the input:
        the projection input may change by up to ``sum |W_proj[:, c] * a_c|``
        over the removed atoms (per output channel; the maximum is returned).

        Args:
            keep (Tensor): Indices of the surviving atoms.

        Returns:
            float: 0.0 when exact.
        """
        if self.se is None or self.project is None:
            return 0.0
        removed = self._removed_mask(keep)
        if not removed.any():
            return 0.0
        const = self._atom_outputs()[removed].abs()
        weight = self.project.conv.weight.detach().flatten(1)[:, removed].abs()
        return float((weight @ const).max())

    def _removed_mask(self, keep):
        mask = torch.ones(self.num_atoms, dtype=torch.bool)
        mask[torch.as_tensor(keep, dtype=torch.long).cpu()] = False
        return mask

    def check_keep(self, keep):
        """Validate surviving atom indices; return them as a sorted LongTensor.

        Raises:
            ValueError: Unsorted, repeated or out-of-range indices, or no atom
                left in a block without residual.
        """
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
        if len(keep) and (keep.min() < 0 or keep.max() >= self.num_atoms
                          or (keep[1:] <= keep[:-1]).any()):
            raise ValueError(f'keep: atom indices must be sorted, unique and '
                             f'in [0, {self.num_atoms}), got {keep.tolist()}')
        if not len(keep) and not self.use_res:
            raise ValueError('keep: a block without residual must keep an '
                             'atom')
        return keep

    def remove_atoms(self, keep, fold=True):
        """Remove the atoms not in ``keep``, in place.

        Args:
            keep (Tensor): Sorted indices of the surviving atoms.
            fold (bool): Fold the removed atoms' constant output (eval mode,
                gamma ~ 0) into the projection BN's running mean (or the
                identity bias of an emptied block), so eval outputs do not
                change. In SE blocks only the squeeze part is folded (into
                the squeeze conv's bias); see :meth:`removal_error_bound`.

        Returns:
            dict[Parameter, ParamChange]: The parameter remapping for the
            optimizer and the EMA copy.
        """
        keep = self.check_keep(keep)
        # The cached forward state and inference form hold the modules and
        # tensors about to be replaced: drop them now, so that the memory is
        # free when the shrink returns (not at the next forward).
        _FORWARD_STATE.pop(self, None)
        _INFERENCE_CACHE.pop(self, None)
        removed = self._removed_mask(keep)
        remap = {}
        if fold and removed.any():
            const = self._atom_outputs() * removed.to(self.atom_cost.dtype)
            if self.se is None:
                project_shift = \
                    self.project.conv.weight.detach().flatten(1) @ const
            else:  # the gated part depends on the input: not folded
                squeeze = self.se.conv1.conv
                squeeze.bias.data += squeeze.weight.detach().flatten(1) @ const
                project_shift = const.new_zeros(self.out_channels)
        if not len(keep):
            norm = self.project.norm
            bias = torch.zeros_like(norm.running_mean)
            if fold and removed.any():
                bias = (project_shift - norm.running_mean) / torch.sqrt(
                    norm.running_var + norm.eps) * norm.weight.detach() + \
                    norm.bias.detach()
            for p in self.parameters():
                remap[p] = REMOVED
            self.expand = self.se = self.project = None
            self.dw = nn.ModuleDict()
            self.atom_cost = self.atom_cost[:0]
            self.register_buffer('bias', bias.to(self.atom_cost))
            return remap

        keep = keep.to(self.atom_cost.device)
        if self.expand is not None:
            slice_conv_module(self.expand, keep, remap, dim=0)
        offset = 0
        for k, h in self.atom_groups():
            local = keep[(keep >= offset) & (keep < offset + h)] - offset
            if len(local):
                slice_conv_module(self.dw[dw_key(k)], local, remap, dim=0)
            else:
                for p in self.dw[dw_key(k)].parameters():
                    remap[p] = REMOVED
                del self.dw[dw_key(k)]
            offset += h
        if self.se is not None:
            slice_conv_module(self.se.conv1, keep, remap, dim=1)
            slice_conv_module(self.se.conv2, keep, remap, dim=0)
        slice_conv_module(self.project, keep, remap, dim=1)
        if fold and removed.any():
            self.project.norm.running_mean -= project_shift.to(
                self.project.norm.running_mean)
        self.atom_cost = self.atom_cost.index_select(0, keep)
        return remap

    # -- forward ----------------------------------------------------------------
    #: Training-mode form per device type (``x.device.type``): 'per_kernel'
    #: runs each kernel group's 1x1 expand, depthwise conv and 1x1
    #: projection on slices of the fused parameters (no wide tensor, no
    #: split/cat); 'modules' runs the fused modules as they are (wide expand,
    #: split, cat). Same outputs, gradients and BN statistics; the speed of
    #: each is measured in docs/benchmarks.md. Set on the class or on a block.
    train_forms = {'cpu': 'per_kernel', 'cuda': 'per_kernel'}
    #: In eval mode without autograd (``no_grad`` / ``inference_mode``, as in
    #: mmengine's val/test loops) run a cached inference form: BN folded into
    #: the convs, the kernel groups merged into one zero-padded depthwise conv
    #: (as ``deploy_form``). It is rebuilt whenever a module or one of the
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
            form = _inference_form(self)
            if form is not None:
                return self._inference_forward(x, form)
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._residual_branch, x, use_reentrant=False)
        else:
            out = self._residual_branch(x)
        return x + out if self.use_res else out

    def _residual_branch(self, x):
        if self.training and self.train_forms.get(x.device.type) == \
                'per_kernel':
            state = _forward_state(self)
            if state is not None and state.multi:
                return self._per_kernel_branch(x)
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

    def _per_kernel_branch(self, x):
        """Per kernel group: expand on a row slice of the expand weight (its
        BN on slices of the fused BN), depthwise, projection on a column
        slice; the projections are summed before the projection BN."""
        branches = list(self.dw.values())
        sizes = [m.conv.out_channels for m in branches]
        expand, norm = self.expand, self.expand.norm
        batch_stats, factor = _bn_step(norm)
        track = not norm.training or norm.track_running_stats
        means = _split(norm.running_mean if track else None, sizes)
        variances = _split(norm.running_var if track else None, sizes)
        gammas, betas = _split(norm.weight, sizes), _split(norm.bias, sizes)
        weights = expand.conv.weight.split(sizes, 0)
        outs = []
        for i, m in enumerate(branches):
            h = F.batch_norm(F.conv2d(x, weights[i]), means[i], variances[i],
                             gammas[i], betas[i], batch_stats, factor,
                             norm.eps)
            if expand.with_activation:
                h = expand.activate(h)
            outs.append(m(h))
        if self.se is not None:
            se = self.se
            pooled = torch.cat([se.global_avgpool(h) for h in outs], dim=1)
            gates = se.conv2(se.conv1(pooled)).split(sizes, 1)
            outs = [h * g for h, g in zip(outs, gates)]
        weights = self.project.conv.weight.split(sizes, 1)
        out = F.conv2d(outs[0], weights[0])
        for h, w in zip(outs[1:], weights[1:]):
            out = out.add_(F.conv2d(h, w))
        return self.project.norm(out)

    def _inference_forward(self, x, form):
        """The whole block through its cached inference form (eval, no
        autograd). On CPU in float32 each conv runs with its activation, the
        projection with the residual addition, fused in one oneDNN call."""
        fuse = form.fusable and _fusable(x)
        *expand, dw, project = form.steps
        out = _conv_forward(x, expand[0], fuse) if expand else x
        out = _conv_forward(out, dw, fuse)
        if self.se is not None:
            out = self.se(out)
        return _conv_forward(out, project, fuse,
                             residual=x if self.use_res else None)

    def train(self, mode=True):
        _INFERENCE_CACHE.pop(self, None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace tensor data without a version bump
        _INFERENCE_CACHE.pop(self, None)
        return super()._apply(fn, *args, **kwargs)

    # -- other forms --------------------------------------------------------------
    def deploy_form(self):
        """The inference form of this block, whose BNs must already be folded
        into the convs (``mmcv.cnn.fuse_conv_bn``): one merged depthwise conv.

        Returns:
            DeployedAtomicBlock: Shares the SE module with this block.
        """
        if self.project is None:
            return DeployedAtomicBlock(None, None, None, None, None, True,
                                       bias=self.bias)
        branches = list(self.dw.values())
        acts = {type(b.activate) if b.with_activation else None
                for b in branches}
        if len(acts) != 1:
            raise ValueError('deploy: kernel branches with different '
                             'activations')
        dw = merge_depthwise([b.conv for b in branches])
        act = copy.deepcopy(branches[0].activate) \
            if branches[0].with_activation else nn.Identity()
        expand = _conv_act(self.expand) if self.expand is not None else None
        return DeployedAtomicBlock(expand, dw, act, self.se,
                                   _conv_act(self.project), self.use_res)

    def state_from_parts(self, dw, project_bn, expand=None, project=None,
                         se=None):
        """This block's state dict (relative keys) from fused tensors.

        Args:
            dw (list[tuple[Tensor, dict]]): Per kernel group, in order, the
                depthwise weight ``(h, 1, k, k)`` and its BN tensors.
            project_bn (dict): Projection BN tensors (``weight``, ``bias``,
                ``running_mean``, ``running_var``).
            expand (tuple[Tensor, dict], optional): Expand weight and BN.
            project (Tensor, optional): Projection weight (None when the block
                has no atoms left: its BN's response to 0 becomes ``bias``).
            se (list[Tensor], optional): Squeeze weight, bias, excite weight,
                bias.

        Returns:
            dict[str, Tensor]
        """
        out = {}

        def put(prefix, cm, weight, bn):
            out[f'{prefix}.conv.weight'] = weight
            for key, value in bn.items():
                out[f'{prefix}.{cm.norm_name}.{key}'] = value

        if project is None:
            eps = 1e-3 if self.project is None else self.project.norm.eps
            scale = project_bn['weight'] / torch.sqrt(
                project_bn['running_var'] + eps)
            out['bias'] = project_bn['bias'] - project_bn['running_mean'] * scale
            return out
        if expand is not None:
            put('expand', self.expand, *expand)
        for weight, bn in dw:
            key = dw_key(weight.shape[-1])
            put(f'dw.{key}', self.dw[key], weight, bn)
        if se is not None:
            for key, value in zip(('conv1.conv.weight', 'conv1.conv.bias',
                                   'conv2.conv.weight', 'conv2.conv.bias'), se):
                out[f'se.{key}'] = value
        put('project', self.project, project, project_bn)
        return out


# -- forward helpers (AtomicBlock.forward) ------------------------------------
# Per block, keyed weakly (not copied by deepcopy / pickling):
# the structure check of the fast forms, and the cached inference form.
_FORWARD_STATE = weakref.WeakKeyDictionary()
_INFERENCE_CACHE = weakref.WeakKeyDictionary()
_NORM_TENSORS = (('_parameters', 'weight'), ('_parameters', 'bias'),
                 ('_buffers', 'running_mean'), ('_buffers', 'running_var'),
                 ('_buffers', 'num_batches_tracked'))


def _fused_conv_op():
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return None


_FUSED_CONV = _fused_conv_op()
# oneDNN post-ops for the activations mmcv builds, by module type
_FUSED_ACTS = {nn.ReLU: ('relu', []), nn.ReLU6: ('hardtanh', [0.0, 6.0]),
               nn.SiLU: ('swish', []), nn.Hardswish: ('hardswish', []),
               type(None): ('none', [])}
try:
    from mmcv.cnn.bricks.hswish import HSwish
    from mmcv.cnn.bricks.swish import Swish
    _FUSED_ACTS.update({Swish: ('swish', []), HSwish: ('hardswish', [])})
except ImportError:  # pragma: no cover
    pass


class _ForwardState(NamedTuple):
    # [expand, se] + (ConvModule, conv, norm, activation) per layer, layers
    # in the order project, depthwise..., [expand]
    mods: list
    multi: bool  # per_kernel form applies (expand + several kernel groups)
    foldable: bool  # inference form applies (one dw activation type)
    hooks: list  # the forward (pre-)hook dicts of the block and its layers


class _ConvStep(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor
    stride: list
    padding: list
    groups: int
    act: Optional[nn.Module]
    post: Optional[tuple]  # oneDNN post-op of act, None when unfusable


class _InferenceForm(NamedTuple):
    state: _ForwardState
    entries: list  # (dict, key) of every folded tensor
    tensors: list  # ... those tensors, and their versions
    versions: list
    steps: list  # [expand,] depthwise, projection
    fusable: bool  # float32 weights


def _child(module, name):
    """A child module or None, also when set to None before registration."""
    mods = module._modules
    return mods[name] if name in mods else module.__dict__.get(name)


def _block_modules(block):
    expand, project = _child(block, 'expand'), _child(block, 'project')
    mods = [expand, _child(block, 'se')]
    cms = [project, *block.dw._modules.values()]
    if expand is not None:
        cms.append(expand)
    for cm in cms:
        children = cm._modules
        mods += [cm, children.get('conv'),
                 children.get(getattr(cm, 'norm_name', None)),
                 children.get('activate')]
    return mods


def _plain(cm, conv, norm, act, pointwise=None):
    """ConvModule conv -> BatchNorm2d -> [act], zero padding, no conv bias;
    with ``pointwise`` True / False also a 1x1 / a same-padded depthwise
    conv."""
    if (not isinstance(cm, ConvModule) or tuple(cm.order) != ('conv', 'norm',
                                                               'act')
            or cm.with_explicit_padding or type(conv) is not nn.Conv2d
            or type(norm) is not nn.BatchNorm2d or conv.bias is not None
            or conv.padding_mode != 'zeros' or conv.dilation != (1, 1)
            or (act is None) == cm.with_activation):
        return False
    if pointwise is None:
        return True
    if pointwise:
        return conv.kernel_size == (1, 1) and conv.stride == (1, 1) \
            and conv.padding == (0, 0) and conv.groups == 1
    k = conv.kernel_size[0]
    return conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) \
        and conv.groups == conv.in_channels == conv.out_channels


def _hook_dicts(modules):
    """The dicts that registering a forward (pre-)hook on ``modules`` (None
    skipped) or globally fills, in place."""
    dicts = [_nn_module._global_forward_hooks,
             _nn_module._global_forward_pre_hooks]
    for m in modules:
        if m is not None:
            dicts += [m._forward_hooks, m._forward_pre_hooks]
    return dicts


def _tracing():
    """Whether torch traces, scripts, compiles or exports: the modules must
    run as they are (ONNX export sees them)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() \
        or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _fusable(x):
    """Whether oneDNN conv + post-op fusion may run on ``x`` (a CPU tensor,
    oneDNN enabled, no CPU autocast); the weights must be float32 too."""
    return _FUSED_CONV is not None and x.device.type == 'cpu' \
        and torch.backends.mkldnn.enabled \
        and not torch.is_autocast_enabled('cpu')


def _unchanged(tensors, cached_tensors, cached_versions):
    """Whether ``tensors`` are the cached objects, not written since."""
    return all(map(operator.is_, tensors, cached_tensors)) and \
        [t._version for t in tensors] == cached_versions


def _forward_state(block):
    """The block's :class:`_ForwardState`, or None when only the module form
    may run: unusual layers, forward hooks (e.g. FLOPs counting) or tracing
    and compiling (ONNX export sees the modules)."""
    if _tracing():
        return None
    mods = _block_modules(block)
    state = _FORWARD_STATE.get(block)
    if state is None or len(state.mods) != len(mods) or not all(
            map(operator.is_, mods, state.mods)):
        layers = [mods[i:i + 4] for i in range(2, len(mods), 4)]
        pointwise = [True] + [False] * len(block.dw) + [True]  # project, dw,
        plain = all(_plain(*layer, pointwise=p)  # [expand]
                    for layer, p in zip(layers, pointwise))
        acts = {type(layer[3]) for layer in layers[1:1 + len(block.dw)]}
        state = _ForwardState(
            mods, plain and mods[0] is not None and len(block.dw) > 1,
            plain and len(acts) == 1, _hook_dicts([block] + mods[2:]))
        _FORWARD_STATE[block] = state
    if not (state.multi or state.foldable) or any(state.hooks):
        return None
    return state


def _bn_step(norm):
    """``(use batch statistics, momentum factor)`` as
    ``_BatchNorm.forward`` computes them, counting the batch like it."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats \
            and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) \
            if norm.momentum is None else norm.momentum
    batch_stats = norm.training or (norm.running_mean is None
                                    and norm.running_var is None)
    return batch_stats, factor


def _split(tensor, sizes, dim=0):
    return [None] * len(sizes) if tensor is None else tensor.split(sizes, dim)


def _fold(conv, norm):
    """Weight and bias of ``norm(conv(x))`` (eval BN) as one conv."""
    dtype = conv.weight.dtype
    acc = torch.promote_types(dtype, torch.float32)  # fold fp16 in fp32
    scale = norm.running_var.to(acc).add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.to(acc)
    bias = -norm.running_mean.to(acc) * scale
    if norm.bias is not None:
        bias = bias + norm.bias.to(acc)
    weight = conv.weight.to(acc) * scale.view(-1, 1, 1, 1)
    return weight.to(dtype), bias.to(dtype)


def _inference_form(block):
    """The block's cached :class:`_InferenceForm`, rebuilt when stale; None
    when the module form must run (see :func:`_forward_state`; BN in
    training mode; inference tensors, which have no version counter)."""
    state = _forward_state(block)
    if state is None or not state.foldable:
        return None
    norms = state.mods[4::4]
    if any(norm.training for norm in norms):
        return None
    cached = _INFERENCE_CACHE.get(block)
    if cached is not None and cached.state is state:
        if _unchanged([d[k] for d, k in cached.entries], cached.tensors,
                      cached.versions):
            return cached
    entries = [(getattr(norm, d), k) for norm in norms
               for d, k in _NORM_TENSORS]
    entries += [(conv._parameters, 'weight') for conv in state.mods[3::4]]
    entries = [(d, k) for d, k in entries if d[k] is not None]
    tensors = [d[k] for d, k in entries]
    if any(t.is_inference() for t in tensors):
        return None
    with torch.no_grad():
        branches = list(block.dw.values())
        size = max(m.conv.kernel_size[0] for m in branches)
        weights, biases = [], []
        for m in branches:
            weight, bias = _fold(m.conv, m.norm)
            pad = (size - m.conv.kernel_size[0]) // 2
            weights.append(F.pad(weight, [pad] * 4) if pad else weight)
            biases.append(bias)
        dw_act = state.mods[9]  # activation of the first depthwise layer
        steps = [_ConvStep(torch.cat(weights), torch.cat(biases),
                           list(branches[0].conv.stride), [size // 2] * 2,
                           sum(block.hidden), dw_act,
                           _FUSED_ACTS.get(type(dw_act))),
                 _ConvStep(*_fold(block.project.conv, block.project.norm),
                           [1, 1], [0, 0], 1, None, ('none', []))]
        if block.expand is not None:
            act = state.mods[-1]
            steps.insert(0, _ConvStep(
                *_fold(block.expand.conv, block.expand.norm), [1, 1], [0, 0],
                1, act, _FUSED_ACTS.get(type(act))))
    form = _InferenceForm(state, entries, tensors,
                          [t._version for t in tensors], steps,
                          steps[0].weight.dtype == torch.float32)
    _INFERENCE_CACHE[block] = form
    return form


def _conv_forward(x, step, fuse, residual=None):
    """``act(conv2d(x))`` (+ ``residual``) of a :class:`_ConvStep`.

    With ``fuse`` (CPU, float32), where ``F.conv2d`` would run oneDNN
    anyway, one oneDNN convolution with the activation or the addition as
    post-op (``torch.ops.mkldnn._convolution_pointwise``, the kernel
    TorchInductor uses); else ``F.conv2d`` and the activation module.
    """
    if fuse and (residual is None) != (step.act is None) and \
            step.post is not None and _uses_onednn(x, step):
        if residual is None:
            return _FUSED_CONV(x, step.weight, step.bias, step.padding,
                               step.stride, [1, 1], step.groups, *step.post,
                               '')
        if step.act is None:
            return _FUSED_CONV.binary(
                x, residual, step.weight, step.bias, step.padding,
                step.stride, [1, 1], step.groups, 'add', None, None, [],
                None)
    out = F.conv2d(x, step.weight, step.bias, step.stride, step.padding, 1,
                   step.groups)
    if step.act is not None:
        out = step.act(out)
    return out if residual is None else residual + out


def _deployed_step(layer, act=None):
    """A :class:`_ConvStep` of a deployed conv (``Conv2d`` or
    ``Sequential(Conv2d, act)``), or None when it is not a plain conv."""
    if isinstance(layer, nn.Sequential) and len(layer) == 2:
        layer, act = layer
    if type(layer) is not nn.Conv2d or layer.padding_mode != 'zeros' \
            or layer.dilation != (1, 1) or isinstance(layer.padding, str) \
            or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if isinstance(act, nn.Identity):
        act = None
    return _ConvStep(layer.weight, layer.bias, list(layer.stride),
                     list(layer.padding), layer.groups, act,
                     _FUSED_ACTS.get(type(act)))


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
    fuse = (_fusable(x) and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not _tracing()
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
    out = x if steps[0] is None else _conv_forward(x, steps[0], True)
    out = _conv_forward(out, steps[1], True)
    if block.se is not None:
        out = block.se(out)
    return _conv_forward(out, steps[2], True,
                         residual=x if block.use_res else None)


class _FoldedConvModule(NamedTuple):
    tensors: list  # the folded tensors and their versions
    versions: list
    step: _ConvStep


def conv_module_forward(module, x):
    """An mmcv ``ConvModule`` (conv, BN, activation) with its BN folded, as
    a cached :class:`_ConvStep` (oneDNN conv + activation on a CPU in
    float32), in eval mode without autograd; else the module as it is.

    The stem and head of :class:`AtomNAS` run through it; the cache follows
    the same rules as the blocks' inference form.
    """
    if module.training or torch.is_grad_enabled():
        return module(x)
    step = _folded_conv_module(module)
    if step is None:
        return module(x)
    return _conv_forward(x, step, step.weight.dtype == torch.float32
                         and _fusable(x))


def drop_inference_cache(*modules):
    """Forget the cached inference forms of ``modules`` (None skipped)."""
    for module in modules:
        if module is not None:
            _INFERENCE_CACHE.pop(module, None)


def _folded_conv_module(module):
    """The cached folded step of a ConvModule, rebuilt when stale; None when
    the module form must run (hooks, another layer order or layer type, BN
    in training mode, a conv bias, inference tensors)."""
    children = module._modules
    conv, act = children.get('conv'), children.get('activate')
    norm = children.get(getattr(module, 'norm_name', None))
    if _tracing() or not _plain(module, conv, norm, act) or norm.training \
            or norm.running_var is None or any(_hook_dicts(
                [module, conv, norm, act])) \
            or isinstance(conv.padding, str):
        return None
    # num_batches_tracked: BN kernels update the statistics without a
    # version bump, its Python-side add_ bumps one
    tensors = [conv.weight] + [t for t in (
        norm.weight, norm.bias, norm.running_mean, norm.running_var,
        norm.num_batches_tracked) if t is not None]
    if any(t.is_inference() for t in tensors):
        return None
    cached = _INFERENCE_CACHE.get(module)
    if cached is not None and _unchanged(tensors, cached.tensors,
                                         cached.versions):
        return cached.step
    with torch.no_grad():
        weight, bias = _fold(conv, norm)
    step = _ConvStep(weight, bias, list(conv.stride), list(conv.padding),
                     conv.groups, act, _FUSED_ACTS.get(type(act)))
    _INFERENCE_CACHE[module] = _FoldedConvModule(
        tensors, [t._version for t in tensors], step)
    return step


def _uses_onednn(x, step):
    """Whether ``F.conv2d`` picks oneDNN for this float32 CPU conv (torch's
    rule: single-threaded 1x1 convs at small batch run its native GEMM,
    which is then faster; so do tiny inputs)."""
    kh, kw = step.weight.shape[-2:]
    batch = x.shape[0]
    if not (step.stride != [1, 1] or batch >= 16 or kh != 1 or kw != 1
            or torch.get_num_threads() > 1):
        return False
    return step.groups > 1 or (kh > 3 and kw > 3) or batch > 1 \
        or x.numel() > 20480


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
