"""Dynamic network shrinkage as pure functions (docs/method.md, "Shrinking").

Atoms are addressed by block name (its path in the model, stable across
shrinks) and position in the block's atom order. A *plan*
``{block_name: LongTensor of kept atoms}`` is decided once and applied to the
live model, the EMA copy and the optimizer state alike. The per-block work is
:func:`~atomnas_mm.models.block_surgery.remove_atoms`; this module
orchestrates.
"""
import math
import warnings

import torch

from ..models.backbones.atomnas import AtomNAS
from ..models.blocks import AtomicBlock
from ..models.surgery import compose
from .costs import search_root, width_cost
from .policy import ThresholdCriterion, check_number
from .units import AtomUnit, find_units, unit_widths


def find_backbones(model):
    """``{path: AtomNAS}`` for every AtomNAS backbone in ``model``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AtomNAS)}


def searchable_blocks(model):
    """``{path: AtomicBlock}`` of every block that has atoms to search."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AtomicBlock) and m.searchable}


def _criterion(criterion):
    if isinstance(criterion, (int, float)):
        return ThresholdCriterion(criterion)
    return criterion


def _units(model, units):
    return find_units(model) if units is None else units


def atom_strengths(model, criterion=1e-3, ema_model=None, final=False,
                   units=None):
    """``{unit name: per-channel strength}`` of every unit (an AtomNAS
    block's channels are its atoms)."""
    criterion = _criterion(criterion)
    if final and ema_model is None:
        raise ValueError('final=True (EMA alone decides) needs ema_model')
    ema_units = find_units(ema_model, frozen=True) \
        if ema_model is not None else {}
    out = {}
    for name, unit in _units(model, units).items():
        if not unit.num_channels:
            continue
        live = unit.gammas().detach().abs()
        ema = ema_units[name].gammas().detach().abs().to(live.device) \
            if name in ema_units else None
        out[name] = criterion.live_and_ema(live, ema, final and ema is not None)
    return out


