"""Loss terms of the channel search (docs/method.md, "Penalty").

Pure functions of a model; the hook that adds them to the loss lives in
``atomnas_mm.engine.hooks.penalty_hook``.
"""
import torch
from mmengine.model import is_model_wrapper

from .units import AtomUnit, find_units


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def penalised_atoms(model, weights=None, units=None):
    """Gammas and penalty weights of every channel unit of ``model``.

    Args:
        model (nn.Module): A model, possibly wrapped (DDP).
        weights (dict, optional): ``{unit name: float}``, the weight of the
            channels of units that are not AtomNAS blocks (1 when missing);
            an AtomNAS block's atoms carry theirs (``penalty_weight``).
        units (dict, optional): The model's units (found when None; a hook
            passes the ones it found once: units stay valid across shrinks).

    Returns:
        tuple[list[Tensor], list[Tensor]]: Per unit, the gammas in channel
        order and the matching weights.
    """
    gammas, costs = [], []
    units = find_units(_unwrap(model)) if units is None else units
    for name, unit in units.items():
        if not unit.num_channels:
            continue
        gamma = unit.gammas()
        gammas.append(gamma)
        costs.append(_weights(unit, name, weights, gamma))
    return gammas, costs


def _weights(unit, name, weights, like):
    if isinstance(unit, AtomUnit):
        return unit.block.penalty_weight
    value = 1.0 if weights is None else weights.get(name, 1.0)
    return torch.full((unit.num_channels, ), float(value),
                      device=like.device)


def bn_l1_penalty(model, weights=None, units=None):
    """Resource-aware L1 penalty ``sum_channels p * |gamma|``.

    Args:
        model (nn.Module): A model, possibly wrapped (DDP).
        weights, units (dict, optional): See :func:`penalised_atoms`.

    Returns:
        Tensor: A differentiable scalar; 0 when there is no unit.
    """
    gammas, costs = penalised_atoms(model, weights, units)
    if not gammas:
        return _zero(model)
    gamma = torch.cat(gammas)
    cost = torch.cat(costs).to(gamma)
    return torch.dot(cost, gamma.abs())


@torch.no_grad()
def proximal_l1_step(model, optimizer, rho, weights=None, units=None):
    """Apply the penalty as its proximal operator after an optimizer step.

    Every channel's gamma becomes ``sign(gamma) * max(|gamma| - lr * rho *
    p, 0)``, with ``lr`` the learning rate of its parameter group: the step
    of ISTA for ``rho * sum p * |gamma|``. Unlike the loss term's
    subgradient (which makes gammas oscillate around 0 with an amplitude of
    about ``lr * rho * p``), it sets gammas exactly to 0, so channels die
    when the strength asks for it. Gammas the optimizer does not hold are
    left alone, and so are the ``min_width`` strongest channels of a unit
    that is not an AtomNAS block (no shrink removes them: such a unit
    cannot vanish, and zeroing all its gammas would cut the network; an
    AtomNAS block keeps the reference's penalty on every atom).

    Args:
        model (nn.Module): A model, possibly wrapped (DDP).
        optimizer (torch.optim.Optimizer): The optimizer that just stepped.
        rho (float): The penalty strength.
        weights, units (dict, optional): See :func:`penalised_atoms`.
    """
    lrs = {p: group['lr'] for group in optimizer.param_groups
           for p in group['params']}
    units = find_units(_unwrap(model)) if units is None else units
    for name, unit in units.items():
        if not unit.num_channels:
            continue
        gammas = unit.gammas()
        unit_weights = _weights(unit, name, weights, gammas)
        if unit.min_width and not isinstance(unit, AtomUnit):
            # the strongest stay whatever: not shrunk
            unit_weights = unit_weights.clone()
            unit_weights[gammas.abs().topk(
                min(unit.min_width, len(gammas))).indices] = 0
        for gamma, start in unit.gamma_slices():
            lr = lrs.get(gamma)
            if lr is None:
                continue
            weight = unit_weights[start:start + gamma.numel()]
            shrunk = gamma.abs() - (lr * rho) * weight.to(gamma)
            gamma.copy_(gamma.sign() * shrunk.clamp_(min=0))


def _zero(model):
    param = next(_unwrap(model).parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
