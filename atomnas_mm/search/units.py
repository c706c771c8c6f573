"""Channel units: the one vocabulary of the search.

A *unit* is a set of channels gated by one BN scale: the layers that produce
them (sliced on their output dim: convs, depthwise convs, BNs, an SE's
excite conv), the layers that consume them (sliced on their input dim) and
where a removed channel's constant output is folded (the consumer's BN
running mean or bias). Channels are numbered in the gate's order and may
fall in *groups* whose channels cost differently (an AtomNAS block's kernel
groups); ``min_width`` is how many must stay (0 where a residual path
bypasses the unit).

Penalty, criterion, budget, cost models, shrink plans, checkpoint meta and
narrowing on load see units only (``{unit name: unit}`` from
:func:`find_units`); which modules form a unit is the business of the
*finders* (``atomnas_mm.search.finders``). A plan is ``{unit name: kept
channel indices}``.
"""
import torch
import torch.nn as nn

from ..models.block_surgery import (atom_removal_error_bound,
                                    check_atom_keep, remove_atoms)
from ..models.surgery import compose, slice_conv, slice_norm, slice_param


class SearchRefused(ValueError):
    """The model (or a unit a config names) cannot be searched safely."""


def _check_keep(keep, num, min_width, name):
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if len(keep) and (keep.min() < 0 or keep.max() >= num
                      or (keep[1:] <= keep[:-1]).any()):
        raise ValueError(f'keep: {name}: channel indices must be sorted, '
                         f'unique and in [0, {num}), got {keep.tolist()}')
    if len(keep) < min_width:
        raise ValueError(f'keep: {name} must keep at least {min_width} '
                         f'channels, got {len(keep)}')
    return keep


