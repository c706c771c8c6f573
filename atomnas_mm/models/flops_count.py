"""FLOPs and params counting in the AtomNAS convention.

FLOPs are multiply-adds of every Conv2d and Linear plus ``C*H*W`` for every
global average pooling; params are Conv2d and Linear weights and biases. BN,
activations and additions are free. The per-atom cost models built on it are
in :mod:`atomnas_mm.search.costs`.
"""
import torch
import torch.nn as nn


def count_flops_params(model, input_shape=(1, 3, 224, 224), sizes=None):
    """Count FLOPs (multiply-adds) and params in the AtomNAS convention.

    Args:
        model (nn.Module): A backbone or an mmpretrain classifier (called
            with ``mode='tensor'``).
        input_shape (tuple): Input tensor shape (batch 1 for the convention).
        sizes (dict, optional): Filled with ``{module: output positions}``
            (``H*W`` of a conv, rows of a linear) of every Conv2d and Linear
            that ran.

    Returns:
        tuple[int, int]: FLOPs and params.
    """
    flops = [0]

    def conv_hook(m, inputs, out):
        if sizes is not None:
            sizes[m] = out.numel() // out.shape[1]
        flops[0] += (m.in_channels // m.groups) * m.kernel_size[0] * \
            m.kernel_size[1] * out.numel()

    def linear_hook(m, inputs, out):
        if sizes is not None:
            sizes[m] = out.numel() // out.shape[-1]
        flops[0] += m.in_features * out.numel()

    def pool_hook(m, inputs, out):
        flops[0] += inputs[0].numel()

    handles = []
    params = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            handles.append(m.register_forward_hook(pool_hook))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            params += sum(p.numel() for p in m.parameters(recurse=False))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            x = torch.zeros(input_shape,
                            device=None if param is None else param.device)
            if hasattr(model, 'data_preprocessor'):
                model(x, mode='tensor')
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return flops[0], params
