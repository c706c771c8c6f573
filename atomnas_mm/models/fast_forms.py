"""The fast forward forms of :class:`~atomnas_mm.models.blocks.AtomicBlock`
and of the AtomNAS stem and head.

Same outputs, gradients and BN statistics as running the modules as they
are; speeds in docs/benchmarks.md:

* the *per-kernel training form* (:func:`per_kernel_forward`): each kernel
  group's 1x1 expand, depthwise conv and 1x1 projection on slices of the
  fused parameters (no wide tensor, no split/cat);
* the cached *inference form* (:func:`inference_forward`, eval mode without
  autograd): BN folded into the convs, the kernel groups in one zero-padded
  depthwise conv, and on a CPU in float32 each conv with its activation (the
  projection with the residual addition) in one oneDNN call. The stem and
  head ConvModules run the same folded step (:func:`conv_module_forward`).

This module owns the per-block caches (keyed weakly, not copied by deepcopy
or pickling) and the rules that make them fresh: a form is rebuilt whenever
a module or a folded tensor is replaced or written in place (version
counters), and dropped on ``train()`` / ``eval()`` / ``to()`` and before a
surgery (:func:`drop_inference_cache`, :func:`drop_block_caches`). Layers
are found by name (``expand``, ``dw.k3``..., ``project`` and their ``conv``,
norm and ``activate`` children); any layer, hook or tracing the forms do not
know makes the block run its modules as they are.
"""
import operator
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch.nn.modules import module as _nn_module

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
#: oneDNN post-ops for the activations mmcv builds, by module type
FUSED_ACTS = {nn.ReLU: ('relu', []), nn.ReLU6: ('hardtanh', [0.0, 6.0]),
              nn.SiLU: ('swish', []), nn.Hardswish: ('hardswish', []),
              type(None): ('none', [])}
try:
    from mmcv.cnn.bricks.hswish import HSwish
    from mmcv.cnn.bricks.swish import Swish
    FUSED_ACTS.update({Swish: ('swish', []), HSwish: ('hardswish', [])})
except ImportError:  # pragma: no cover
    pass


class Layer(NamedTuple):
    """A ConvModule and its children (None where absent)."""
    module: Optional[nn.Module]
    conv: Optional[nn.Module]
    norm: Optional[nn.Module]
    act: Optional[nn.Module]


class ConvStep(NamedTuple):
    """One folded conv: ``act(conv2d(x, weight, bias, ...))``."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: list
    padding: list
    groups: int
    act: Optional[nn.Module]
    post: Optional[tuple]  # oneDNN post-op of act, None when unfusable


class _ForwardState(NamedTuple):
    modules: list  # every module below, for the identity check
    expand: Optional[Layer]
    dw: list  # Layer per kernel group, in order
    project: Layer
    multi: bool  # the per-kernel form applies (expand + several groups)
    foldable: bool  # the inference form applies (one dw activation type)
    hooks: list  # the forward (pre-)hook dicts of the block and its layers


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


def _layer(cm):
    if cm is None:
        return None
    children = cm._modules
    return Layer(cm, children.get('conv'),
                 children.get(getattr(cm, 'norm_name', None)),
                 children.get('activate'))


def _block_layers(block):
    """``(expand, [dw...], project)`` Layers and the flat module list."""
    expand = _layer(_child(block, 'expand'))
    project = _layer(_child(block, 'project'))
    dws = [_layer(cm) for cm in block.dw._modules.values()]
    modules = [_child(block, 'se')]
    for layer in [expand, project, *dws]:
        modules.extend(layer if layer is not None else (None, ))
    return expand, dws, project, modules


def _plain(layer, pointwise=None):
    """ConvModule conv -> BatchNorm2d -> [act], zero padding, no conv bias;
    with ``pointwise`` True / False also a 1x1 / a same-padded depthwise
    conv."""
    cm, conv, norm, act = layer
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


def tracing():
    """Whether torch traces, scripts, compiles or exports: the modules must
    run as they are (ONNX export sees them)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() \
        or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def fusable(x):
    """Whether oneDNN conv + post-op fusion may run on ``x`` (a CPU tensor,
    oneDNN enabled, no CPU autocast); the weights must be float32 too."""
    return _FUSED_CONV is not None and x.device.type == 'cpu' \
        and torch.backends.mkldnn.enabled \
        and not torch.is_autocast_enabled('cpu')


