"""Dynamic network shrinkage as pure functions (docs/method.md, "Shrinking").

Atoms are addressed by block name (its path in the model, stable across
shrinks) and position in the block's atom order. A *plan*
``{block_name: LongTensor of kept atoms}`` is decided once and applied to the
live model, the EMA copy and the optimizer state alike. The per-block work is
:meth:`AtomicBlock.remove_atoms`; this module orchestrates.
"""
import math
import warnings

import torch

from ..models.backbones.atomnas import AtomNAS
from ..models.blocks import AtomicBlock
from .costs import block_cost_fns
from .policy import ThresholdCriterion


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


def atom_strengths(model, criterion=1e-3, ema_model=None, final=False):
    """``{block_name: per-atom strength}`` of every searchable block."""
    criterion = _criterion(criterion)
    if final and ema_model is None:
        raise ValueError('final=True (EMA alone decides) needs ema_model')
    ema_blocks = searchable_blocks(ema_model) if ema_model is not None else {}
    out = {}
    for name, block in searchable_blocks(model).items():
        live = block.gammas().detach().abs()
        ema = ema_blocks[name].gammas().detach().abs().to(live.device) \
            if name in ema_blocks else None
        out[name] = criterion.strength(live, ema, final and ema is not None)
    return out


def plan_from_strengths(model, strengths, criterion=1e-3):
    """Kept atoms of every block losing some; a block without residual keeps
    at least its strongest atom."""
    criterion = _criterion(criterion)
    blocks = dict(model.named_modules())
    plan = {}
    for name, strength in strengths.items():
        dead = criterion.dead(strength)
        if dead.all() and not blocks[name].use_res:
            dead[strength.argmax()] = False
        if dead.any():
            plan[name] = torch.nonzero(~dead).flatten().cpu()
    return plan


def plan_shrink(model, criterion=1e-3, ema_model=None, ema_only=False):
    """Decide which atoms survive.

    Args:
        model (nn.Module): Live model (unwrapped).
        criterion (float | ThresholdCriterion): A criterion part, or the
            threshold of :class:`ThresholdCriterion`.
        ema_model (nn.Module, optional): Averaged copy with the same names.
        ema_only (bool): Decide on the EMA weights alone (final shrink).

    Returns:
        dict[str, Tensor]: Kept atom indices, only for blocks that lose atoms.
    """
    strengths = atom_strengths(model, criterion, ema_model, ema_only)
    return plan_from_strengths(model, strengths, criterion)


def atom_costs(model, cost):
    """``{block_name: per-atom cost}`` of every searchable block."""
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for backbone in find_backbones(model).values():
        for block, c in zip(backbone.blocks(), cost.atom_costs(backbone)):
            if c is not None:
                out[names[id(block)]] = c
    return out


def block_costs(model, cost):
    """``{block_name: groups -> cost}`` of every searchable block
    (:func:`~atomnas_mm.search.costs.block_cost_fns`)."""
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for backbone in find_backbones(model).values():
        for block, fn in zip(backbone.blocks(),
                             block_cost_fns(backbone, cost)):
            if fn is not None:
                out[names[id(block)]] = fn
    return out


def removed_cost(model, plan, cost):
    """What the atoms that ``plan`` removes cost, by the ``cost`` model."""
    costs = atom_costs(model, cost)
    total = 0.0
    for name, keep in plan.items():
        dead = torch.ones(len(costs[name]), dtype=torch.bool)
        dead[keep] = False
        total += costs[name][dead].sum().item()
    return total


def check_plan(model, plan):
    """Raise unless every entry of ``plan`` is valid for ``model``."""
    blocks = dict(model.named_modules())
    for name, keep in plan.items():
        if not isinstance(blocks.get(name), AtomicBlock):
            raise KeyError(f'plan: {name!r} is not an AtomicBlock of the model')
        blocks[name].check_keep(keep)
    return blocks


def apply_plan(model, plan, fold=True):
    """Shrink every block of ``model`` named in ``plan``, in place.

    The whole plan is validated first: on error nothing has changed.

    Returns:
        dict[Parameter, ParamChange]: The parameter remapping.
    """
    blocks = check_plan(model, plan)
    remap = {}
    for name, keep in plan.items():
        remap.update(blocks[name].remove_atoms(keep, fold=fold))
    return remap


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


def shrink_model(model, threshold=1e-3, fold=True):
    """Remove dead atoms from every AtomNAS backbone in ``model``, in place.

    The public entry point without a Runner: atoms with ``|gamma| <=
    threshold`` go (a block without residual keeps its strongest atom).
    Without SE, eval outputs do not change; with SE they may, and a
    ``UserWarning`` gives the bound (:meth:`AtomicBlock.removal_error_bound`).

    Args:
        model (nn.Module): Any model holding AtomNAS backbones.
        threshold (float): Dead-atom threshold on ``|gamma|``.
        fold (bool): Fold removed constants so eval outputs do not change.

    Returns:
        dict: ``removed`` (atoms per block name), ``removed_atoms`` (total),
        ``error_bound`` (max eval-output change bound, 0 when exact) and
        ``archs`` (``{path: arch dict}``).
    """
    criterion = ThresholdCriterion(threshold)
    plan = plan_shrink(model, criterion)
    blocks = check_plan(model, plan)
    removed = {name: blocks[name].num_atoms - len(keep)
               for name, keep in plan.items()}
    bound = max([blocks[name].removal_error_bound(keep)
                 for name, keep in plan.items()] + [0.0]) if fold else math.inf
    if fold and bound > 1e-6:
        warnings.warn(
            f'shrink_model: SE blocks lost atoms whose constant output passes '
            f'the input-dependent SE gate; eval outputs of the projections may '
            f'change by up to {bound:.3g} (docs/method.md, "Shrinking")')
    apply_plan(model, plan, fold=fold)
    return dict(removed=removed, removed_atoms=sum(removed.values()),
                error_bound=bound,
                archs={path: m.arch_dict()
                       for path, m in find_backbones(model).items()})
