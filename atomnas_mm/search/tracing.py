"""The tracing finder: channel units of models no hand-written finder knows.

:class:`TracingFinder` traces the searched module (``model.backbone`` when
there is one, else the model) with ``torch.fx`` and takes a BN as a unit's
gate only when the graph proves the removal safe:

* upward, the BN reads exactly one conv's output, read by nothing else; a
  depthwise conv (one channel per group) passes the channels through to the
  conv (and BN) before it, over a chain read by nothing else;
* downward, its output reaches readers only through per-element maps (the
  activations: the unit's ``act``), dropout, identity, pooling that keeps a
  constant map constant, and a flatten after a global pool; the readers are
  plain convs (``groups=1``) followed by a BN only or with a bias, and linear
  layers with a bias after such a flatten (a removed channel's constant goes
  into that BN's running mean or the bias).

Anything else refuses the BN, naming it and what its channels reach: an
addition (a residual), a multiplication by another tensor (an SE gate or
attention), a concatenation, a reshape, a grouped conv, a non-BN norm, the
traced module's output, an op the finder does not know. A module that
cannot be traced is refused as a whole.
"""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..registry import SEARCH
from .units import ChannelUnit

# Per-element maps of a tensor (a removed channel's constant goes through
# them: they form the unit's ``act``).
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU,
                nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish,
                nn.Hardtanh, nn.Softplus, nn.SELU, nn.CELU)
#: mmcv's activations (traced as leaves, by class name).
_ACT_NAMES = {'HSigmoid', 'HSwish', 'Swish', 'Clamp'}
_ACT_FUNCS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6,
              F.hardswish, F.hardsigmoid, F.silu, torch.sigmoid, F.sigmoid,
              torch.tanh, F.gelu, F.leaky_relu, F.elu, F.mish, F.hardtanh,
              torch.clamp, F.softplus}
_ACT_METHODS = {'relu', 'relu_', 'sigmoid', 'sigmoid_', 'tanh', 'tanh_',
                'clamp', 'clamp_', 'clamp_min', 'clamp_max'}
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv,
               operator.iadd, operator.imul, torch.add, torch.mul, torch.sub,
               torch.div}
# Channel-wise ops that keep a constant map constant and change no value.
_KEEP_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
                 nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
                 nn.AvgPool2d, nn.Upsample)
_KEEP_FUNCS = {F.dropout, F.dropout2d, F.max_pool2d, F.adaptive_max_pool2d,
               F.adaptive_avg_pool2d, F.avg_pool2d, F.interpolate}
_KEEP_METHODS = {'contiguous'}
# Reads of a tensor's metadata (not of its values).
_META_METHODS = {'size', 'dim', 'numel'}
_META_ATTRS = {'shape', 'dtype', 'device', 'ndim'}


class _Refused(Exception):
    """Why a BN is not a unit's gate."""


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer keeping mmcv's activations as leaves."""

    def is_leaf_module(self, m, qualname):
        return type(m).__name__ in _ACT_NAMES or super().is_leaf_module(
            m, qualname)


def _bn2d(module):
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


def _depthwise(conv):
    return conv.groups > 1 and conv.groups == conv.in_channels == \
        conv.out_channels


def _tensor_args(node):
    return [a for a in list(node.args) + list(node.kwargs.values())
            if isinstance(a, fx.Node)]


def _metadata(node):
    return (node.op == 'call_method' and node.target in _META_METHODS) or (
        node.op == 'call_function' and node.target is getattr
        and node.args[1] in _META_ATTRS)


def _readers(node):
    return [u for u in node.users if not _metadata(u)]


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_one(size):
    return size == 1 or (isinstance(size, (tuple, list))
                         and all(s == 1 for s in size))


