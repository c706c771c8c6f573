from .bn_recal_hook import BNRecalibrationHook, recalibrate_bn
from .penalty_hook import BNL1PenaltyHook
from .shrink_hook import AtomShrinkHook

__all__ = ['AtomShrinkHook', 'BNL1PenaltyHook', 'BNRecalibrationHook',
           'recalibrate_bn']
