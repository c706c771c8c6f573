"""Physically remove dead atoms while training runs."""
import copy
import json
import os.path as osp

from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.hooks import Hook
from mmengine.hooks.ema_hook import EMAHook
from mmengine.model import is_model_wrapper

from ...models.cost import count_flops_params
from ...registry import HOOKS
from ...visualization import draw_arch, draw_flops_curve, save_image
from ...search.shrink import (apply_plan, find_backbones, plan_shrink,
                              removed_flops, reshape_to_arch, shrink_optimizer)


def current_archs(model):
    """``{backbone_path: arch dict}`` of every AtomNAS backbone in ``model``."""
    return {path: m.arch_dict() for path, m in find_backbones(model).items()}


@HOOKS.register_module()
class AtomShrinkHook(Hook):
    """Dynamic network shrinkage (ATOMNAS.md section 5) inside the Runner.

    After every ``interval`` epochs (or iterations) an atom is dead when its
    depthwise-BN ``|gamma| <= threshold`` in the live AND the EMA weights;
    when the dead atoms account for ``min_removed_flops`` multiply-adds, they
    are removed from the model, the optimizer state, the EMA copy and the DDP
    wrapper. At the end of training the EMA weights alone decide and any dead
    atom is removed. Every checkpoint carries the architecture in
    ``meta['atomnas_arch']``; loading one (resume, ``load_from``, test) first
    reshapes the model to it.

    Args:
        threshold (float): Dead-atom threshold on ``|gamma|``.
        min_removed_flops (float): Multiply-adds (batch 1 at ``input_size``)
            the dead atoms must reach to trigger a shrink.
        interval (int): Check every ``interval`` epochs or iterations.
        by_epoch (bool): Count ``interval`` in epochs (else iterations).
        input_size (int): Image side for FLOPs accounting.
        final_shrink (bool): Shrink on the EMA weights after the last
            epoch/iteration.
    """

    # Before EMAHook (ABOVE_NORMAL in mmpretrain configs), so that
    # after_load_checkpoint reshapes the EMA copy
    # before EMAHook loads into it.
    priority = 'HIGH'

    def __init__(self, threshold=1e-3, min_removed_flops=1e6, interval=1,
                 by_epoch=True, input_size=224, final_shrink=True):
        if threshold < 0:
            raise ValueError(f'threshold must be >= 0, got {threshold}')
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        self.threshold = threshold
        self.min_removed_flops = min_removed_flops
        self.interval = interval
        self.by_epoch = by_epoch
        self.input_size = input_size
        self.final_shrink = final_shrink
        self.history = []

    # -- triggers -----------------------------------------------------------
    def before_train(self, runner):
        model = self._model(runner)
        if not find_backbones(model):
            raise ValueError('AtomShrinkHook: the model has no AtomNAS backbone')
        self._record(runner, removed=None)

    def after_train_epoch(self, runner):
        if self.by_epoch:
            last = self.is_last_train_epoch(runner)
            if last or self.every_n_epochs(runner, self.interval):
                self.step(runner, final=last and self.final_shrink)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if not self.by_epoch:
            last = self.is_last_train_iter(runner)
            if last or self.every_n_train_iters(runner, self.interval):
                self.step(runner, final=last and self.final_shrink)

    # -- the work -------------------------------------------------------------
    def step(self, runner, final=False):
        """Decide dead atoms (rank 0), shrink when worth it; return the plan."""
        model, ema = self._model(runner), self._ema_module(runner)
        plan = [plan_shrink(model, self.threshold, ema,
                            ema_only=final and ema is not None)]
        broadcast_object_list(plan)
        plan = plan[0]
        flops = removed_flops(model, plan, self.input_size)
        if not plan or (flops < self.min_removed_flops and not final):
            return {}
        blocks = dict(model.named_modules())
        removed = {name: blocks[name].atom_cost.numel() - len(keep)
                   for name, keep in plan.items()}
        self.shrink(runner, plan)
        self._record(runner, removed=removed, removed_flops=flops)
        return plan

    def shrink(self, runner, plan, fold=True):
        """Apply ``plan`` to the model, EMA copy, optimizer and DDP wrapper."""
        model = self._model(runner)
        renamed = apply_plan(model, plan, fold=fold)
        self._follow(runner, renamed,
                     lambda ema: apply_plan(ema, plan, fold=fold))

    def _follow(self, runner, renamed, on_ema):
        """Make everything that holds the model's parameters follow a change."""
        model = self._model(runner)
        ema_hook = self._ema_hook(runner)
        if ema_hook is not None and hasattr(ema_hook, 'ema_model'):
            averaged = ema_hook.ema_model
            on_ema(averaged.module)
            averaged.avg_parameters = averaged.module.state_dict() \
                if averaged.update_buffers else \
                dict(averaged.module.named_parameters())
        optim_wrapper = getattr(runner, 'optim_wrapper', None)
        optimizer = getattr(optim_wrapper, 'optimizer', None)
        if optimizer is not None:
            shrink_optimizer(optimizer, model, renamed)
        elif optim_wrapper is not None and not isinstance(optim_wrapper, dict):
            raise TypeError('AtomShrinkHook supports a single OptimWrapper, '
                            f'got {type(optim_wrapper).__name__}')
        if is_model_wrapper(runner.model):
            # The DDP reducer is bound to the old parameters: re-wrap.
            runner.model = runner.wrap_model(
                copy.deepcopy(runner.cfg.get('model_wrapper_cfg')), model)

    # -- checkpoints ----------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint):
        meta = checkpoint.setdefault('meta', {})
        meta['atomnas_arch'] = current_archs(self._model(runner))
        meta['atomnas_history'] = self.history  # for flops.png after resume

    def after_load_checkpoint(self, runner, checkpoint):
        archs = checkpoint.get('meta', {}).get('atomnas_arch')
        if runner._resume:
            self.history = list(checkpoint.get('meta', {}).get(
                'atomnas_history', []))
        model = self._model(runner)
        if not archs or archs == current_archs(model):
            return
        renamed = reshape_to_arch(model, archs)
        self._follow(runner, renamed, lambda ema: reshape_to_arch(ema, archs))
        runner.logger.info(f'AtomShrinkHook: model reshaped to the '
                           f'checkpoint architecture {archs}')

    # -- bookkeeping ----------------------------------------------------------
    def _record(self, runner, removed, removed_flops=0.0):
        model = self._model(runner)
        channels = next(iter(find_backbones(model).values())).in_channels
        flops, params = count_flops_params(
            model, (1, channels, self.input_size, self.input_size))
        archs = current_archs(model)
        entry = dict(epoch=runner.epoch, iter=runner.iter, flops=flops,
                     params=params, removed_atoms=removed,
                     removed_flops=removed_flops)
        self.history.append(entry)
        runner.message_hub.update_scalar('train/arch_flops', flops)
        runner.message_hub.update_scalar('train/arch_params', params)
        if removed is not None:
            runner.logger.info(
                f'AtomShrinkHook: removed {sum(removed.values())} atoms '
                f'({removed_flops / 1e6:.2f}M MAdds) at epoch {runner.epoch}, '
                f'iter {runner.iter}; now {flops / 1e6:.2f}M FLOPs, '
                f'{params / 1e6:.3f}M params; per block {removed}; '
                f'rows {archs}')
        if is_main_process():
            with open(osp.join(runner.work_dir, 'searched_arch.json'), 'w') as f:
                json.dump(archs, f)
            self._draw(runner, archs, flops)

    def _draw(self, runner, archs, flops):
        """Architecture and FLOPs-curve PNGs to work_dir and vis backends."""
        images = {('arch' if len(archs) == 1 else f'arch_{path}'): draw_arch(
            arch, flops=flops,
            title=f'{path} epoch {runner.epoch} iter {runner.iter}')
            for path, arch in archs.items()}
        images['flops'] = draw_flops_curve(self.history, x='iter')
        for name, img in images.items():
            save_image(img, osp.join(runner.work_dir, f'{name}.png'))
            runner.visualizer.add_image(name, img, step=runner.iter)

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