class _Graph:
    """One traced module: its nodes and how each reads a tensor."""

    def __init__(self, root, prefix):
        self.root = root
        self.prefix = prefix
        self.graph = _Tracer().trace(root)
        self.modules = dict(root.named_modules())
        self.calls = {}
        for node in self.graph.nodes:
            if node.op == 'call_module':
                key = id(self.modules[node.target])
                self.calls[key] = self.calls.get(key, 0) + 1

    def module(self, node):
        return self.modules[node.target] if node.op == 'call_module' \
            else None

    def name(self, node):
        if node.op == 'call_module':
            return self.prefix + node.target
        if node.op == 'output':
            return f'the output of {self.prefix.rstrip(".") or "the model"}'
        fn = getattr(node.target, '__name__', node.target)
        return f'{fn} ({node.name} in the traced graph)'

    def what(self, node):
        """``'{act, keep, global, flatten, conv, depthwise, linear, bn}'`` of
        a node reading one tensor, or raise :class:`_Refused`."""
        where = self.name(node)
        if node.op == 'output':
            raise _Refused(f'its channels reach {where}')
        if node.op == 'call_module':
            m = self.module(node)
            kind = type(m).__name__
            if isinstance(m, nn.Conv2d):
                if m.groups == 1:
                    return 'conv'
                if _depthwise(m):
                    return 'depthwise'
                raise _Refused(f'its channels reach the grouped conv {where} '
                               f'(groups={m.groups}), which couples them')
            if isinstance(m, nn.Linear):
                return 'linear'
            if isinstance(m, _ACT_MODULES) or kind in _ACT_NAMES:
                return 'act'
            if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                return 'global' if _is_one(m.output_size) else 'keep'
            if isinstance(m, nn.AvgPool2d) and m.padding and \
                    m.count_include_pad:
                raise _Refused(f'its channels reach {where}, whose zero '
                               'padding changes a constant map')
            if isinstance(m, _KEEP_MODULES):
                return 'keep'
            if isinstance(m, nn.Flatten):
                if m.start_dim == 1 and m.end_dim == -1:
                    return 'flatten'
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise _Refused(f'its channels reach the second norm {where} '
                               'without a conv between')
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm,
                                nn.modules.instancenorm._InstanceNorm,
                                nn.LocalResponseNorm)):
                raise _Refused(f'its channels reach {where}, a {kind}, not '
                               'a BatchNorm')
            raise _Refused(f'its channels reach {where} ({kind}), which the '
                           'tracing finder does not know')
        if len(_tensor_args(node)) != 1:
            op = getattr(node.target, '__name__', node.target)
            kinds = {'add': 'an addition (a residual?)',
                     'iadd': 'an addition (a residual?)',
                     'mul': 'a product with another tensor (an SE gate or '
                     'attention)', 'cat': 'a concatenation'}
            raise _Refused(f'its channels reach {where}: '
                           f'{kinds.get(op, "an op of several tensors")}')
        target = node.target
        if node.op == 'call_function':
            if target in _ACT_FUNCS or target in _SCALAR_OPS:
                return 'act'
            if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                return 'global' if _is_one(_arg(node, 1, 'output_size')) \
                    else 'keep'
            if target is F.avg_pool2d and _arg(node, 3, 'padding', 0) and \
                    _arg(node, 5, 'count_include_pad', True):
                raise _Refused(f'its channels reach {where}, whose zero '
                               'padding changes a constant map')
            if target in _KEEP_FUNCS:
                return 'keep'
            if target is torch.flatten:
                if _arg(node, 1, 'start_dim', 0) == 1 and _arg(
                        node, 2, 'end_dim', -1) == -1:
                    return 'flatten'
        elif node.op == 'call_method':
            if target in _ACT_METHODS:
                return 'act'
            if target in _KEEP_METHODS:
                return 'keep'
            if target == 'flatten' and _arg(node, 1, 'start_dim', 0) == 1 \
                    and _arg(node, 2, 'end_dim', -1) == -1:
                return 'flatten'
            if target in ('view', 'reshape') and len(node.args) == 3 and \
                    node.args[2] == -1:
                return 'flatten'
            if target == 'mean':
                dims = _arg(node, 1, 'dim')
                dims = dims if isinstance(dims, (tuple, list)) else (dims, )
                if sorted(d % 4 for d in dims if isinstance(d, int)) == [
                        2, 3] and len(dims) == 2:
                    return 'global' if _arg(node, 2, 'keepdim', False) \
                        else 'pooled-flat'
        raise _Refused(f'its channels reach {where}, which the tracing '
                       'finder does not know (or not with these arguments)')

    # -- one unit -----------------------------------------------------------
    def producers(self, gate):
        """The convs and BNs producing ``gate``'s channels, first to last."""
        out = [gate]
        node, first = gate.args[0], True
        while True:
            if not isinstance(node, fx.Node) or len(_readers(node)) != 1:
                raise _Refused('its channels are also read before it (a '
                               'layer it gates has several readers)')
            m = self.module(node)
            if isinstance(m, nn.Conv2d):
                if m.groups == 1:
                    return [node] + out
                if not _depthwise(m):
                    raise _Refused(f'its channels come from the grouped conv '
                                   f'{self.name(node)} (groups={m.groups})')
                out.insert(0, node)
            elif _bn2d(m) and not first:
                out.insert(0, node)
            elif first:
                raise _Refused(f'its input is {self.name(node)}, not a '
                               'conv\'s output')
            elif node.op in ('placeholder', 'get_attr') or \
                    self.what(node) not in ('act', 'keep'):
                raise _Refused(f'its channels pass a depthwise conv from '
                               f'{self.name(node)}, not from a conv')
            first = False
            node = node.args[0]

    def _fold(self, node, layer):
        readers = _readers(node)
        if len(readers) == 1 and _bn2d(self.module(readers[0])) and \
                self.module(readers[0]).track_running_stats:
            return self.module(readers[0])
        if layer.bias is not None:
            return 'bias'
        raise _Refused(f'{self.name(node)} reads its channels but has no BN '
                       'after it nor a bias to take a removed channel\'s '
                       'constant')

    def consumers(self, gate):
        """``([(layer, fold)], act nodes)`` of the readers of ``gate``'s
        output, or None when a depthwise conv passes them on (the gate is
        then a producer of a later BN's unit)."""
        found, chains, depthwise = [], set(), []
        stack = [(gate, (), False, False)]  # node, acts, pooled, flat
        while stack:
            node, acts, pooled, flat = stack.pop()
            readers = _readers(node)
            if not readers:
                raise _Refused(f'{self.name(node)} is read by nothing')
            for user in readers:
                kind = self.what(user)
                if kind == 'act':
                    stack.append((user, acts + (user, ), pooled, flat))
                elif kind in ('keep', 'global'):
                    stack.append((user, acts, pooled or kind == 'global',
                                  flat))
                elif kind in ('flatten', 'pooled-flat'):
                    if not (pooled or kind == 'pooled-flat'):
                        raise _Refused(f'its channels are flattened by '
                                       f'{self.name(user)} with more than '
                                       'one position (or an unknown size)')
                    stack.append((user, acts, True, True))
                elif kind == 'depthwise':
                    depthwise.append(user)
                    chains.add(acts)
                else:
                    layer = self.module(user)
                    if (kind == 'linear') != flat:
                        raise _Refused(f'{self.name(user)} reads them '
                                       f'{"flattened" if flat else "as a map"}'
                                       f', not as its input channels')
                    if kind == 'linear' and layer.bias is None:
                        raise _Refused(f'{self.name(user)} reads its channels '
                                       'but has no bias to take a removed '
                                       'channel\'s constant')
                    fold = 'bias' if kind == 'linear' else self._fold(
                        user, layer)
                    found.append((user, layer, fold))
                    chains.add(acts)
        if depthwise:
            if found or len(depthwise) > 1:
                raise _Refused(f'its channels reach the depthwise conv '
                               f'{self.name(depthwise[0])} and other readers')
            return None
        if len(chains) > 1:
            raise _Refused('its readers see it through different activations')
        return [(layer, fold) for _, layer, fold in found], next(iter(chains))

    def act(self, acts):
        """The composed per-element maps ``acts`` (None when empty)."""
        if not acts:
            return None
        steps = []
        for node in acts:
            if node.op == 'call_module':
                steps.append(self.module(node))
                continue
            tensor = _tensor_args(node)[0]
            args = tuple(node.args)
            kwargs = dict(node.kwargs)

            def step(t, node=node, tensor=tensor, args=args, kwargs=kwargs):
                sub = [t if a is tensor else a for a in args]
                kw = {k: (t if v is tensor else v) for k, v in kwargs.items()}
                if node.op == 'call_method':
                    return getattr(sub[0], node.target)(*sub[1:], **kw)
                return node.target(*sub, **kw)
            steps.append(step)

        def act(t):
            for step in steps:
                t = step(t.clone() if isinstance(step, nn.Module) else t)
            return t
        return act


