"""Inference-only conversion of AtomNAS models (deploy mode).

``deploy_model`` is a pure function: it returns a converted copy of an
eval-mode model and leaves the input untouched. In the copy every BatchNorm
that follows a conv is folded into the conv (stem, blocks, head), and every
:class:`~atomnas_mm.models.blocks.AtomicBlock` becomes its
:meth:`~atomnas_mm.models.blocks.AtomicBlock.deploy_form`: the kernel groups
padded to the largest kernel size and merged into ONE depthwise conv, so the
block runs ``expand -> depthwise -> [SE] -> project`` without split/cat.
Eval outputs are unchanged up to float rounding. The converted model cannot
be trained, shrunk or loaded from AtomNAS checkpoints; convert after loading.
"""
import copy

import torch
from mmcv.cnn import fuse_conv_bn

from .blocks import AtomicBlock, DeployedAtomicBlock, merge_depthwise

__all__ = ['DeployedAtomicBlock', 'deploy_model', 'merge_depthwise']


def deploy_model(model):
    """Convert an eval-mode AtomNAS model (backbone, classifier or a single
    block) for inference; the input model is left unchanged.

    Args:
        model (nn.Module): Model holding :class:`AtomicBlock` s.

    Returns:
        nn.Module: The converted copy, in eval mode.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        fuse_conv_bn(model)
        if isinstance(model, AtomicBlock):
            return model.deploy_form()
        for name, m in list(model.named_modules()):
            if isinstance(m, AtomicBlock):
                parent_name, _, child = name.rpartition('.')
                setattr(model.get_submodule(parent_name), child,
                        m.deploy_form())
    return model
