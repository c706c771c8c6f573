from .shrink import (apply_plan, find_backbones, plan_shrink, removed_flops,
                     reshape_to_arch, shrink_block, shrink_model,
                     shrink_optimizer)

__all__ = ['apply_plan', 'find_backbones', 'plan_shrink', 'removed_flops',
           'reshape_to_arch', 'shrink_block', 'shrink_model',
           'shrink_optimizer']
