"""Parameter schedulers the AtomNAS recipe needs beyond mmengine's."""
from mmengine.optim.scheduler import StepLR

from ..registry import PARAM_SCHEDULERS


@PARAM_SCHEDULERS.register_module()
class FractionalStepLR(StepLR):
    """StepLR whose step may be fractional (e.g. every 2.4 epochs).

    mmengine's StepLR decays when ``last_step % step_size == 0``, which never
    holds for a fractional step converted to iterations (2.4 epochs x 626
    iterations). This one decays whenever ``last_step // step_size``
    increases: a staircase counted from the scheduler's begin, at the real
    epoch length of the run (so it follows the number of GPUs).
    """

    def _get_value(self):
        if self.last_step > 0 and (self.last_step // self.step_size) != (
                (self.last_step - 1) // self.step_size):
            return [group[self.param_name] * self.gamma
                    for group in self.optimizer.param_groups]
        return [group[self.param_name]
                for group in self.optimizer.param_groups]