class ChannelUnit:
    """Channels of plain layers gated by one BN (``gate``).

    Args:
        name (str): The gate's path in the model (the unit's name).
        gate (nn.BatchNorm2d): The BN whose ``|gamma|`` gates the channels.
        producers (list[nn.Module]): Convs and BNs sliced on their output
            channels (a depthwise conv on both sides), the gate included.
        consumers (list[tuple]): ``(layer, fold)`` sliced on their input
            channels; ``fold`` is where the removed channels' constant
            contribution goes: a BN after the layer (its running mean),
            ``'bias'`` (the layer's own bias) or None (not folded: counted
            in :meth:`error_bound`).
        act (callable, optional): What consumers see of the gate's output
            (the activation after it).
        gated (nn.Module, optional): A consumer whose input is the unit's
            output times an input-dependent gate (SE): its fold is not
            exact.
        pooled (nn.Module, optional): A producer whose output is globally
            average-pooled (an SE's input): the pooling costs its output
            positions per channel.
    """

    kind = 'channels'
    min_width = 1

    def __init__(self, name, gate, producers, consumers, act=None,
                 gated=None, pooled=None):
        self.name = name
        self.gate = gate
        self.producers = list(producers)
        self.consumers = list(consumers)
        self.act = act
        self.gated = gated
        self.pooled = pooled

    # -- what it is ---------------------------------------------------------
    @property
    def num_channels(self):
        return self.gate.num_features

    @property
    def groups(self):
        """``[(label, width)]``: one group (every channel costs the same)."""
        return [(None, self.num_channels)]

    def widths(self):
        """The unit's width per group (the searched architecture)."""
        return [self.num_channels]

    def modules(self):
        return [self.gate] + [m for m in self.producers if m is not self.gate
                              ] + [layer for layer, _ in self.consumers]

    @property
    def trainable(self):
        """Whether every parameter of the unit trains (frozen ones are not
        searched)."""
        return all(p.requires_grad for m in self.modules()
                   for p in m.parameters(recurse=False))

    def gammas(self):
        """The gate's scales (differentiable)."""
        return self.gate.weight

    def gamma_slices(self):
        """``[(gamma parameter, first channel)]`` in channel order."""
        return [(self.gate.weight, 0)]

    # -- surgery ------------------------------------------------------------
    def check_keep(self, keep):
        return _check_keep(keep, self.num_channels, self.min_width, self.name)

    def keep_first(self, widths):
        """Indices keeping the first channels to reach ``widths`` (None when
        the unit has them already)."""
        (width, ) = widths
        if width > self.num_channels:
            raise ValueError(f'channel_units: {self.name} needs {width} '
                             f'channels, the model has {self.num_channels}')
        if width == self.num_channels:
            return None
        return torch.arange(width)

    def constants(self):
        """Eval-mode output of each channel when its gamma is 0:
        ``act(beta)``."""
        gate = self.gate
        beta = gate.bias.detach().clone() if gate.bias is not None else \
            gate.weight.new_zeros(self.num_channels)
        if self.act is not None:
            beta = self.act(beta.view(1, -1, 1, 1)).flatten()
        return beta

    def _removed(self, keep):
        mask = torch.ones(self.num_channels, dtype=torch.bool)
        mask[torch.as_tensor(keep, dtype=torch.long).cpu()] = False
        return mask

    @staticmethod
    def _exact(layer):
        """Whether a constant input map gives a constant output (no zero
        padding reaches it)."""
        if isinstance(layer, nn.Linear):
            return True
        return all(k == 1 for k in layer.kernel_size) or all(
            p == 0 for p in layer.padding) if not isinstance(
                layer.padding, str) else layer.padding == 'valid'

    def consumer_constants(self):
        """Per consumer: the eval-mode value it reads in a channel whose
        gamma is 0 (here the same for every consumer)."""
        return [self.constants()] * len(self.consumers)

    def _shifts(self, keep):
        """Per consumer: the constant its output loses with the removed
        channels (summed over the kernel: the interior value)."""
        removed = self._removed(keep).to(self.gate.weight.dtype)
        out = []
        for (layer, _), const in zip(self.consumers,
                                     self.consumer_constants()):
            weight = layer.weight.detach().cpu()
            per_channel = weight.flatten(2).sum(-1) if weight.dim() > 2 \
                else weight
            out.append(per_channel @ (const.cpu() * removed))
        return out

    def error_bound(self, keep):
        """Bound on the eval-output change of :meth:`remove` (0 when exact).

        A removed channel outputs the constant ``a = act(beta)``. Folding is
        exact into a 1x1 (or unpadded) consumer; a padded ``k x k`` consumer
        sees the constant cut at the borders, a gated consumer (SE) sees it
        times an input-dependent gate: there the consumer's output may move
        by up to ``sum |W[o, c]| * |a_c|`` over the removed channels (times
        the following BN's scale).
        """
        removed = self._removed(keep)
        if not removed.any():
            return 0.0
        bound = 0.0
        for (layer, fold), const in zip(self.consumers,
                                        self.consumer_constants()):
            if self._exact(layer) and layer is not self.gated:
                continue
            const = const.cpu().abs()[removed]
            weight = layer.weight.detach().cpu().abs()
            per = (weight.flatten(2).sum(-1) if weight.dim() > 2
                   else weight)[:, removed] @ const
            if isinstance(fold, nn.modules.batchnorm._BatchNorm):
                per = per * (fold.weight.detach().cpu().abs() / torch.sqrt(
                    fold.running_var.cpu() + fold.eps))
            bound = max(bound, float(per.max()))
        return bound

    def remove(self, keep, fold=True):
        """Remove the channels not in ``keep``, in place.

        Args:
            keep (Tensor): Sorted indices of the surviving channels.
            fold (bool): Fold the removed channels' constant output into the
                consumers' BN running mean (or bias).

        Returns:
            dict[Parameter, ParamChange]: The parameter remapping.
        """
        keep = self.check_keep(keep)
        if len(keep) == self.num_channels:
            return {}
        shifts = self._shifts(keep) if fold else None
        remap = {}
        device_keep = keep.to(self.gate.weight.device)
        for module in self.producers:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                slice_norm(module, device_keep, remap)
            else:
                slice_conv(module, device_keep, remap, dim=0)
        for i, (layer, target) in enumerate(self.consumers):
            if isinstance(layer, nn.Linear):
                _slice_linear_in(layer, device_keep, remap)
            else:
                slice_conv(layer, device_keep, remap, dim=1)
            if not fold or target is None or layer is self.gated:
                continue
            shift = shifts[i]
            if isinstance(target, nn.modules.batchnorm._BatchNorm):
                target.running_mean -= shift.to(target.running_mean)
            elif target == 'bias' and layer.bias is not None:
                layer.bias.data += shift.to(layer.bias)
        return compose(remap)


