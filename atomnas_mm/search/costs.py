"""Cost models: what an atom costs, and what a backbone costs in total.

One definition of a searchable atom (:attr:`AtomicBlock.searchable`) and of
its cost, used by the penalty weights, the shrink trigger, the logs and the
budget. A cost model is a small registered part (registry
``atomnas_mm.registry.SEARCH``) with two methods:

* ``atom_costs(backbone)``: per block, a Tensor with one cost per atom (None
  for blocks that are not searchable);
* ``total(backbone)``: the backbone's cost now.

FLOPs and params of a block are the sums of its atoms' costs; a model whose
block cost is not (latency) also defines ``block_cost_fns(backbone)``, per
block a function of its ``[(kernel, width), ...]`` (see
:func:`block_cost_fns`).

Counting convention (docs/method.md, "Counting"): FLOPs are multiply-adds of
every Conv2d and Linear plus ``C*H*W`` for every global average pooling;
params are Conv2d and Linear weights and biases. BN, activations and
additions are free.
"""
import torch
import torch.nn as nn

from ..models.cost import count_flops_params
from ..registry import SEARCH


def out_size(size, stride):
    """Spatial size after a ``k // 2``-padded conv with ``stride``."""
    return (size + stride - 1) // stride


def _per_atom(block, cost_of_kernel):
    """One cost per atom from a ``kernel_size -> cost`` function."""
    return torch.cat([torch.full((h, ), float(cost_of_kernel(k)))
                      for k, h in block.atom_groups()])


@SEARCH.register_module()
class FLOPsCost:
    """Multiply-adds at batch 1 and ``input_size`` px.

    One atom of a block with input ``C_in x H x H`` and output
    ``C_out x H' x H'`` costs ``C_in*H^2`` (expand row) ``+ k^2*H'^2``
    (depthwise filter) ``+ C_out*H'^2`` (projection column), plus with SE
    ``H'^2`` (pooling) ``+ 2*C_se`` (squeeze column, excite row).

    Args:
        input_size (int): Image side.
    """

    def __init__(self, input_size=224):
        if (not isinstance(input_size, int) or isinstance(input_size, bool)
                or input_size <= 0):
            raise ValueError(f'input_size: must be a positive int, got '
                             f'{input_size!r}')
        self.input_size = input_size

    def atom_costs(self, backbone):
        costs = []
        for block, size in zip(backbone.blocks(),
                               backbone.block_input_sizes(self.input_size)):
            if not block.searchable:
                costs.append(None)
                continue
            out = out_size(size, block.stride) ** 2
            se = out + 2 * block.se_channels if block.se is not None else 0
            costs.append(_per_atom(block, lambda k: (
                block.in_channels * size * size + k * k * out
                + block.out_channels * out + se)))
        return costs

    def total(self, backbone):
        flops, _ = count_flops_params(backbone, (
            1, backbone.in_channels, self.input_size, self.input_size))
        return float(flops)


@SEARCH.register_module()
class ParamsCost:
    """Conv/Linear weights and biases.

    One atom costs ``C_in`` (expand row) ``+ k^2`` (depthwise filter)
    ``+ C_out`` (projection column), plus with SE ``2*C_se + 1``.
    """

    def atom_costs(self, backbone):
        costs = []
        for block in backbone.blocks():
            if not block.searchable:
                costs.append(None)
                continue
            se = 2 * block.se_channels + 1 if block.se is not None else 0
            costs.append(_per_atom(block, lambda k: (
                block.in_channels + k * k + block.out_channels + se)))
        return costs

    def total(self, backbone):
        return float(sum(p.numel() for m in backbone.modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear))
                         for p in m.parameters(recurse=False)))


def block_cost_fns(backbone, cost):
    """Per block, ``groups -> cost``: the block's cost with the kernel widths
    ``[(kernel, width), ...]`` (None for blocks that are not searchable).

    The cost model's own ``block_cost_fns`` when it has one, else the sum of
    the atom costs (exact for FLOPs and params).
    """
    own = getattr(cost, 'block_cost_fns', None)
    if own is not None:
        return own(backbone)
    fns = []
    for block, costs in zip(backbone.blocks(), cost.atom_costs(backbone)):
        if costs is None:
            fns.append(None)
            continue
        per_kernel, start = {}, 0
        for k, h in block.atom_groups():
            if h:
                per_kernel[k] = costs[start].item()
            start += h
        fns.append(lambda groups, per_kernel=per_kernel: sum(
            h * per_kernel[k] for k, h in groups if h))
    return fns


def penalty_weights(backbone, cost):
    """Atom costs normalised by their mean: the penalty weights ``p``.

    Args:
        backbone (AtomNAS): The backbone (normally the initial supernet).
        cost: A cost model.

    Returns:
        tuple[list[Tensor | None], float]: Per block the weights in atom
        order (None when not searchable), and the mean cost.
    """
    costs = cost.atom_costs(backbone)
    flat = [c for c in costs if c is not None and len(c)]
    mean = torch.cat(flat).mean().item() if flat else 1.0
    return [None if c is None else c / mean for c in costs], mean


