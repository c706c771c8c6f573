"""Classification head with dropout before the FC (docs/method.md, "Recipe")."""
import torch.nn as nn
from mmpretrain.models.heads import LinearClsHead

from ..registry import MODELS


@MODELS.register_module()
class DropoutLinearClsHead(LinearClsHead):
    """mmpretrain's LinearClsHead with dropout on the pooled features.

    Args:
        dropout_rate (float): Dropout probability before the FC layer
            (0.2 for AtomNAS-A/B/C and the search, 0.28 for the "+" nets).
        **kwargs: LinearClsHead arguments.
    """

    def __init__(self, dropout_rate=0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= dropout_rate < 1:
            raise ValueError(f'dropout_rate must be in [0, 1), got '
                             f'{dropout_rate}')
        self.dropout = nn.Dropout(dropout_rate)

    def pre_logits(self, feats):
        return self.dropout(super().pre_logits(feats))
