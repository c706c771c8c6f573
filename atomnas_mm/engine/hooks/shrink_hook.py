"""Physically remove dead atoms while training runs."""
import copy
import os.path as osp

from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.hooks import Hook
from mmengine.hooks.ema_hook import EMAHook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.runner import EpochBasedTrainLoop

from ...registry import HOOKS
from ...search.budget import BudgetController
from ...search.costs import FLOPsCost, ParamsCost
from ...search.policy import (MinFLOPsTrigger, ThresholdCriterion, build_part,
                              check_number)
from ...search.planner import ShrinkPlanner
from ...search.shrink import (apply_plan, backbone_cost, channel_widths,
                              check_optimizer, check_plan, find_backbones,
                              narrow_to_widths, reshape_to_arch,
                              shrink_optimizer, width_cost_of)
from ...search.units import AtomUnit, describe_skipped, find_units
from ...fileio import atomic_write_json
from ...visualization import draw_arch, draw_flops_curve, save_image_or_warn


def current_archs(model):
    """``{backbone_path: arch dict}`` of every AtomNAS backbone in ``model``."""
    return {path: m.arch_dict() for path, m in find_backbones(model).items()}


def is_single_optim_wrapper(optim_wrapper):
    """Whether ``optim_wrapper`` is one built OptimWrapper (OptimWrapperDict
    subclasses OptimWrapper but holds several)."""
    return isinstance(optim_wrapper, OptimWrapper) and not isinstance(
        optim_wrapper, OptimWrapperDict)


