"""Re-estimate BatchNorm statistics before validation (on the EMA weights)."""
import torch
from mmengine.dist import all_reduce_params
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import HOOKS


@torch.no_grad()
def recalibrate_bn(model, batches):
    """Reset every BN's running statistics and re-estimate them.

    The new statistics are the plain average over ``batches`` (BN momentum
    None), computed in train mode without gradients.

    Args:
        model (BaseModel): An mmengine model (``model(inputs, mode=...)``).
        batches (Iterable[dict]): Data batches from a dataloader.

    Returns:
        int: Number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = 0
    try:
        for data in batches:
            data = model.data_preprocessor(data, True)
            model(data['inputs'], mode='tensor')
            count += 1
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
    if count == 0:
        raise ValueError('recalibrate_bn: no batches')
    return count


@HOOKS.register_module()
class BNRecalibrationHook(Hook):
    """Re-estimate the BN statistics of the EMA weights on training batches.

    The AtomNAS reference validated (and reported) the EMA weights after BN
    re-calibration. This hook does it on the EMA copy itself (the live model
    without EMAHook) at the end of every ``interval`` epochs/iterations and
    at the end of training: after AtomShrinkHook, before validation and
    before CheckpointHook, so the checkpoint holds the statistics that the
    validation used. Under DDP the statistics are averaged over ranks.

    Args:
        num_batches (int): Training batches to use (per rank).
        interval (int): Every ``interval`` epochs (or iterations).
        by_epoch (bool): Count ``interval`` in epochs (else iterations);
            match the validation interval of the train loop.
    """

    # After AtomShrinkHook (HIGH), before CheckpointHook (VERY_LOW).
    priority = 'NORMAL'

    def __init__(self, num_batches=50, interval=1, by_epoch=True):
        if num_batches < 1:
            raise ValueError(f'num_batches must be >= 1, got {num_batches}')
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        self.num_batches = num_batches
        self.interval = interval
        self.by_epoch = by_epoch

    def after_train_epoch(self, runner):
        if self.by_epoch and (self.every_n_epochs(runner, self.interval)
                              or self.is_last_train_epoch(runner)):
            self.recalibrate(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if not self.by_epoch and (
                self.every_n_train_iters(runner, self.interval)
                or self.is_last_train_iter(runner)):
            self.recalibrate(runner)

    def recalibrate(self, runner):
        """Recalibrate the EMA copy (or the live model) now."""
        model = None
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model'):
                model = hook.ema_model.module
        if model is None:
            model = runner.model.module if is_model_wrapper(runner.model) \
                else runner.model
        batches = (b for b, _ in zip(runner.train_dataloader,
                                     range(self.num_batches)))
        count = recalibrate_bn(model, batches)
        buffers = [b for m in model.modules() if isinstance(m, _BatchNorm)
                   for b in (m.running_mean, m.running_var)]
        all_reduce_params(buffers, op='mean')
        runner.logger.info(f'BNRecalibrationHook: BN statistics re-estimated '
                           f'on {count} training batches')