@SEARCH.register_module()
class TracingFinder:
    """BN-gated channel units of any module ``torch.fx`` traces, taking only
    what the graph proves safe (see the module's docstring) and listing
    every other BN with the reason.

    Args:
        fallback (bool): Search only models in which the earlier finders
            claimed nothing (the default, as the last of
            :data:`~atomnas_mm.search.finders.DEFAULT_FINDERS`: a model a
            hand-written finder knows searches exactly as without tracing).
            False: also take the units the earlier finders left, outside
            the modules they claimed.
    """

    def __init__(self, fallback=True):
        self.fallback = fallback

    def __call__(self, model, skipped, claimed):
        if self.fallback and claimed:
            return
        backbone = getattr(model, 'backbone', None)
        root, prefix = (backbone, 'backbone.') if isinstance(
            backbone, nn.Module) else (model, '')
        taken = {id(m) for c in root.modules() if id(c) in claimed
                 for m in c.modules()}
        try:
            graph = _Graph(root, prefix)
        except Exception as exc:  # any tracing failure refuses the module
            reason = str(exc).strip().splitlines()
            skipped.append((prefix.rstrip('.') or type(root).__name__,
                            f'torch.fx cannot trace it ({type(exc).__name__}'
                            f': {reason[0] if reason else ""}): not searched'))
            return
        for node in graph.graph.nodes:
            gate = graph.module(node)
            if not _bn2d(gate) or id(gate) in taken:
                continue
            name = graph.name(node)
            try:
                if gate.weight is None or not gate.track_running_stats:
                    raise _Refused('no affine scale or running statistics')
                found = graph.consumers(node)
                if found is None:
                    continue  # a producer of the unit after the depthwise
                consumers, acts = found
                producers = [graph.module(n) for n in graph.producers(node)]
                layers = producers + [layer for layer, _ in consumers]
                if any(id(m) in taken for m in layers):
                    continue  # an earlier finder's
                twice = [graph.prefix + t for t, m in graph.modules.items()
                         if m in layers and graph.calls.get(id(m), 0) > 1]
                if twice:
                    raise _Refused(f'{twice[0]} is called more than once')
            except _Refused as why:
                skipped.append((name, f'{why}: not searched'))
                continue
            claimed.update(id(m) for m in layers)
            yield ChannelUnit(name, gate, producers=producers,
                              consumers=consumers, act=graph.act(acts))