def _slice_linear_in(layer, index, remap):
    slice_param(layer, 'weight', 1, index, remap)
    layer.in_features = len(index)


class ResidualUnit(ChannelUnit):
    """The channels of one residual stream: several layers write (add) into
    them, and layers read the running sum at different points.

    A stream ``x_k = post_k(x_{k-1} + w_k)`` (``x_1 = post_1(w_1)``: a
    stage's first block writes it, every residual block of the stage adds
    its projection; ``post_k`` is the identity in MobileNetV2, the ReLU
    after the addition in ResNet) has one channel set across all its
    writers and readers. A channel whose gamma is 0 in every writer's BN is
    a constant at every point of the stream: ``w_k = act_k(beta_k)`` carried
    through the additions and ``post_k``. It is removed from every writer
    (output dim) and reader (input dim), each reader's constant folded into
    its BN running mean or bias (exact for 1x1 readers and global pooling
    into a linear layer, bounded for padded ``k x k`` readers).

    Args:
        name (str): The unit's name: the path of one of its writers' BNs.
        gates (list[nn.BatchNorm2d]): The writers' BNs, in stream order.
        producers (list[nn.Module]): The writers' convs and BNs.
        consumers (list[tuple]): ``(layer, fold)`` as in
            :class:`ChannelUnit`.
        reads (list[int]): Per consumer, how many writers (the first ones)
            its input sums.
        acts (list[callable | None], optional): Per writer, the activation
            after its BN (None: linear, a projection).
        post_acts (list[callable | None], optional): Per writer, the
            activation applied to the stream after its addition (ResNet's
            ReLU; None: none).
        combine (str): A channel's strength from its writers' ``|gamma|``:
            ``'max'`` (it dies only when dead in every writer), ``'sum'``
            (the L1 norm of its scales) or ``'l2'``.
    """

    kind = 'residual'
    COMBINE = ('max', 'sum', 'l2')

    def __init__(self, name, gates, producers, consumers, reads, acts=None,
                 post_acts=None, combine='max'):
        super().__init__(name, gates[0], producers, consumers)
        if len(reads) != len(self.consumers) or not all(
                1 <= r <= len(gates) for r in reads):
            raise ValueError(f'{name}: reads must give each consumer a '
                             f'number of writers in [1, {len(gates)}]')
        if combine not in self.COMBINE:
            raise ValueError(f'combine: one of {self.COMBINE}, got '
                             f'{combine!r}')
        self.gates = list(gates)
        self.reads = list(reads)
        self.acts = list(acts) if acts is not None else [None] * len(gates)
        self.post_acts = list(post_acts) if post_acts is not None else \
            [None] * len(gates)
        self.combine = combine

    def modules(self):
        return self.gates + [m for m in self.producers
                             if all(m is not g for g in self.gates)] + [
            layer for layer, _ in self.consumers]

    def gammas(self):
        """Per channel, its writers' ``|gamma|`` combined (differentiable;
        ``'max'``: the largest)."""
        scales = torch.stack([g.weight.abs() for g in self.gates])
        if self.combine == 'max':
            return scales.amax(0)
        if self.combine == 'sum':
            return scales.sum(0)
        return scales.pow(2).sum(0).sqrt()

    def gamma_slices(self):
        """Every writer's scales, each over all the unit's channels (the
        proximal step shrinks them all)."""
        return [(g.weight, 0) for g in self.gates]

    def constants(self):
        """Per writer (rows): ``act(beta)``, a dead channel's output."""
        rows = []
        for gate, act in zip(self.gates, self.acts):
            beta = gate.bias.detach().clone() if gate.bias is not None \
                else gate.weight.new_zeros(self.num_channels)
            if act is not None:
                beta = act(beta.view(1, -1, 1, 1)).flatten()
            rows.append(beta)
        return torch.stack(rows)

    def stream_constants(self):
        """Per writer (rows): a dead channel's value in the stream after
        that writer's addition (and its ``post_acts``)."""
        rows, running = [], None
        for const, post in zip(self.constants(), self.post_acts):
            running = const if running is None else running + const
            if post is not None:
                running = post(running.clone().view(1, -1, 1, 1)).flatten()
            rows.append(running)
        return torch.stack(rows)

    def consumer_constants(self):
        """Per consumer: the stream's constant after the writers it
        reads."""
        running = self.stream_constants()
        return [running[r - 1] for r in self.reads]


