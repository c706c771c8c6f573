"""Hook adding the resource-aware BN-L1 penalty to the training loss."""
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapperDict

from ...registry import HOOKS
from ...search.penalty import bn_l1_penalty, rho_at, weight_decay_loss


@HOOKS.register_module()
class BNL1PenaltyHook(Hook):
    """Add ``rho(t) * sum_atoms p * |gamma|`` (and optionally weight decay)
    to the loss before backward (ATOMNAS.md sections 4 and 6).

    mmengine has no after-backward hook, so at ``before_train`` this hook
    wraps ``runner.optim_wrapper.update_params``; the wrapper adds the terms
    to the loss it is given and calls the original, which then scales the
    sum for gradient accumulation and AMP exactly like the task loss. The
    penalty is computed on the local (DDP-wrapped) parameters, so DDP
    averages its gradient like any other. ``rho(t)`` ramps linearly from 0
    per iteration and is derived from ``runner.iter``: resuming needs no
    state. Logs ``train/bn_l1`` (unweighted), ``train/loss_bn_l1``
    (weighted), ``train/rho`` and, with weight decay, ``train/loss_wd``.

    Args:
        rho (float): Final penalty strength (A 1.8e-4, B 1.2e-4, C 1e-4).
        warmup_epochs (float): Ramp length in epochs of
            ``len(runner.train_dataloader)`` iterations, for epoch- and
            iteration-based loops; 0 disables the ramp.
        warmup_iters (int, optional): Ramp length in iterations; overrides
            ``warmup_epochs``.
        weight_decay (float): If > 0, add ``0.5 * wd * sum(w^2)`` over conv
            and FC weights and FC biases, so the optimizer can keep
            ``weight_decay=0`` and a single param group.
    """

    priority = 'NORMAL'

    def __init__(self, rho, warmup_epochs=25, warmup_iters=None,
                 weight_decay=0.0):
        for name, value in dict(rho=rho, warmup_epochs=warmup_epochs,
                                weight_decay=weight_decay).items():
            if value < 0:
                raise ValueError(f'{name}: must be >= 0, got {value}')
        if warmup_iters is not None and warmup_iters < 0:
            raise ValueError(f'warmup_iters: must be >= 0, got {warmup_iters}')
        self.rho = rho
        self.warmup_epochs = warmup_epochs
        self.warmup_iters = warmup_iters
        self.weight_decay = weight_decay
        self._wrapped = None

    def before_train(self, runner):
        optim_wrapper = runner.optim_wrapper
        if isinstance(optim_wrapper, OptimWrapperDict):
            raise TypeError('BNL1PenaltyHook needs a single OptimWrapper, got '
                            'an OptimWrapperDict')
        own = vars(optim_wrapper).get('update_params')
        original = optim_wrapper.update_params

        def update_params(loss, *args, **kwargs):
            return original(loss + self.extra_loss(runner), *args, **kwargs)

        optim_wrapper.update_params = update_params
        self._wrapped = (optim_wrapper, own)

    def after_train(self, runner):
        if self._wrapped is None:
            return
        optim_wrapper, own = self._wrapped
        if own is None:
            del optim_wrapper.update_params
        else:
            optim_wrapper.update_params = own
        self._wrapped = None

    def ramp_iters(self, runner):
        """Length of the rho ramp in iterations."""
        if self.warmup_iters is not None:
            return self.warmup_iters
        return round(self.warmup_epochs * len(runner.train_dataloader))

    def extra_loss(self, runner):
        """The terms to add to the loss at the current iteration; logs them.

        Args:
            runner (Runner): The runner.

        Returns:
            Tensor | float: A differentiable scalar (0.0 when both terms
            are off).
        """
        rho = rho_at(runner.iter, self.rho, self.ramp_iters(runner))
        scalars = dict(rho=rho)
        loss = 0.0
        if self.rho > 0:  # rho=0: weight decay only (retraining)
            penalty = bn_l1_penalty(runner.model)
            loss = rho * penalty
            scalars.update(bn_l1=penalty.detach(), loss_bn_l1=loss.detach())
        if self.weight_decay > 0:
            wd = weight_decay_loss(runner.model, self.weight_decay)
            loss = loss + wd
            scalars['loss_wd'] = wd.detach()
        for key, value in scalars.items():
            runner.message_hub.update_scalar(f'train/{key}', value)
        return loss