def set_penalty_weights(backbone, cost):
    """Store :func:`penalty_weights` in the blocks' ``atom_cost`` buffers."""
    weights, _ = penalty_weights(backbone, cost)
    for block, weight in zip(backbone.blocks(), weights):
        if weight is not None:
            block.atom_cost.copy_(weight)


TABLE_VERSION = 2


@SEARCH.register_module()
class LatencyCost:
    """Latency (ms) from a table measured on the deployment device.

    The table (``tools/analysis_tools/atom_latency_table.py``) holds, for
    every block of the supernet and each of its kernel sizes ``k``, the
    measured latency ``L_k(w)`` of the block with one group of kernel ``k``
    and width ``w``, for a few ``w`` up to the block's total width, plus the
    stem and head. In eval mode (and after ``deploy_model``) a block runs its
    kernel groups as one depthwise conv of its largest kernel, zero-padded:
    a block with widths ``h`` costs ``L_kmax(sum h)``, interpolated linearly
    between the samples (``base``, the curves' extrapolation to width 0,
    below the first); an emptied block costs its measured identity time. An
    atom costs the mean slope of its kernel's curve, ``(L_k(max) - base) /
    max`` (the penalty weight).

    Args:
        table (str | dict): The JSON table or its path.
    """

    def __init__(self, table):
        if isinstance(table, str):
            import json
            try:
                with open(table) as f:
                    table = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f'table: cannot read the latency table '
                                 f'{table}: {e}') from None
        if not isinstance(table, dict) or 'blocks' not in table:
            raise ValueError('table: not a latency table (no "blocks")')
        if table.get('version') != TABLE_VERSION:
            raise ValueError(
                f'table: version {table.get("version")!r}, expected '
                f'{TABLE_VERSION} (curves up to the block width, one group '
                'of the largest kernel); measure it again with '
                'tools/analysis_tools/atom_latency_table.py')
        self.table = _monotone(table)

    def _entries(self, backbone):
        entries = self.table['blocks']
        blocks = backbone.blocks()
        if len(entries) != len(blocks):
            raise ValueError(f'table: {len(entries)} blocks, the backbone has '
                             f'{len(blocks)}; measure a table for this net')
        for i, (entry, block) in enumerate(zip(entries, blocks)):
            geometry = (block.in_channels, block.out_channels, block.stride)
            if tuple(entry['geometry']) != geometry:
                raise ValueError(f'table: block {i} was measured with (in, '
                                 f'out, stride) {tuple(entry["geometry"])}, '
                                 f'the backbone has {geometry}')
        return zip(entries, blocks)

    @staticmethod
    def _curve(entry, kernel):
        curve = entry['kernels'].get(str(kernel))
        if curve is None:
            raise ValueError(f'table: no samples for kernel {kernel} in '
                             f'block {entry["index"]}')
        return curve['widths'], curve['ms']

    @classmethod
    def block_ms(cls, entry, groups):
        """Predicted latency of a block with ``[(kernel, width), ...]``."""
        groups = [(k, h) for k, h in groups if h > 0]
        if not groups:
            return entry['empty_ms']
        widths, ms = cls._curve(entry, max(k for k, _ in groups))
        return _interp(sum(h for _, h in groups), [0] + widths,
                       [entry['base_ms']] + ms)

    def atom_costs(self, backbone):
        costs = []
        for entry, block in self._entries(backbone):
            if not block.searchable:
                costs.append(None)
                continue

            def slope(k, entry=entry):
                widths, ms = self._curve(entry, k)
                return max(ms[-1] - entry['base_ms'], 0.0) / widths[-1]

            costs.append(_per_atom(block, slope))
        return costs

    def block_cost_fns(self, backbone):
        return [(lambda groups, entry=entry: self.block_ms(entry, groups))
                if block.searchable else None
                for entry, block in self._entries(backbone)]

    def total(self, backbone):
        return self.table['stem_ms'] + self.table['head_ms'] + sum(
            self.block_ms(entry, block.atom_groups())
            for entry, block in self._entries(backbone))


def _monotone(table):
    """A copy of ``table`` whose curves never fall with width (timing noise
    removed by a running maximum) and whose bases are at most their
    narrowest sample, so that fewer atoms never predict more latency."""
    import copy
    table = copy.deepcopy(table)
    for entry in table['blocks']:
        lowest = min([c['ms'][0] for c in entry['kernels'].values()] +
                     [entry['base_ms']])
        entry['base_ms'] = lowest
        for curve in entry['kernels'].values():
            running = []
            for ms in curve['ms']:
                running.append(max(ms, running[-1] if running else lowest))
            curve['ms'] = running
    return table


def _interp(x, xs, ys):
    """Piecewise-linear interpolation (linear extrapolation past the end)."""
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1]
