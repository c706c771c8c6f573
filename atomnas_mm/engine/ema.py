"""EMA whose decay follows the real total batch (any number of GPUs)."""
from mmengine.dist import get_world_size
from mmengine.model import MomentumAnnealingEMA

from ..registry import MODELS


@MODELS.register_module()
class BatchScaledEMA(MomentumAnnealingEMA):
    """AtomNAS EMA: decay ``decay ** (total_batch / images_per_decay)``.

    The reference decays by 0.9999 per 4096 images, with the warm-up
    ``min(decay, (1 + t) / (10 + t))`` (``gamma=9`` in mmengine's
    MomentumAnnealingEMA). ``total_batch = batch_size * world size`` is
    taken at build time, so the same config is right on 8 or 32 GPUs.

    Args:
        model (nn.Module): Model to average.
        batch_size (int): Images per GPU per iteration.
        decay (float): Decay per ``images_per_decay`` images.
        images_per_decay (int): Images the decay refers to.
        gamma (int): Warm-up constant (see MomentumAnnealingEMA).
        **kwargs: ``interval``, ``device``, ``update_buffers``.
    """

    def __init__(self, model, batch_size, decay=0.9999, images_per_decay=4096,
                 gamma=9, **kwargs):
        if not 0 < decay < 1:
            raise ValueError(f'decay must be in (0, 1), got {decay}')
        total_batch = batch_size * get_world_size()
        momentum = 1 - decay ** (total_batch / images_per_decay)
        super().__init__(model, momentum=momentum, gamma=gamma, **kwargs)
        self.total_batch = total_batch
