from .costs import (FLOPsCost, LatencyCost, ParamsCost, penalty_weights,
                    set_penalty_weights)
from .penalty import bn_l1_penalty
from .policy import LinearRampSchedule, MinFLOPsTrigger, ThresholdCriterion
from .shrink import (apply_plan, atom_costs, atom_strengths, find_backbones,
                     plan_from_strengths, plan_shrink, removed_cost,
                     reshape_to_arch, searchable_blocks, shrink_model,
                     shrink_optimizer)

__all__ = ['FLOPsCost', 'LatencyCost', 'LinearRampSchedule', 'MinFLOPsTrigger',
           'ParamsCost', 'set_penalty_weights',
           'ThresholdCriterion', 'apply_plan', 'atom_costs', 'atom_strengths',
           'bn_l1_penalty', 'find_backbones',
           'penalty_weights', 'plan_from_strengths', 'plan_shrink',
           'removed_cost', 'reshape_to_arch', 'searchable_blocks',
           'shrink_model', 'shrink_optimizer']