@HOOKS.register_module()
class AtomShrinkHook(Hook):
    """Dynamic network shrinkage (docs/method.md, "Shrinking") in the Runner.

    After every ``interval`` epochs (or iterations) the *criterion* marks
    dead atoms (default: ``|gamma| <= threshold`` in the live AND the EMA
    weights); when the *trigger* agrees (default: they weigh
    ``min_removed_flops`` multiply-adds by the *cost* model), they are
    removed from the model, the optimizer state, the EMA copy and the DDP
    wrapper. At the end of training the EMA weights alone decide. The
    decision is taken on rank 0 and broadcast. Every checkpoint carries the
    architecture in ``meta['atomnas_arch']``; loading one (resume,
    ``load_from``, test) first reshapes the model, EMA and optimizer to it.

    Args:
        threshold (float): Threshold of the default criterion (1e-3).
        min_removed_flops (float): Minimum of the default trigger (1e6).
        interval (int): Check every ``interval`` epochs or iterations.
        by_epoch (bool): Count ``interval`` in epochs (needs an epoch-based
            loop) or in iterations.
        input_size (int): Image side of the default FLOPs cost model.
        final_shrink (bool): Shrink on the EMA weights after training.
        criterion (dict, optional): A criterion part (replaces threshold).
        trigger (dict, optional): A trigger part (replaces
            min_removed_flops).
        cost (dict, optional): The cost model of the trigger and the logs
            (replaces ``FLOPsCost(input_size)``).
        target (dict, optional): A budget for the backbone, e.g.
            ``dict(flops=300e6)`` or ``dict(params=4e6)``: a
            :class:`~atomnas_mm.search.budget.BudgetController` then steers
            the penalty strength of BNL1PenaltyHook (a factor on its
            schedule, applied as a proximal step) and caps every shrink at
            the target; once the net is on the target the penalty is off.
        deadline (float): With ``target``: fraction of training by which the
            target is reached (the first check at or after it removes the
            weakest atoms down to the target).
        tolerance (float): With ``target``: the net ends within
            ``[target, target * (1 + tolerance)]``.
        latency_table (str, optional): With ``target=dict(latency_ms=...)``:
            the latency table of the deployment device.
        follow_path (bool): With ``target``: at every check where the net
            is above the controller's path (a linear descent from the
            initial cost to the target at the deadline), its weakest
            channels (smallest ``|gamma|``, dead or not) go down to the
            path, so the net shrinks gradually instead of by a cut at the
            deadline when the penalty lags (stock models, whose BN scales
            start at 1). The penalty then keeps its own schedule (no
            steering) until the net lands on the target; on the MobileNetV2
            demo, steering it as well made the final accuracy swing by 10
            points between seeds (docs/search_any_model.md).
        round_to (int): Every shrink leaves each channel group's width (a
            unit's channels, an AtomNAS block's kernel group) a multiple of
            this, so the searched net runs on the vectorised paths of its
            runtime (README, "Hardware-aligned widths"); a group narrower
            than it keeps its width. With ``target`` the budget counts with
            it.
        finders (list, optional): Finder parts (config dicts) of the units
            to search (default
            :data:`~atomnas_mm.search.finders.SEARCH_FINDERS`: every finder
            but ``ResNetStreamFinder``; add it to search a ResNet's stage
            channels too, docs/search_any_model.md).
    """

    # Before EMAHook (ABOVE_NORMAL in mmpretrain configs), so that
    # after_load_checkpoint reshapes the EMA copy before EMAHook loads it.
    priority = 'HIGH'

    def __init__(self, threshold=None, min_removed_flops=None, interval=1,
                 by_epoch=True, input_size=224, final_shrink=True,
                 criterion=None, trigger=None, cost=None, target=None,
                 deadline=0.5, tolerance=0.02, latency_table=None,
                 follow_path=False, round_to=1, finders=None):
        for name, given, part in (('threshold', threshold, criterion),
                                  ('min_removed_flops', min_removed_flops,
                                   trigger)):
            if given is not None and part is not None:
                raise ValueError(f'{name}: give it or the policy part that '
                                 'replaces it, not both')
        criterion = build_part(
            criterion, ThresholdCriterion(
                1e-3 if threshold is None else threshold), 'criterion')
        trigger = build_part(
            trigger, MinFLOPsTrigger(
                1e6 if min_removed_flops is None else min_removed_flops),
            'trigger')
        round_to = check_number('round_to', round_to, 1, integer=True)
        controller = None
        if target is not None:
            if cost is not None:
                raise ValueError('cost: a target brings its own cost model')
            controller = BudgetController(
                target, deadline, tolerance, input_size=input_size,
                latency_table=latency_table, round_to=round_to)
            cost = controller.cost
        flops = FLOPsCost(input_size)  # for the logs, whatever the cost
        self.interval = check_number('interval', interval, 1, integer=True)
        for name, value in (('by_epoch', by_epoch),
                            ('final_shrink', final_shrink)):
            if not isinstance(value, bool):
                raise ValueError(f'{name}: must be a bool, got {value!r}')
        self.by_epoch = by_epoch
        self.final_shrink = final_shrink
        if not isinstance(follow_path, bool):
            raise ValueError(f'follow_path: must be a bool, got '
                             f'{follow_path!r}')
        if follow_path and target is None:
            raise ValueError('follow_path: needs a target')
        self.planner = ShrinkPlanner(
            criterion, trigger, build_part(cost, flops, 'cost'), flops,
            controller, follow_path, round_to, finders)
        self.history = []

    # -- triggers -----------------------------------------------------------
    def before_train(self, runner):
        model = self._model(runner)
        units, skipped = self.planner.units(model, where='AtomShrinkHook')
        runner.logger.info(
            f'AtomShrinkHook: searching {len(units)} channel units ('
            f'{sum(u.num_channels for u in units.values())} channels)' + (
                f'; not searched:\n{describe_skipped(skipped)}'
                if skipped else ''))
        if self.by_epoch and not isinstance(runner.train_loop,
                                            EpochBasedTrainLoop):
            raise ValueError(
                f'AtomShrinkHook: by_epoch=True needs an epoch-based train '
                f'loop, got {type(runner.train_loop).__name__}; set '
                'by_epoch=False (interval in iterations)')
        optim_wrapper = runner.optim_wrapper
        if not is_single_optim_wrapper(optim_wrapper):
            raise TypeError(
                'AtomShrinkHook supports a single OptimWrapper, got '
                f'{type(optim_wrapper).__name__}' + (
                    ' (several optimizers)' if isinstance(
                        optim_wrapper, OptimWrapperDict) else ''))
        self._follow_load_narrowing(runner)
        check_optimizer(optim_wrapper.optimizer, model)
        controller = self.planner.controller
        if controller is not None and controller.initial_cost is None:
            try:
                low, high = controller.start(width_cost_of(
                    model, self.planner.cost, units))
            except ValueError as e:
                left = [n for n in find_units(model) if n not in units]
                if not left:
                    raise
                raise ValueError(
                    f'{e}; {len(left)} more units of this model are not '
                    f'searched by default (e.g. {left[0]}): name their '
                    'finders in AtomShrinkHook(finders=...) to search them '
                    'too (docs/search_any_model.md)') from None
            # Channel units keep a channel each at the floor; AtomNAS blocks
            # empty whole residual blocks there instead (at 15% of the demo
            # supernet, 6% of its range above the floor, the search is fine).
            near_floor = controller.target - low < 0.1 * (high - low)
            if near_floor and not any(isinstance(u, AtomUnit)
                                      for u in units.values()):
                runner.logger.warning(
                    f'AtomShrinkHook: the target {controller.target:.6g} '
                    f'is within 10% of the smallest net this model allows '
                    f'({low:.6g}, every unit at its minimum width; full '
                    f'{high:.6g}): most units will be cut to a channel or '
                    'two, expect a large accuracy loss (docs/'
                    'search_any_model.md, "Budget and penalty")')
        if not self.history:  # a resumed run has its history already
            self._record(runner, runner.epoch, runner.iter, removed=None)

    def after_train_epoch(self, runner):
        if self.by_epoch:
            last = self.is_last_train_epoch(runner)
            if last or self.every_n_epochs(runner, self.interval):
                self.shrink_if_due(runner, runner.epoch + 1, runner.iter,
                                   final=last and self.final_shrink)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if not self.by_epoch:
            last = self.is_last_train_iter(runner)
            if last or self.every_n_train_iters(runner, self.interval):
                self.shrink_if_due(runner, runner.epoch + 1, runner.iter + 1,
                                   final=last and self.final_shrink)

    # -- the work -------------------------------------------------------------
    def plan_and_steer(self, runner, final=False):
        """The searched units, the shrink plan, its cost, whether it lands
        the net on the budget and the per-channel costs (the model is costed
        once per check); decided on rank 0 by the planner, broadcast (with
        the budget controller's new penalty scale)."""
        model, planner = self._model(runner), self.planner
        units = planner.units(model)
        widths, costs = planner.costing(model, units)
        decision = [None, None, False]
        if is_main_process():
            step = planner.plan(model, units, widths, costs,
                                self._ema_module(runner),
                                (runner.iter + 1) / runner.max_iters, final)
            if planner.controller is not None:
                self._log_budget(runner, step, final)
            decision = [step.plan, None if planner.controller is None
                        else planner.controller.scale, step.lands]
        broadcast_object_list(decision)
        plan, scale, lands = decision
        if scale is not None:
            planner.controller.scale = scale
        return units, plan, planner.removed(model, plan, costs), lands, costs

    def _log_budget(self, runner, step, final):
        controller = self.planner.controller
        runner.message_hub.update_scalar('train/budget_live_cost', step.live)
        runner.message_hub.update_scalar('train/budget_scale',
                                         controller.factor)
        if step.cut:
            # following the path, the deadline's cut is its last step
            (runner.logger.info if self.planner.follow_path else
             runner.logger.warning)(
                f'AtomShrinkHook: the penalty did not reach the target by '
                f'the {"end" if final else "deadline"} ({step.live:.6g} > '
                f'{controller.target:.6g}); the weakest live atoms go down to '
                'it (BN re-calibration follows when BNRecalibrationHook is '
                'configured)')

    def shrink_if_due(self, runner, epoch, iteration, final=False):
        """Decide dead atoms and shrink when the trigger agrees (always when
        the shrink lands the net on a budget target).

        The trigger weighs the dead atoms in FLOPs, whatever the cost model.

        Args:
            epoch (int): The 1-based epoch (as mmengine's log counts) in or
                after which the check runs.
            iteration (int): Iterations completed.
            final (bool): The final shrink (EMA weights alone decide).

        Returns:
            dict: The applied plan (empty when nothing was removed).
        """
        units, plan, cost, lands, costs = self.plan_and_steer(runner, final)
        if self.planner.fires(self._model(runner), plan, costs, lands, final):
            self._shrink(runner, units, plan, epoch, iteration, cost)
        else:
            plan = {}
        controller = self.planner.controller
        if lands and not controller.landed:
            controller.landed = True
            runner.logger.info(
                'AtomShrinkHook: the backbone is on its target; the penalty '
                'is off for the rest of training')
        return plan

    def _shrink(self, runner, units, plan, epoch, iteration, cost):
        removed = {name: units[name].num_channels - len(keep)
                   for name, keep in plan.items()}
        bound = max(units[name].error_bound(keep)
                    for name, keep in plan.items())
        if bound > 1e-6:
            # following the path, live channels go: the bound is a detail
            (runner.logger.info if self.planner.follow_path else
             runner.logger.warning)(
                f'AtomShrinkHook: removed channels whose constant output is '
                f'not folded exactly (SE gates, padded convs); eval outputs '
                f'of their consumers may change by up to {bound:.3g} '
                '(docs/method.md, "Shrinking")')
        self.apply(runner, plan)
        self._record(runner, epoch, iteration, removed=removed,
                     removed_cost=cost)

    def apply(self, runner, plan, fold=True):
        """Apply ``plan`` to the model, EMA copy, optimizer and DDP wrapper.

        The plan is checked against the model and the EMA copy first: on
        error nothing has changed.
        """
        ema = self._ema_module(runner)
        if ema is not None:
            check_plan(ema, plan)
        remap = apply_plan(self._model(runner), plan, fold=fold)
        self._update_holders(runner, remap,
                             lambda ema: apply_plan(ema, plan, fold=fold))

    def _update_holders(self, runner, remap, change_ema):
        """Make what holds the model's parameters follow a surgery: the EMA
        copy (``change_ema`` applies the same surgery to it), the optimizer
        (when built) and the DDP wrapper."""
        model = self._model(runner)
        ema_hook = self._ema_hook(runner)
        if ema_hook is not None and hasattr(ema_hook, 'ema_model'):
            averaged = ema_hook.ema_model
            change_ema(averaged.module)
            averaged.avg_parameters = averaged.module.state_dict() \
                if averaged.update_buffers else \
                dict(averaged.module.named_parameters())
        # In val/test mode runner.optim_wrapper is still the unbuilt config;
        # an OptimWrapperDict is refused in before_train.
        if is_single_optim_wrapper(runner.optim_wrapper):
            shrink_optimizer(runner.optim_wrapper.optimizer, model, remap)
        if is_model_wrapper(runner.model):
            # The DDP reducer is bound to the old parameters: re-wrap.
            runner.model = runner.wrap_model(
                copy.deepcopy(runner.cfg.get('model_wrapper_cfg')), model)

    def _follow_load_narrowing(self, runner):
        """Backbones that narrowed themselves while weights were loaded
        (``init_cfg=Pretrained`` of a search checkpoint, after the Runner
        built optimizer, EMA copy and DDP wrapper): make those follow, the
        EMA copy taking the loaded weights."""
        model = self._model(runner)
        remap = {}
        for module in model.modules():
            remap.update(module.__dict__.pop('load_remap', {}))
        if not remap:
            return
        archs, widths = current_archs(model), channel_widths(model)

        def narrow_ema(ema):
            reshape_to_arch(ema, archs)
            narrow_to_widths(ema, widths)
            ema.load_state_dict(model.state_dict())

        self._update_holders(runner, remap, narrow_ema)
        runner.logger.info('AtomShrinkHook: optimizer and EMA copy follow '
                           'the backbone narrowed to its loaded weights')

    # -- checkpoints ----------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint):
        meta = checkpoint.setdefault('meta', {})
        meta['atomnas_arch'] = current_archs(self._model(runner))
        meta['channel_units'] = channel_widths(self._model(runner))
        meta['atomnas_history'] = self.history  # for flops.png after resume
        if self.planner.controller is not None:
            meta['atomnas_budget'] = self.planner.controller.state_dict()
        from ..search_settings import record  # checked on resume
        record(runner, checkpoint)

    def after_load_checkpoint(self, runner, checkpoint):
        meta = checkpoint.get('meta', {})
        if runner._resume:
            from ..search_settings import check_resume
            check_resume(runner, checkpoint)  # SearchSettingsChanged
            self.history = list(meta.get('atomnas_history', []))
            controller = self.planner.controller
            if controller is not None and 'atomnas_budget' in meta:
                controller.load_state_dict(meta['atomnas_budget'])
        archs = meta.get('atomnas_arch')
        widths = meta.get('channel_units')
        model = self._model(runner)
        if archs and archs != current_archs(model):
            remap = reshape_to_arch(model, archs)
            self._update_holders(runner, remap,
                                 lambda ema: reshape_to_arch(ema, archs))
            runner.logger.info(f'AtomShrinkHook: model reshaped to the '
                               f'checkpoint architecture {archs}')
        if widths and widths != channel_widths(model):
            remap = narrow_to_widths(model, widths)
            self._update_holders(runner, remap,
                                 lambda ema: narrow_to_widths(ema, widths))
            runner.logger.info('AtomShrinkHook: channel units narrowed to '
                               'the checkpoint widths')

    # -- bookkeeping ----------------------------------------------------------
    def _record(self, runner, epoch, iteration, removed, removed_cost=0.0):
        model = self._model(runner)
        planner = self.planner
        flops = backbone_cost(model, planner.flops)
        params = backbone_cost(model, ParamsCost())
        cost = flops if planner.cost is planner.flops else \
            backbone_cost(model, planner.cost)
        archs = current_archs(model)
        widths = channel_widths(model)
        self.history.append(dict(epoch=epoch, iter=iteration, flops=flops,
                                 params=params, cost=cost,
                                 removed_atoms=removed,
                                 removed_cost=removed_cost))
        runner.message_hub.update_scalar('train/backbone_flops', flops)
        runner.message_hub.update_scalar('train/backbone_params', params)
        if removed is not None:
            amount = f'{removed_cost / 1e6:.3f}M' if isinstance(
                planner.cost, (FLOPsCost, ParamsCost)) else \
                f'{removed_cost:.4g} ms'
            runner.logger.info(
                f'AtomShrinkHook: removed {sum(removed.values())} atoms '
                f'({amount} by {type(planner.cost).__name__}) '
                f'in epoch {epoch}, after iter {iteration}; backbone now '
                f'{flops / 1e6:.3f}M FLOPs, {params / 1e6:.3f}M params, cost '
                f'{cost:.6g}; per unit {removed}; '
                + (f'rows {archs}' if archs else f'widths {widths}'))
        if is_main_process():
            # The result: written atomically, and a failure stops training.
            atomic_write_json(osp.join(runner.work_dir, 'searched_arch.json'),
                              archs if archs else dict(channel_units=widths))
            self._draw(runner, archs, flops, epoch, iteration)

    def _draw(self, runner, archs, flops, epoch, iteration):
        """Architecture and FLOPs-curve PNGs to work_dir and vis backends;
        a picture that cannot be written is logged, training goes on."""
        images = {('arch' if len(archs) == 1 else f'arch_{path}'): draw_arch(
            arch, flops=flops,
            title=f'{path}, epoch {epoch}, iter {iteration}')
            for path, arch in archs.items()}
        images['flops'] = draw_flops_curve(self.history, x='iter')
        for name, img in images.items():
            save_image_or_warn(img, osp.join(runner.work_dir, f'{name}.png'),
                               logger=runner.logger)
            runner.visualizer.add_image(name, img, step=iteration)

    @staticmethod
    def _model(runner):
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    @staticmethod
    def _ema_hook(runner):
        for hook in runner.hooks:
            if isinstance(hook, EMAHook):
                return hook
        return None

    def _ema_module(self, runner):
        hook = self._ema_hook(runner)
        return hook.ema_model.module if hook is not None and hasattr(
            hook, 'ema_model') else None