class AtomUnit:
    """The atoms of one searchable :class:`AtomicBlock` (its hidden
    channels, grouped by kernel size; gate: the depthwise BNs)."""

    kind = 'atoms'

    def __init__(self, name, block):
        self.name = name
        self.block = block

    @property
    def num_channels(self):
        return self.block.num_atoms

    @property
    def groups(self):
        return self.block.atom_groups()

    @property
    def min_width(self):
        return 0 if self.block.use_res else 1

    @property
    def trainable(self):
        return all(p.requires_grad for p in self.block.parameters())

    def widths(self):
        return list(self.block.hidden)

    def gammas(self):
        return self.block.gammas()

    def gamma_slices(self):
        out, start = [], 0
        for module in self.block.dw.values():
            out.append((module.norm.weight, start))
            start += module.norm.weight.numel()
        return out

    def check_keep(self, keep):
        return check_atom_keep(self.block, keep)

    def error_bound(self, keep):
        return atom_removal_error_bound(self.block, keep)

    def remove(self, keep, fold=True):
        return remove_atoms(self.block, keep, fold=fold)


# -- finding ------------------------------------------------------------------
def _unwrap(model):
    from mmengine.model import is_model_wrapper
    return model.module if is_model_wrapper(model) else model


def finder_parts(finders):
    """Finder parts from ``finders`` (parts or config dicts; None: the
    default finders)."""
    if finders is None:
        from .finders import DEFAULT_FINDERS
        return DEFAULT_FINDERS
    from .policy import build_part
    return [build_part(f, None, 'finder') for f in finders]


def find_units(model, finders=None, skipped=None, frozen=False):
    """``{name: unit}`` of every searchable unit of ``model``.

    Args:
        model (nn.Module): The model (a wrapper is unwrapped).
        finders (list, optional): Finder parts or config dicts (default:
            :data:`~atomnas_mm.search.finders.DEFAULT_FINDERS`).
        skipped (list, optional): Filled with ``(module name, reason)`` of
            what the finders saw and did not take (frozen, unsafe, ...).
        frozen (bool): Also the units whose parameters do not train (an
            EMA copy's, to follow a surgery decided on the live model).

    Returns:
        dict[str, ChannelUnit | AtomUnit]: In module order.
    """
    model = _unwrap(model)
    skipped = [] if skipped is None else skipped
    units = {}
    claimed = set()
    for finder in finder_parts(finders):
        for unit in finder(model, skipped, claimed):
            if unit.name in units:
                raise SearchRefused(f'{unit.name}: claimed by two finders')
            if not (frozen or unit.trainable):
                skipped.append((unit.name, 'frozen (requires_grad=False): '
                                'not searched'))
                continue
            units[unit.name] = unit
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(units.items(),
                       key=lambda kv: order.get(kv[0], len(order))))


def describe_skipped(skipped, limit=8):
    """One line per skipped module (at most ``limit``)."""
    lines = [f'  {name}: {why}' for name, why in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f'  ... and {len(skipped) - limit} more')
    return '\n'.join(lines)


def require_units(model, finders=None, where='search'):
    """:func:`find_units`, raising :class:`SearchRefused` (naming what was
    seen and why it was not taken) when nothing can be searched."""
    skipped = []
    units = find_units(model, finders, skipped)
    if not units:
        detail = describe_skipped(skipped) if skipped else \
            '  no BN-gated channels that a finder knows (AtomNAS blocks, ' \
            'mmpretrain MobileNetV2/V3 and EfficientNet inverted residuals, ' \
            'mmpretrain/mmdet ResNet blocks)'
        raise SearchRefused(f'{where}: the model has no searchable channel '
                            f'unit:\n{detail}')
    return units, skipped


def unit_widths(units):
    """``{name: [width per group]}``: the searched architecture."""
    return {name: unit.widths() for name, unit in units.items()}