def plan_from_strengths(model, strengths, criterion=1e-3, units=None,
                        round_to=1):
    """Kept channels of every unit losing some; a unit keeps at least its
    ``min_width`` strongest channels (an AtomNAS block without residual:
    one atom), and with ``round_to`` > 1 every group it shrinks keeps a
    multiple of ``round_to`` (its strongest dead channels stay to make it
    up)."""
    criterion = _criterion(criterion)
    units = _units(model, units)
    plan = {}
    for name, strength in strengths.items():
        unit = units[name]
        dead = criterion.dead(strength)
        # the dead channels, strongest first
        order = [i for i in torch.argsort(strength, descending=True).tolist()
                 if dead[i]]
        start = 0
        for _, width in unit.groups:
            group = dead[start:start + width]
            keep = width - int(group.sum())
            if keep < width:
                aligned = min(width, -(-keep // round_to) * round_to)
                restore = [i for i in order
                           if start <= i < start + width][:aligned - keep]
                dead[restore] = False
            start += width
        need = unit.min_width - int((~dead).sum())
        if need > 0:
            # the strongest dead channels' group keeps what the unit needs
            first = order[0]
            start = 0
            for _, width in unit.groups:
                if start <= first < start + width:
                    break
                start += width
            group = [i for i in order if start <= i < start + width]
            dead[group[:min(width, -(-need // round_to) * round_to)]] = False
        if dead.any():
            plan[name] = torch.nonzero(~dead).flatten().cpu()
    return plan


def plan_shrink(model, criterion=1e-3, ema_model=None, ema_only=False,
                round_to=1):
    """Decide which channels survive.

    Args:
        model (nn.Module): Live model (unwrapped).
        criterion (float | ThresholdCriterion): A criterion part, or the
            threshold of :class:`ThresholdCriterion`.
        ema_model (nn.Module, optional): Averaged copy with the same names.
        ema_only (bool): Decide on the EMA weights alone (final shrink).
        round_to (int): See :func:`plan_from_strengths`.

    Returns:
        dict[str, Tensor]: Kept channel indices, only for units that lose
        some.
    """
    units = find_units(model)
    strengths = atom_strengths(model, criterion, ema_model, ema_only, units)
    return plan_from_strengths(model, strengths, criterion, units, round_to)


def backbone_cost(model, cost):
    """The ``cost`` of what a budget counts in ``model``: its AtomNAS
    backbones, else its ``backbone`` (else the model itself)."""
    backbones = find_backbones(model)
    if backbones:
        return sum(cost.total(m) for m in backbones.values())
    return cost.total(search_root(model))


def width_cost_of(model, cost, units=None):
    """:class:`~atomnas_mm.search.costs.WidthCost` of ``model``'s units."""
    return width_cost(model, cost, _units(model, units),
                      backbone_cost(model, cost))


def atom_costs(model, cost, units=None, widths=None):
    """``{unit name: per-channel cost}`` of every unit: an AtomNAS atom's
    cost by the cost model, another unit's marginal cost of one channel
    at the current widths (from ``widths``, the model's
    :func:`width_cost_of` by ``cost``, when given: no costing again)."""
    units = _units(model, units)
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for backbone in find_backbones(model).values():
        for block, c in zip(backbone.blocks(), cost.atom_costs(backbone)):
            if c is not None and names[id(block)] in units:
                out[names[id(block)]] = c
    others = {n: u for n, u in units.items() if n not in out}
    if others:
        evaluator = widths if widths is not None else width_cost_of(
            model, cost, others)
        for name, unit in others.items():
            out[name] = torch.full((unit.num_channels, ),
                                   -float(evaluator.removal(name, 0)))
    return out


def removed_cost(model, plan, cost, costs=None):
    """What the channels that ``plan`` removes cost, by the ``cost`` model
    (the sum of :func:`atom_costs`; ``costs``, when given, are those)."""
    if costs is None:
        costs = atom_costs(model, cost)
    total = 0.0
    for name, keep in plan.items():
        dead = torch.ones(len(costs[name]), dtype=torch.bool)
        dead[keep] = False
        total += costs[name][dead].sum().item()
    return total


def check_plan(model, plan, units=None):
    """Raise unless every entry of ``plan`` is valid for ``model``; returns
    the units (frozen ones included: an EMA copy follows the live model)."""
    units = find_units(model, frozen=True) if units is None else units
    for name, keep in plan.items():
        if name not in units:
            raise KeyError(f'plan: {name!r} is not a channel unit of the '
                           'model')
        units[name].check_keep(keep)
    return units


def apply_plan(model, plan, fold=True):
    """Shrink every unit of ``model`` named in ``plan``, in place.

    The whole plan is validated first: on error nothing has changed.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping.
    """
    units = check_plan(model, plan)
    remap = {}
    for name, keep in plan.items():
        remap.update(units[name].remove(keep, fold=fold))
    return compose(remap)


def check_optimizer(optimizer, model):
    """Raise ValueError unless every optimized param is one of ``model``'s."""
    own = {id(p) for p in model.parameters()}
    for i, group in enumerate(optimizer.param_groups):
        foreign = [p for p in group['params'] if id(p) not in own]
        if foreign:
            raise ValueError(
                f'optimizer: param group {i} holds {len(foreign)} tensors '
                'that are not parameters of the model; the shrink cannot '
                'follow them')


def shrink_optimizer(optimizer, model, remap):
    """Carry optimizer state over a surgery; keep the optimizer object.

    Every param group keeps its place and hyper-parameters (so per-group
    schedulers stay aligned, also with ``paramwise_cfg``); its surviving
    params are replaced in order by their new tensors, removed ones dropped
    (a group may become empty). State tensors of a param's shape are sliced
    like the param.
    """
    for group in optimizer.param_groups:
        params = []
        for old in group['params']:
            change = remap.get(old)
            if change is None:
                params.append(old)
                continue
            state = optimizer.state.pop(old, None)
            if change.new is None:
                continue
            params.append(change.new)
            if state is not None:
                optimizer.state[change.new] = {
                    key: _slice_like(value, old, change)
                    for key, value in state.items()}
        group['params'] = params
    check_optimizer(optimizer, model)


def _slice_like(value, old, change):
    if torch.is_tensor(value) and value.shape == old.shape:
        return change.apply(value)
    return value


def reshape_to_arch(model, archs):
    """Shrink supernet-shaped backbones to stored architectures (for loading).

    Keeps the first ``h`` atoms of every kernel; weights are loaded afterwards.

    Args:
        model (nn.Module): Model whose backbones are at least as wide.
        archs (dict): ``{backbone_path: arch dict}`` as in checkpoint meta.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping.
    """
    backbones = find_backbones(model)
    for path in archs:
        if path not in backbones:
            raise ValueError(f'atomnas_arch: the model has no AtomNAS at '
                             f'{path!r} (has {sorted(backbones)})')
    plans = {path: backbones[path].plan_to_arch(arch, where=path)
             for path, arch in archs.items()}  # all checked before any change
    remap = {}
    for path, plan in plans.items():
        remap.update(apply_plan(backbones[path], plan, fold=False))
    return remap


def channel_widths(model):
    """``{unit name: [width]}`` of the units that are not AtomNAS atoms
    (those are in :func:`current_archs`)."""
    return unit_widths({name: unit for name, unit in find_units(model).items()
                        if not isinstance(unit, AtomUnit)})


def narrow_to_widths(model, widths):
    """Narrow the channel units of ``model`` to ``widths`` (``{unit name:
    [width]}``) keeping their first channels (weights are loaded
    afterwards); all checked before any change.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping.
    """
    units = find_units(model, frozen=True)
    missing = sorted(set(widths) - set(units))
    if missing:
        raise ValueError(f'channel_units: the model has no channel unit '
                         f'{missing[0]!r} (it has {len(units)} units)')
    plan = {}
    for name, width in widths.items():
        keep = units[name].keep_first(width)
        if keep is not None:
            plan[name] = keep
    return apply_plan(model, plan, fold=False)


def narrow_to_state_dict(model, state_dict):
    """Narrow the channel units of ``model`` whose gate is narrower in
    ``state_dict`` (a searched checkpoint loaded into a stock model), before
    the weights are loaded.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping (empty when
        nothing changed).
    """
    widths = {}
    for name, unit in find_units(model, frozen=True).items():
        if isinstance(unit, AtomUnit):
            continue  # AtomNAS narrows itself while loading
        value = state_dict.get(f'{name}.weight')
        if getattr(value, 'dim', lambda: 0)() == 1 and \
                value.shape[0] < unit.num_channels:
            widths[name] = [int(value.shape[0])]
    return narrow_to_widths(model, widths) if widths else {}


def shrink_model(model, threshold=1e-3, fold=True, round_to=1):
    """Remove dead channels from every unit of ``model``, in place.

    The public entry point without a Runner: channels with ``|gamma| <=
    threshold`` go (a unit keeps its ``min_width`` strongest). Eval outputs
    do not change where the fold is exact (AtomNAS blocks without SE, 1x1
    consumers); elsewhere a ``UserWarning`` gives the bound
    (``error_bound`` of the units).

    Args:
        model (nn.Module): Any model with channel units.
        threshold (float): Dead-channel threshold on ``|gamma|``.
        fold (bool): Fold removed constants so eval outputs do not change.
        round_to (int): Every group that shrinks keeps a multiple of this
            many channels (its strongest dead ones stay to make it up).

    Returns:
        dict: ``removed`` (channels per unit name), ``removed_atoms``
        (total), ``error_bound`` (max eval-output change bound, 0 when
        exact), ``archs`` (``{path: arch dict}`` of AtomNAS backbones) and
        ``widths`` (``{unit name: [width per group]}``).
    """
    criterion = ThresholdCriterion(threshold)
    check_number('round_to', round_to, 1, integer=True)
    plan = plan_shrink(model, criterion, round_to=round_to)
    units = check_plan(model, plan)
    removed = {name: units[name].num_channels - len(keep)
               for name, keep in plan.items()}
    bound = max([units[name].error_bound(keep)
                 for name, keep in plan.items()] + [0.0]) if fold else math.inf
    if fold and bound > 1e-6:
        warnings.warn(
            f'shrink_model: removed channels whose constant output is not '
            f'folded exactly (SE gates, padded convs); eval outputs of their '
            f'consumers may change by up to {bound:.3g} (docs/method.md, '
            '"Shrinking")')
    apply_plan(model, plan, fold=fold)
    return dict(removed=removed, removed_atoms=sum(removed.values()),
                error_bound=bound,
                archs={path: m.arch_dict()
                       for path, m in find_backbones(model).items()},
                widths=unit_widths(find_units(model)))
