"""Weight decay as a loss term (AtomNAS's recipe: ``0.5 * wd * sum(w^2)``
over conv and FC weights and FC biases, no BN), added by
:class:`~atomnas_mm.engine.hooks.BNL1PenaltyHook` so that the optimizer can
keep ``weight_decay=0``."""
import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper
from torch.nn.modules.conv import _ConvNd


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def decayed_params(model):
    """Weights of conv and linear layers and biases of linear layers.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    params = []
    for m in _unwrap(model).modules():
        if isinstance(m, (_ConvNd, nn.Linear)):
            params.append(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                params.append(m.bias)
    return [p for p in params if p is not None and p.requires_grad]


def weight_decay_loss(model, weight_decay):
    """Weight decay as a loss term: ``0.5 * wd * sum(w^2)``.

    Over conv and FC weights and the FC biases; no BN, no conv biases.

    Args:
        model (nn.Module): A model, possibly wrapped (DDP).
        weight_decay (float): The decay ``wd``.

    Returns:
        Tensor: A differentiable scalar.
    """
    params = decayed_params(model)
    if not params:
        param = next(_unwrap(model).parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    # (p * p).sum() beats dot/pow (forward + backward) on CPU and GPU.
    squares = torch.stack([(p * p).sum() for p in params])
    return 0.5 * weight_decay * squares.sum()
