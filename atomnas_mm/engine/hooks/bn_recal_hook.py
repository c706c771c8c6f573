"""Re-estimate BatchNorm statistics before validation (on the EMA weights)."""
import torch
from mmengine.dist import all_reduce_params
from mmengine.hooks import Hook
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
    """Re-estimate BN statistics on training batches before validation.

    Runs after EMAHook has swapped the averaged weights in, so the evaluated
    (EMA) weights get statistics of their own, as the AtomNAS reference
    evaluated. Under DDP the statistics are averaged over ranks.

    Args:
        num_batches (int): Training batches to use (per rank).
        on_test (bool): Also recalibrate before the test loop (needs a
            ``train_dataloader`` in the config).
    """

    # After EMAHook (NORMAL) has swapped in the EMA weights.
    priority = 'BELOW_NORMAL'

    def __init__(self, num_batches=50, on_test=False):
        if num_batches < 1:
            raise ValueError(f'num_batches must be >= 1, got {num_batches}')
        self.num_batches = num_batches
        self.on_test = on_test

    def before_val_epoch(self, runner):
        self._recalibrate(runner)

    def before_test_epoch(self, runner):
        if self.on_test:
            self._recalibrate(runner)

    def _recalibrate(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        loader = runner.train_dataloader
        batches = (b for b, _ in zip(loader, range(self.num_batches)))
        count = recalibrate_bn(model, batches)
        buffers = [b for m in model.modules() if isinstance(m, _BatchNorm)
                   for b in (m.running_mean, m.running_var)]
        all_reduce_params(buffers, op='mean')
        runner.logger.info(f'BNRecalibrationHook: BN statistics re-estimated '
                           f'on {count} training batches')
