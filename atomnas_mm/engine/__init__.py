from .ema import BatchScaledEMA
from .hooks import (AtomShrinkHook, BNL1PenaltyHook, BNRecalibrationHook,
                    MemoryFormatHook, recalibrate_bn)
from .optimizers import TFRMSprop
from .schedulers import FractionalStepLR

__all__ = ['AtomShrinkHook', 'BatchScaledEMA', 'BNL1PenaltyHook',
           'BNRecalibrationHook', 'FractionalStepLR', 'MemoryFormatHook',
           'TFRMSprop', 'recalibrate_bn']
