"""TensorFlow-style RMSProp (docs/method.md, "Recipe")."""
import torch
from torch.optim import Optimizer

from ...registry import OPTIMIZERS


@OPTIMIZERS.register_module()
class TFRMSprop(Optimizer):
    """RMSProp as in TensorFlow: eps inside the square root, lr in momentum.

    Per parameter, with gradient ``g`` (plus ``weight_decay * p`` if set)::

        square_avg = alpha * square_avg + (1 - alpha) * g^2   # starts at 0
        momentum_buffer = momentum * momentum_buffer
                          + lr * g / sqrt(square_avg + eps)   # starts at 0
        p -= momentum_buffer

    With ``momentum == 0``: ``p -= lr * g / sqrt(square_avg + eps)``. Since
    lr enters the buffer, an lr change only affects new contributions (as in
    TensorFlow), unlike ``torch.optim.RMSprop``. The state holds tensors
    only (``square_avg``, ``momentum_buffer``), so checkpoints stay loadable
    with ``weights_only=True``. Param groups carry ``lr`` and ``momentum``,
    which mmengine's LR and momentum schedulers drive.

    Args:
        params (iterable): Parameters or param group dicts.
        lr (float): Learning rate.
        alpha (float): Decay of the squared-gradient average (TF ``decay``).
        momentum (float): Momentum factor.
        eps (float): Added to the average inside the square root.
        weight_decay (float): L2 penalty added to the gradient, as in torch.
    """

    def __init__(self, params, lr=1e-2, alpha=0.9, momentum=0.9, eps=1e-3,
                 weight_decay=0.0):
        for name, value in dict(lr=lr, eps=eps, momentum=momentum,
                                weight_decay=weight_decay).items():
            if value < 0:
                raise ValueError(f'{name}: must be >= 0, got {value}')
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f'alpha: must be in [0, 1), got {alpha}')
        defaults = dict(lr=lr, alpha=alpha, momentum=momentum, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _collect(self, group):
        """Parameters with gradients and their (lazily created) states."""
        params, grads, avgs, bufs = [], [], [], []
        for p in group['params']:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError('TFRMSprop does not support sparse '
                                   'gradients')
            state = self.state[p]
            if not state:
                state['square_avg'] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            if group['momentum'] > 0 and 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state['square_avg'])
            bufs.append(state.get('momentum_buffer'))
        return params, grads, avgs, bufs

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step.

        Args:
            closure (callable, optional): Re-evaluates the model and returns
                the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, avgs, bufs = self._collect(group)
            if params:
                _tf_rmsprop_update(params, grads, avgs, bufs, **{
                    k: group[k] for k in ('lr', 'alpha', 'momentum', 'eps',
                                          'weight_decay')})
        return loss


def _tf_rmsprop_update(params, grads, avgs, bufs, lr, alpha, momentum, eps,
                       weight_decay):
    """In-place TF RMSProp update of lists of tensors (foreach kernels)."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(avgs, alpha)
    torch._foreach_addcmul_(avgs, grads, grads, value=1 - alpha)
    denom = torch._foreach_add(avgs, eps)
    torch._foreach_sqrt_(denom)
    if momentum > 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_addcdiv_(bufs, grads, denom, value=lr)
        torch._foreach_sub_(params, bufs)
    else:
        torch._foreach_addcdiv_(params, grads, denom, value=-lr)