def _unchanged(tensors, cached_tensors, cached_versions):
    """Whether ``tensors`` are the cached objects, not written since."""
    return all(map(operator.is_, tensors, cached_tensors)) and \
        [t._version for t in tensors] == cached_versions


def forward_state(block):
    """The block's cached layer structure, or None when only the module form
    may run: unusual layers, forward hooks (e.g. FLOPs counting) or tracing
    and compiling (ONNX export sees the modules)."""
    if tracing():
        return None
    expand, dws, project, modules = _block_layers(block)
    state = _FORWARD_STATE.get(block)
    if state is None or len(state.modules) != len(modules) or not all(
            map(operator.is_, modules, state.modules)):
        plain = _plain(project, pointwise=True) and all(
            _plain(layer, pointwise=False) for layer in dws) and (
                expand is None or _plain(expand, pointwise=True))
        acts = {type(layer.act) for layer in dws}
        state = _ForwardState(
            modules, expand, dws, project,
            plain and expand is not None and len(dws) > 1,
            plain and len(acts) == 1, _hook_dicts([block] + modules[1:]))
        _FORWARD_STATE[block] = state
    if not (state.multi or state.foldable) or any(state.hooks):
        return None
    return state


def drop_block_caches(block):
    """Forget a block's cached structure and inference form (before a
    surgery replaces its modules: the memory is free when it returns)."""
    _FORWARD_STATE.pop(block, None)
    _INFERENCE_CACHE.pop(block, None)


def drop_inference_cache(*modules):
    """Forget the cached inference forms of ``modules`` (None skipped)."""
    for module in modules:
        if module is not None:
            _INFERENCE_CACHE.pop(module, None)


# -- the per-kernel training form --------------------------------------------
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


def per_kernel_forward(block, x):
    """The block's residual branch per kernel group: expand on a row slice
    of the expand weight (its BN on slices of the fused BN), depthwise,
    projection on a column slice; the projections are summed before the
    projection BN. None when the form does not apply (see
    :func:`forward_state`)."""
    state = forward_state(block)
    if state is None or not state.multi:
        return None
    branches = list(block.dw.values())
    sizes = [m.conv.out_channels for m in branches]
    expand, norm = block.expand, block.expand.norm
    batch_stats, factor = _bn_step(norm)
    track = not norm.training or norm.track_running_stats
    means = _split(norm.running_mean if track else None, sizes)
    variances = _split(norm.running_var if track else None, sizes)
    gammas, betas = _split(norm.weight, sizes), _split(norm.bias, sizes)
    weights = expand.conv.weight.split(sizes, 0)
    outs = []
    for i, m in enumerate(branches):
        h = F.batch_norm(F.conv2d(x, weights[i]), means[i], variances[i],
                         gammas[i], betas[i], batch_stats, factor, norm.eps)
        if expand.with_activation:
            h = expand.activate(h)
        outs.append(m(h))
    if block.se is not None:
        se = block.se
        pooled = torch.cat([se.global_avgpool(h) for h in outs], dim=1)
        gates = se.conv2(se.conv1(pooled)).split(sizes, 1)
        outs = [h * g for h, g in zip(outs, gates)]
    weights = block.project.conv.weight.split(sizes, 1)
    out = F.conv2d(outs[0], weights[0])
    for h, w in zip(outs[1:], weights[1:]):
        out = out.add_(F.conv2d(h, w))
    return block.project.norm(out)


