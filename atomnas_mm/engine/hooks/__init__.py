from .bn_recal_hook import BNRecalibrationHook, recalibrate_bn
from .memory_format_hook import MemoryFormatHook, to_memory_format
from .penalty_hook import BNL1PenaltyHook
from .shrink_hook import AtomShrinkHook

__all__ = ['AtomShrinkHook', 'BNL1PenaltyHook', 'BNRecalibrationHook',
           'MemoryFormatHook', 'recalibrate_bn', 'to_memory_format']
