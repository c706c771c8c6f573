from .ema import BatchScaledEMA
from .hooks import (AtomShrinkHook, BNL1PenaltyHook, BNRecalibrationHook,
                    recalibrate_bn)
from .optimizers import TFRMSprop
from .schedulers import FractionalStepLR

__all__ = ['AtomShrinkHook', 'BatchScaledEMA', 'BNL1PenaltyHook',
           'BNRecalibrationHook', 'FractionalStepLR', 'TFRMSprop',
           'recalibrate_bn']