# -- the cached inference form ------------------------------------------------
def fold_bn(conv, norm):
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
    when the module form must run (see :func:`forward_state`; BN in
    training mode; inference tensors, which have no version counter)."""
    state = forward_state(block)
    if state is None or not state.foldable:
        return None
    layers = [state.project, *state.dw] + (
        [state.expand] if state.expand is not None else [])
    if any(layer.norm.training for layer in layers):
        return None
    cached = _INFERENCE_CACHE.get(block)
    if cached is not None and cached.state is state:
        if _unchanged([d[k] for d, k in cached.entries], cached.tensors,
                      cached.versions):
            return cached
    entries = [(getattr(layer.norm, d), k) for layer in layers
               for d, k in _NORM_TENSORS]
    entries += [(layer.conv._parameters, 'weight') for layer in layers]
    entries = [(d, k) for d, k in entries if d[k] is not None]
    tensors = [d[k] for d, k in entries]
    if any(t.is_inference() for t in tensors):
        return None
    with torch.no_grad():
        size = max(layer.conv.kernel_size[0] for layer in state.dw)
        weights, biases = [], []
        for layer in state.dw:
            weight, bias = fold_bn(layer.conv, layer.norm)
            pad = (size - layer.conv.kernel_size[0]) // 2
            weights.append(F.pad(weight, [pad] * 4) if pad else weight)
            biases.append(bias)
        dw_act = state.dw[0].act
        steps = [ConvStep(torch.cat(weights), torch.cat(biases),
                          list(state.dw[0].conv.stride), [size // 2] * 2,
                          sum(block.hidden), dw_act,
                          FUSED_ACTS.get(type(dw_act))),
                 ConvStep(*fold_bn(state.project.conv, state.project.norm),
                          [1, 1], [0, 0], 1, None, ('none', []))]
        if state.expand is not None:
            act = state.expand.act
            steps.insert(0, ConvStep(
                *fold_bn(state.expand.conv, state.expand.norm), [1, 1],
                [0, 0], 1, act, FUSED_ACTS.get(type(act))))
    form = _InferenceForm(state, entries, tensors,
                          [t._version for t in tensors], steps,
                          steps[0].weight.dtype == torch.float32)
    _INFERENCE_CACHE[block] = form
    return form


def inference_forward(block, x):
    """The whole block (residual included) through its cached inference
    form; None when the form does not apply."""
    form = _inference_form(block)
    if form is None:
        return None
    fuse = form.fusable and fusable(x)
    *expand, dw, project = form.steps
    out = conv_forward(x, expand[0], fuse) if expand else x
    out = conv_forward(out, dw, fuse)
    if block.se is not None:
        out = block.se(out)
    return conv_forward(out, project, fuse,
                        residual=x if block.use_res else None)


def conv_forward(x, step, fuse, residual=None):
    """``act(conv2d(x))`` (+ ``residual``) of a :class:`ConvStep`.

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


# -- the stem and head ---------------------------------------------------------
class _FoldedConvModule(NamedTuple):
    tensors: list  # the folded tensors and their versions
    versions: list
    step: ConvStep


def conv_module_forward(module, x):
    """An mmcv ``ConvModule`` (conv, BN, activation) with its BN folded, as
    a cached :class:`ConvStep` (oneDNN conv + activation on a CPU in
    float32), in eval mode without autograd; else the module as it is.

    The stem and head of :class:`AtomNAS` run through it; the cache follows
    the same rules as the blocks' inference form.
    """
    if module.training or torch.is_grad_enabled():
        return module(x)
    step = _folded_conv_module(module)
    if step is None:
        return module(x)
    return conv_forward(x, step, step.weight.dtype == torch.float32
                        and fusable(x))


def _folded_conv_module(module):
    """The cached folded step of a ConvModule, rebuilt when stale; None when
    the module form must run (hooks, another layer order or layer type, BN
    in training mode, a conv bias, inference tensors)."""
    layer = _layer(module)
    _, conv, norm, act = layer
    if tracing() or not _plain(layer) or norm.training \
            or norm.running_var is None or any(_hook_dicts(layer)) \
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
        weight, bias = fold_bn(conv, norm)
    step = ConvStep(weight, bias, list(conv.stride), list(conv.padding),
                    conv.groups, act, FUSED_ACTS.get(type(act)))
    _INFERENCE_CACHE[module] = _FoldedConvModule(
        tensors, [t._version for t in tensors], step)
    return step
