from .penalty import (bn_l1_penalty, decayed_params, penalised_atoms, rho_at,
                      weight_decay_loss)
from .shrink import (apply_plan, find_backbones, plan_shrink, removed_flops,
                     reshape_to_arch, shrink_block, shrink_model,
                     shrink_optimizer)

__all__ = ['apply_plan', 'bn_l1_penalty', 'decayed_params', 'find_backbones',
           'penalised_atoms', 'plan_shrink', 'removed_flops', 'reshape_to_arch',
           'rho_at', 'shrink_block', 'shrink_model', 'shrink_optimizer',
           'weight_decay_loss']
