"""Hook adding the resource-aware BN-L1 penalty to the training loss."""
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict

from ...registry import HOOKS
from ...search.costs import FLOPsCost, set_penalty_weights
from ...search.penalty import bn_l1_penalty, proximal_l1_step
from ..weight_decay import weight_decay_loss
from ...search.shrink import atom_costs, find_backbones
from ...search.finders import SEARCH_FINDERS
from ...search.units import AtomUnit, require_units
from ...search.policy import LinearRampSchedule, build_part, check_number
from .shrink_hook import AtomShrinkHook


@HOOKS.register_module()
class BNL1PenaltyHook(Hook):
    """Add ``rho(t) * sum_atoms p * |gamma|`` (and optionally weight decay)
    to the loss before backward (docs/method.md, "Penalty").

    mmengine has no after-backward hook, so at ``before_train`` this hook
    wraps ``runner.optim_wrapper.update_params``; the wrapper adds the terms
    to the loss it is given and calls the original, which then scales the
    sum for gradient accumulation and AMP exactly like the task loss. DDP
    averages the penalty's gradient like any other. ``rho(t)`` comes from the
    *schedule* (default: a linear ramp from 0 over ``warmup_epochs``),
    evaluated at ``runner.iter``: resuming needs no state.

    Logged (``train/`` prefix): ``loss_total`` (what is back-propagated: the
    model's ``loss`` plus the terms below), ``loss_penalty`` (``rho(t) *
    penalty_l1``), ``loss_wd`` (with weight decay); and, as current values,
    ``penalty_rho`` (``rho(t)``) and ``penalty_l1`` (``sum p*|gamma|``).

    Args:
        rho (float): Final penalty strength (A 1.8e-4, B 1.2e-4, C 1e-4);
            0 means weight decay only (retraining).
        warmup_epochs (float): Ramp length in epochs of
            ``len(runner.train_dataloader)`` iterations.
        warmup_iters (int, optional): Ramp length in iterations; overrides
            ``warmup_epochs``.
        weight_decay (float): If > 0, add ``0.5 * wd * sum(w^2)`` over conv
            and FC weights and FC biases (the reference's decay; the
            optimizer can keep ``weight_decay=0``).
        schedule (dict, optional): A penalty-schedule part replacing the
            ramp (``rho``/``warmup_*`` must then be left unset).
        cost (dict, optional): A cost model whose per-channel costs (over
            their mean) become the penalty weights at the start of a fresh
            run, e.g. ``dict(type='LatencyCost', table='latency.json')``. By
            default the weights are FLOPs at 224 px, or the cost model of an
            AtomShrinkHook target when there is one; AtomNAS atoms only,
            unless ``channel_weights='cost'``.
        channel_weights (str): The penalty weight of the channels of units
            that are not AtomNAS atoms (stock models): ``'uniform'`` (1,
            the default) or ``'cost'`` (one channel's cost at the start of
            the run over the mean; fixed for the run, stored in
            checkpoints). Cost weights concentrate the penalty on the
            high-resolution layers; on the MobileNetV2 demo at 30% FLOPs
            they cut the early blocks to 1-2 channels and ended at 76.0
            top-1, uniform weights at 84.2 (docs/search_any_model.md): the
            budget already keeps the net on its cost target.
        proximal (bool, optional): Apply the penalty as a soft-threshold
            step on the gammas after every optimizer step (``gamma <-
            sign(gamma) * max(|gamma| - lr * rho(t) * p, 0)``; skipped with
            the step when AMP skips it) instead of a loss term: gammas reach
            exactly 0, so atoms die on the schedule the strength sets.
            ``loss_penalty`` is then logged, not back-propagated. Default
            (None): on with an AtomShrinkHook target (the budget controller
            needs atoms to die when it asks), off otherwise (the reference
            recipe).
    """

    priority = 'NORMAL'

    def __init__(self, rho=None, warmup_epochs=25, warmup_iters=None,
                 weight_decay=0.0, schedule=None, cost=None, proximal=None,
                 channel_weights='uniform'):
        if (rho is None) == (schedule is None):
            raise ValueError('rho: give rho (linear ramp) or schedule, '
                             'exactly one')
        if rho is not None:
            check_number('rho', rho)
        check_number('warmup_epochs', warmup_epochs)
        if warmup_iters is not None:
            check_number('warmup_iters', warmup_iters, integer=True)
        self.rho = rho
        self.warmup_epochs = warmup_epochs
        self.warmup_iters = warmup_iters
        self.weight_decay = check_number('weight_decay', weight_decay)
        self.schedule = build_part(schedule, None, 'schedule')
        self.cost = build_part(cost, None, 'cost')
        if proximal is not None and not isinstance(proximal, bool):
            raise ValueError(f'proximal: must be a bool or None, got '
                             f'{proximal!r}')
        self.proximal = proximal
        if channel_weights not in ('uniform', 'cost'):
            raise ValueError(f"channel_weights: 'uniform' or 'cost', got "
                             f'{channel_weights!r}')
        self.channel_weights_by = channel_weights
        self.proximal_step = bool(proximal)  # decided in before_train
        self._wrapped = None
        self._step_hook = None
        self.unit_weights = None
        self.units = None

    def before_train(self, runner):
        optim_wrapper = runner.optim_wrapper
        if not isinstance(optim_wrapper, OptimWrapper) or isinstance(
                optim_wrapper, OptimWrapperDict):
            raise TypeError('BNL1PenaltyHook needs a single OptimWrapper, got '
                            f'{type(optim_wrapper).__name__}')
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        narrowed = any(m.__dict__.get('load_remap')
                       for m in model.modules())
        shrink = next((h for h in runner.hooks
                       if isinstance(h, AtomShrinkHook)), None)
        if narrowed and shrink is None:
            raise ValueError(
                'BNL1PenaltyHook: the model narrowed itself to the loaded '
                'checkpoint after the Runner built the optimizer; add '
                'atomnas_mm.AtomShrinkHook to custom_hooks (it makes the '
                'optimizer and EMA follow) or build the backbone with the '
                "checkpoint's arch (meta['atomnas_arch'], arch.json)")
        # the units the shrink hook searches (its finders)
        units = require_units(
            model, shrink.planner.finders if shrink else SEARCH_FINDERS,
            where='BNL1PenaltyHook')[0] if self.rho != 0 else {}
        self.units = units  # modules stay: valid across shrinks
        controller = self._controller(runner)
        self.proximal_step = controller is not None \
            if self.proximal is None else self.proximal
        cost = self.cost or getattr(controller, 'cost', None)
        if cost is not None and runner.iter == 0:  # resumed: weights loaded
            for backbone in find_backbones(model).values():
                set_penalty_weights(backbone, cost)
        if self.channel_weights_by == 'cost' and self.unit_weights is None \
                and any(not isinstance(u, AtomUnit) for u in units.values()):
            self.unit_weights = self.channel_weights(
                model, units, cost or FLOPsCost())
        own = vars(optim_wrapper).get('update_params')
        original = optim_wrapper.update_params

        def update_params(loss, *args, **kwargs):
            total = loss + self.extra_loss(runner)
            runner.message_hub.update_scalar('train/loss_total',
                                             total.detach())
            return original(total, *args, **kwargs)

        optim_wrapper.update_params = update_params
        self._wrapped = (optim_wrapper, own)
        if self.proximal_step and self.rho != 0:
            stepped = [None]

            def after_step(optimizer, args, kwargs):
                # Once per iteration: torch runs the hooks once per patched
                # step() in a subclass chain (a subclass calling super()).
                if stepped[0] != runner.iter:
                    stepped[0] = runner.iter
                    proximal_l1_step(runner.model, optimizer,
                                     self.schedule_of(runner)(runner.iter),
                                     self.unit_weights, self.units)

            self._step_hook = optim_wrapper.optimizer.register_step_post_hook(
                after_step)

    @staticmethod
    def channel_weights(model, units, cost):
        """``{unit name: weight}`` of the units that are not AtomNAS atoms:
        the cost of one of its channels at the current widths over the mean
        of those costs (fixed for the run: stored in checkpoints)."""
        costs = atom_costs(model, cost, {
            name: unit for name, unit in units.items()
            if not isinstance(unit, AtomUnit)})
        mean = torch.cat(list(costs.values())).mean().item() or 1.0
        return {name: c[0].item() / mean for name, c in costs.items()}

    def before_save_checkpoint(self, runner, checkpoint):
        if self.unit_weights is not None:
            checkpoint.setdefault('meta', {})[
                'search_penalty_weights'] = dict(self.unit_weights)

    def after_load_checkpoint(self, runner, checkpoint):
        weights = checkpoint.get('meta', {}).get('search_penalty_weights')
        if runner._resume and weights:
            self.unit_weights = dict(weights)

    def after_train(self, runner):
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if self._wrapped is None:
            return
        optim_wrapper, own = self._wrapped
        if own is None:
            del optim_wrapper.update_params
        else:
            optim_wrapper.update_params = own
        self._wrapped = None

    def schedule_of(self, runner):
        """The penalty schedule: the configured part or the ramp, times the
        scale of an AtomShrinkHook's budget controller when there is one."""
        schedule = self.schedule
        if schedule is None:
            ramp = self.warmup_iters if self.warmup_iters is not None else \
                round(self.warmup_epochs * len(runner.train_dataloader))
            schedule = LinearRampSchedule(self.rho, ramp)
        controller = self._controller(runner)
        if controller is None:
            return schedule
        return lambda iteration: schedule(iteration) * controller.factor

    @staticmethod
    def _controller(runner):
        """The budget controller of an AtomShrinkHook, or None."""
        return next((h.planner.controller
                     for h in getattr(runner, 'hooks', ())
                     if isinstance(h, AtomShrinkHook)
                     and h.planner.controller is not None), None)

    def extra_loss(self, runner):
        """The terms to add to the loss at the current iteration; logs them.

        Returns:
            Tensor | float: A differentiable scalar (0.0 when both terms
            are off).
        """
        rho = self.schedule_of(runner)(runner.iter)
        scalars = dict(penalty_rho=rho)
        loss = 0.0
        if self.rho != 0 and self.proximal_step:  # applied after the step
            with torch.no_grad():
                penalty = bn_l1_penalty(runner.model, self.unit_weights,
                                        self.units)
            scalars.update(penalty_l1=penalty, loss_penalty=rho * penalty)
        elif self.rho != 0:  # rho=0: weight decay only (retraining)
            penalty = bn_l1_penalty(runner.model, self.unit_weights,
                                    self.units)
            loss = rho * penalty
            scalars.update(penalty_l1=penalty.detach(),
                           loss_penalty=loss.detach())
        if self.weight_decay > 0:
            wd = weight_decay_loss(runner.model, self.weight_decay)
            loss = loss + wd
            scalars['loss_wd'] = wd.detach()
        for key, value in scalars.items():
            runner.message_hub.update_scalar(f'train/{key}', value)
        return loss
