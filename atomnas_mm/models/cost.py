"""Cost models: per-atom penalty weights and FLOPs/params counting.

Convention (ATOMNAS.md section 3): FLOPs are multiply-adds of every Conv2d and
Linear plus ``C*H*W`` for every global average pooling; params are Conv2d and
Linear weights and biases. BN, activations and additions are free.
"""
import torch
import torch.nn as nn


def _out_size(size, stride):
    return (size + stride - 1) // stride


def atom_costs(rows, stem_channels, input_size=224):
    """Raw multiply-adds of one atom, per block and kernel.

    ``f = C_in*H_in*W_in + k*k*H_out*W_out + C_out*H_out*W_out`` (expand at
    input resolution, depthwise and projection at output resolution).

    Args:
        rows (list): Architecture rows with ``repeats == 1``.
        stem_channels (int): Stem output channels.
        input_size (int): Image side.

    Returns:
        list[list[float] | None]: For every row, one cost per kernel size, or
        None for a block without expand conv (not searched).
    """
    size, in_ch, costs = _out_size(input_size, 2), stem_channels, []
    for out, _, stride, kernels, _, has_expand in rows:
        out_size = _out_size(size, stride)
        if has_expand:
            costs.append([float(in_ch * size * size + k * k * out_size ** 2
                                + out * out_size ** 2) for k in kernels])
        else:
            costs.append(None)
        size, in_ch = out_size, out
    return costs


def atom_weights(rows, stem_channels, input_size=224):
    """Normalised per-atom penalty weights ``p = f / f_mean``.

    ``f_mean`` is the mean of ``f`` over all atoms (hidden-channel weighted).

    Returns:
        tuple: (list of per-row Tensors in concatenated hidden order, or None
        for unsearched rows; f_mean).
    """
    costs = atom_costs(rows, stem_channels, input_size)
    total, count = 0.0, 0
    for row, cost in zip(rows, costs):
        if cost is not None:
            total += sum(c * h for c, h in zip(cost, row[4]))
            count += sum(row[4])
    f_mean = total / max(count, 1)
    weights = []
    for row, cost in zip(rows, costs):
        if cost is None:
            weights.append(None)
            continue
        weights.append(torch.cat([
            torch.full((h,), c / f_mean) for c, h in zip(cost, row[4])])
            if sum(row[4]) else torch.zeros(0))
    return weights, f_mean


def count_flops_params(model, input_shape=(1, 3, 224, 224)):
    """Count FLOPs (multiply-adds) and params in the AtomNAS convention.

    Args:
        model (nn.Module): A backbone or an mmpretrain classifier (called
            with ``mode='tensor'``).
        input_shape (tuple): Input tensor shape (batch 1 for the convention).

    Returns:
        tuple[int, int]: FLOPs and params.
    """
    flops = [0]

    def conv_hook(m, inputs, out):
        flops[0] += (m.in_channels // m.groups) * m.kernel_size[0] * \
            m.kernel_size[1] * out.numel()

    def linear_hook(m, inputs, out):
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
            x = torch.zeros(input_shape, device=None if param is None else param.device)
            if hasattr(model, 'data_preprocessor'):
                model(x, mode='tensor')
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return flops[0], params
