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
:func:`block_cost_fns`). The channel units of stock models are costed per
conv / linear layer: ``layer_positions(root)`` (what a layer's cost needs
to know of it) and ``layer_cost(layer, c_in, c_out, groups, positions)``
(:func:`width_cost`); FLOPs, params and a per-layer latency table
(:class:`LayerLatencyCost`) have them.

Counting convention (docs/method.md, "Counting"): FLOPs are multiply-adds of
every Conv2d and Linear plus ``C*H*W`` for every global average pooling;
params are Conv2d and Linear weights and biases. BN, activations and
additions are free.
"""
import torch
import torch.nn as nn

from ..models.flops_count import count_flops_params
from ..registry import SEARCH
from .units import AtomUnit, SearchRefused


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

    def input_shape(self, backbone):
        """``(1, C, input_size, input_size)``, C the input channels of the
        backbone's first conv (its stem)."""
        conv = next((m for m in backbone.modules()
                     if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise SearchRefused(f'{type(backbone).__name__} has no Conv2d: '
                                'no FLOPs to count')
        return (1, conv.in_channels, self.input_size, self.input_size)

    def total(self, backbone):
        flops, _ = count_flops_params(backbone, self.input_shape(backbone))
        return float(flops)

    def layer_positions(self, backbone):
        """``{layer: output positions}`` of every Conv2d and Linear."""
        sizes = {}
        count_flops_params(backbone, self.input_shape(backbone), sizes)
        return sizes

    @staticmethod
    def layer_cost(layer, c_in, c_out, groups, positions):
        """Multiply-adds of a conv / linear with these widths."""
        if isinstance(layer, nn.Linear):
            return positions * c_in * c_out
        kh, kw = layer.kernel_size
        return positions * kh * kw * (c_in // groups) * c_out

    @staticmethod
    def pool_cost(positions, channels):
        """A global average pooling of ``channels`` maps of ``positions``
        (an SE's squeeze)."""
        return positions * channels


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

    @staticmethod
    def layer_positions(backbone):
        return {}

    @staticmethod
    def layer_cost(layer, c_in, c_out, groups, positions=None):
        """Weights and bias of a conv / linear with these widths."""
        bias = c_out if layer.bias is not None else 0
        if isinstance(layer, nn.Linear):
            return c_in * c_out + bias
        kh, kw = layer.kernel_size
        return kh * kw * (c_in // groups) * c_out + bias


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
    """Store :func:`penalty_weights` in the blocks' ``penalty_weight``
    buffers."""
    weights, _ = penalty_weights(backbone, cost)
    for block, weight in zip(backbone.blocks(), weights):
        if weight is not None:
            block.penalty_weight.copy_(weight)


TABLE_VERSION = 2
#: runtimes a latency table can describe; how a block's kernel groups run
RUNTIMES = ('torch', 'onnxruntime')
FORMS = ('merged', 'split', 'export')


@SEARCH.register_module()
class LatencyCost:
    """Latency (ms) from a table measured on the deployment device.

    The table (``tools/analysis_tools/atom_latency_table.py``) holds, for
    every block of the supernet and each of its kernel sizes ``k``, the
    measured latency ``L_k(w)`` of the block with one group of kernel ``k``
    and width ``w``, for a few ``w``, plus the stem and head, in one runtime
    (``table['runtime']``: ``torch`` or ``onnxruntime``). How a block runs
    its kernel groups is the table's ``form``:

    * ``merged`` (PyTorch's eval mode, ``deploy_model``): one zero-padded
      depthwise conv of its largest kernel; a block with widths ``h`` costs
      ``L_kmax(sum h)``;
    * ``split`` (the block traced as built): one conv per group;
      ``base + sum_k (L_k(h_k) - base) + group_ms * (groups - 1)``, where
      ``group_ms`` (measured) is the Split/Concat and extra conv of a group;
    * ``export`` (what ``pytorch2onnx.py`` writes,
      :func:`~atomnas_mm.models.deploy_onnx.onnx_model`): the groups gathered
      into parts (the export's own :func:`choose_parts` with the table's
      ``merge``; ``merged``, its default: one part), each part its own
      expand and depthwise conv padded to a multiple of ``align``; costed
      like ``split`` with parts for groups (a part's curve: its largest
      kernel at its padded width).

    With ``align`` > 1 the deployed form pads every group to a multiple of
    it: widths are rounded up first. Curves are interpolated linearly between
    the samples (``base``, their extrapolation to width 0, below the first);
    an emptied block costs its measured identity time (0 for a residual
    block). An atom of kernel group ``g`` costs ``(L(h) - L(h without
    g)) / h_g``, its share of what emptying the group saves; in a residual
    block also an equal share of the rest (the block's fixed cost), so the
    atoms of a block add up to what emptying it saves: the penalty weights
    and the live cost see that emptying a group or a block pays (at small
    inputs fixed costs are most of a block's latency).

    Args:
        table (str | dict): The JSON table or its path.
    """

    def __init__(self, table):
        table, self.source = load_table(table)
        if table.get('kind') == 'layers':
            raise ValueError(f'table: {self.source} is a per-layer table '
                             '(kind "layers", a stock model\'s channel '
                             'units): its cost model is LayerLatencyCost')
        if 'blocks' not in table:
            raise ValueError('table: not a latency table (no "blocks")')
        if table.get('version') != TABLE_VERSION:
            raise ValueError(
                f'table: version {table.get("version")!r}, expected '
                f'{TABLE_VERSION} (curves up to the block width, one group '
                'of the largest kernel); measure it again with '
                'tools/analysis_tools/atom_latency_table.py')
        from .latency import check_table
        check_table(table, self.source)  # finite, >= 0: names the field
        self.table = _monotone(table)
        self.runtime = table.get('runtime', 'torch')
        self.form = table.get('form', 'merged')
        self.align = table.get('align', 1)
        self.quantum = table.get('quantum', 1)
        self.merge = table.get('merge', 'merged')

    def _entries(self, backbone):
        entries = self.table['blocks']
        blocks = backbone.blocks()
        if len(entries) != len(blocks):
            raise ValueError(f'table: {len(entries)} blocks in '
                             f'{self.source}, the backbone has '
                             f'{len(blocks)}; measure a table for this net')
        for i, (entry, block) in enumerate(zip(entries, blocks)):
            geometry = (block.in_channels, block.out_channels, block.stride)
            if tuple(entry['geometry']) != geometry:
                raise ValueError(f'table: block {i} was measured with (in, '
                                 f'out, stride) {tuple(entry["geometry"])}, '
                                 f'the backbone has {geometry} (in '
                                 f'{self.source})')
            se = block.se_channels or 0
            if 'se_channels' in entry and bool(entry['se_channels']) != \
                    bool(se):
                raise ValueError(f'table: block {i} was measured with '
                                 f'se_channels={entry["se_channels"]}, the '
                                 f'backbone has {se} (in {self.source})')
        return zip(entries, blocks)

    @staticmethod
    def _curve(entry, kernel, width=None, quantum=1):
        """The samples of ``kernel``'s curve (those of the unaligned widths
        when ``width`` is no multiple of ``quantum`` and the table has
        them)."""
        curve = entry['kernels'].get(str(kernel))
        if curve is None:
            raise ValueError(f'table: no samples for kernel {kernel} in '
                             f'block {entry["index"]}')
        if width is not None and width % quantum and 'off_ms' in curve:
            return curve['off_widths'], curve['off_ms']
        return curve['widths'], curve['ms']

    @classmethod
    def _width_ms(cls, entry, kernel, width, quantum):
        widths, ms = cls._curve(entry, kernel, width, quantum)
        return _interp(width, [0] + widths, [entry['base_ms']] + ms)

    @classmethod
    def block_ms(cls, entry, groups, form='merged', align=1, quantum=1,
                 merge='merged'):
        """Predicted latency of a block with ``[(kernel, width), ...]``
        run in ``form``, its groups (``export``: parts) padded to multiples
        of ``align``."""
        groups = [(k, h) for k, h in groups if h > 0]
        if not groups:
            return entry['empty_ms']
        if form == 'export':
            groups = export_parts(entry, groups, align, merge)
        groups = [(k, -(-h // align) * align) for k, h in groups]
        if form == 'merged':
            return cls._width_ms(entry, max(k for k, _ in groups),
                                 sum(h for _, h in groups), quantum)
        base = entry['base_ms']
        out = base + entry.get('group_ms', 0.0) * (len(groups) - 1)
        for k, h in groups:
            out += cls._width_ms(entry, k, h, quantum) - base
        return out

    def _block_ms(self, entry, groups):
        return self.block_ms(entry, groups, self.form, self.align,
                             self.quantum, self.merge)

    def atom_costs(self, backbone):
        costs = []
        for entry, block in self._entries(backbone):
            if not block.searchable:
                costs.append(None)
                continue
            # An atom costs its group's share of what emptying the group
            # saves (a group's own conv, Split/Concat input or part goes
            # with its last atom); in a residual block also an equal share
            # of the rest, so the atoms add up to what emptying it saves.
            groups = block.atom_groups()
            full = self._block_ms(entry, groups)
            per = []
            for i, (k, h) in enumerate(groups):
                rest = groups[:i] + groups[i + 1:]
                saving = max(full - self._block_ms(entry, rest), 0.0)
                per.append(torch.full((h, ), saving / max(h, 1)))
            per = torch.cat(per)
            if block.use_res and per.numel():
                fixed = full - entry['empty_ms'] - per.sum().item()
                per += max(fixed, 0.0) / per.numel()
            costs.append(per)
        return costs

    def block_cost_fns(self, backbone):
        return [(lambda groups, entry=entry: self._block_ms(entry, groups))
                if block.searchable else None
                for entry, block in self._entries(backbone)]

    def total(self, backbone):
        return self.table['stem_ms'] + self.table['head_ms'] + sum(
            self._block_ms(entry, block.atom_groups())
            for entry, block in self._entries(backbone))


class _GroupsView:
    """What :func:`~atomnas_mm.models.deploy_onnx.choose_parts` reads of
    a block, from a table entry and ``[(kernel, width), ...]``."""

    class _Conv:
        def __init__(self, k, h, stride):
            self.kernel_size, self.out_channels = (k, k), h
            self.stride = (stride, stride)

    def __init__(self, entry, groups):
        self.in_channels, self.out_channels, stride = entry['geometry']
        self.expand = True
        self.dw = {str(i): type('DW', (), dict(conv=self._Conv(k, h, stride)))
                   for i, (k, h) in enumerate(groups)}


def export_parts(entry, groups, align, merge='merged'):
    """``[(kernel, width), ...]`` of the parts the ONNX export makes of a
    block with these kernel groups: the export's own choice
    (:func:`~atomnas_mm.models.deploy_onnx.choose_parts` at the block's
    input size), a part's kernel its largest, its width the groups' sum."""
    from ..models.deploy_onnx import choose_parts
    if len(groups) < 2:
        return list(groups)
    parts = choose_parts(_GroupsView(entry, groups), merge, align,
                         float(entry.get('input_size', 1)) ** 2)
    return [(max(groups[g][0] for g in part),
             sum(groups[g][1] for g in part)) for part in parts]


def load_table(table):
    """``(table dict, how to name it)`` from a latency table or its JSON
    path."""
    source = table if isinstance(table, str) else 'the table given as a dict'
    if isinstance(table, str):
        import json
        try:
            with open(table) as f:
                table = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'table: cannot read the latency table '
                             f'{table}: {e}') from None
    if not isinstance(table, dict):
        raise ValueError(f'table: {source} is not a latency table (a JSON '
                         f'object), got {type(table).__name__}')
    return table, source


def latency_cost(table):
    """The cost model of a latency table: :class:`LayerLatencyCost` for a
    per-layer table (``kind: "layers"``, a stock model's channel units),
    else :class:`LatencyCost` (per AtomNAS block)."""
    layers = load_table(table)[0].get('kind') == 'layers'
    return (LayerLatencyCost if layers else LatencyCost)(table)


def _running_max(values, start=float('-inf')):
    """``values`` with every element raised to the largest before it (and
    to ``start``): timing noise removed from a curve that cannot fall."""
    out = []
    for value in values:
        out.append(max(value, out[-1] if out else start))
    return out


def _monotone(table):
    """A copy of ``table`` whose curves never fall with width (timing noise
    removed by a running maximum) and whose bases are at most their
    narrowest sample, so that fewer atoms never predict more latency."""
    import copy
    table = copy.deepcopy(table)
    for entry in table['blocks']:
        lowest = min([c['ms'][0] for c in entry['kernels'].values()] +
                     [c['off_ms'][0] for c in entry['kernels'].values()
                      if c.get('off_ms')] + [entry['base_ms']])
        entry['base_ms'] = lowest
        for curve in entry['kernels'].values():
            for key in ('ms', 'off_ms'):
                if key in curve:
                    curve[key] = _running_max(curve[key], lowest)
    return table


def _interp(x, xs, ys):
    """Piecewise-linear interpolation (linear extrapolation past the end)."""
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1]


LAYER_TABLE_VERSION = 1


def layer_geometry(layer):
    """What a per-layer latency table records of a Conv2d / Linear: its
    type, channels, kernel, stride and groups."""
    if isinstance(layer, nn.Linear):
        return dict(type='Linear', in_channels=layer.in_features,
                    out_channels=layer.out_features)
    return dict(type='Conv2d', in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kernel_size=list(layer.kernel_size),
                stride=list(layer.stride), groups=layer.groups)


def is_depthwise(layer):
    """A depthwise conv: one input and one output channel per group (its
    channels follow one unit)."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and \
        layer.groups == layer.in_channels == layer.out_channels


@SEARCH.register_module()
class LayerLatencyCost:
    """Latency (ms) of a stock model searched by channel units, from a
    per-layer table measured on the deployment device.

    The table (``tools/analysis_tools/atom_latency_table.py`` on a config
    without an AtomNAS backbone; ``kind: "layers"``) holds, for every
    Conv2d / Linear whose input or output channels are a channel unit's
    (the layers :func:`width_cost` costs), its latency alone (BN folded
    into it, as deployed) at a grid of input x output widths: both axes
    when both are units', one when one is (a depthwise conv: its channels),
    at its input resolution and batch in the model. ``fixed_ms`` is the
    whole counted module (:func:`search_root`) measured at full width less
    its layers' latencies: what no width changes (BN and activations as
    the runtime runs them, additions, pooling, layers of no unit). A model
    costs ``fixed_ms`` plus every layer's latency at its widths,
    interpolated bilinearly between the samples (a conv's time is about
    ``a + b * c_in * c_out``; linearly past the last sample, never below
    0). The samples are made monotone (a running maximum along both axes):
    fewer channels never predict more latency.

    Args:
        table (str | dict): The JSON table or its path.
    """

    def __init__(self, table):
        table, self.source = load_table(table)
        if table.get('kind') != 'layers':
            raise ValueError(f'table: {self.source} is not a per-layer table '
                             '(kind "layers"); a per-block table of an '
                             'AtomNAS backbone is costed by LatencyCost')
        if table.get('version') != LAYER_TABLE_VERSION:
            raise ValueError(
                f'table: version {table.get("version")!r} in {self.source}, '
                f'expected {LAYER_TABLE_VERSION}; measure it again with '
                'tools/analysis_tools/atom_latency_table.py')
        from .latency import check_layer_table
        check_layer_table(table, self.source)
        import copy
        self.table = copy.deepcopy(table)
        for entry in self.table['layers']:
            rows = [_running_max(row) for row in entry['ms']]
            columns = [_running_max(col) for col in zip(*rows)]
            entry['ms'] = [list(row) for row in zip(*columns)]
        self.entries = {e['name']: e for e in self.table['layers']}
        self.runtime = self.table.get('runtime', 'torch')

    def layer_positions(self, root):
        """``{layer: (name, table entry or None)}`` of every Conv2d and
        Linear of ``root``; every layer of the table must be in ``root``
        with its geometry (channels at most the measured ones along a
        sampled axis, as measured along a fixed one).

        Raises:
            ValueError: Naming the first layer that does not match.
        """
        modules = dict(root.named_modules())
        for name, entry in self.entries.items():
            layer = modules.get(name)
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                raise ValueError(
                    f'table: {self.source} has layer {name!r}, which '
                    f'{type(root).__name__} has not (as a Conv2d / Linear): '
                    'measured for another model; measure its table with '
                    'tools/analysis_tools/atom_latency_table.py')
            self._check_geometry(name, entry, layer)
        return {layer: (name, self.entries.get(name))
                for name, layer in modules.items()
                if isinstance(layer, (nn.Conv2d, nn.Linear))}

    def _check_geometry(self, name, entry, layer):
        have = layer_geometry(layer)
        measured = {k: entry.get(k) for k in have if k not in (
            'in_channels', 'out_channels', 'groups')}
        same = all(have[k] == v for k, v in measured.items())
        if entry['depthwise']:
            # (at one channel a depthwise conv has one group)
            same = same and have['groups'] == have['in_channels'] == \
                have['out_channels'] <= entry['out_channels']
        else:
            same = same and have.get('groups', 1) == entry.get('groups', 1)
            for key, widths in (('in_channels', entry['in_widths']),
                                ('out_channels', entry['out_widths'])):
                same = same and (have[key] <= widths[-1] if len(widths) > 1
                                 else have[key] == widths[0])
        if not same:
            raise ValueError(
                f'table: layer {name!r} was measured as '
                f'{self.describe(entry)}, the model has {have} (in '
                f'{self.source}); measure a table for this model')

    @staticmethod
    def describe(entry):
        """A table entry's geometry and sampled widths, for messages."""
        return {k: entry[k] for k in ('type', 'in_channels', 'out_channels',
                                      'kernel_size', 'stride', 'groups',
                                      'in_widths', 'out_widths')
                if k in entry}

    def layer_cost(self, layer, c_in, c_out, groups, positions):
        """The latency of ``layer`` with ``c_in`` / ``c_out`` channels
        (a depthwise conv: ``c_out``), ``positions`` its
        :meth:`layer_positions` entry."""
        name, entry = positions
        if entry is None:
            raise ValueError(
                f'table: {self.source} has no layer {name!r}, whose channels '
                "are a unit's: measured before this model's units were "
                'found as now; measure the table again with '
                'tools/analysis_tools/atom_latency_table.py')
        if entry['depthwise']:
            return self.grid_ms(entry, entry['in_widths'][0], c_out)
        for width, widths, axis in ((c_in, entry['in_widths'], 'input'),
                                    (c_out, entry['out_widths'], 'output')):
            if len(widths) == 1 and width != widths[0]:
                raise ValueError(
                    f'table: layer {name!r} was measured at {widths[0]} '
                    f'{axis} channels only (they were no unit\'s), asked for '
                    f'{width} (in {self.source}); measure the table again '
                    'with tools/analysis_tools/atom_latency_table.py')
        return self.grid_ms(entry, c_in, c_out)

    @staticmethod
    def grid_ms(entry, c_in, c_out):
        """Bilinear interpolation of ``entry``'s samples (at least 0)."""
        rows = [_interp(c_out, entry['out_widths'], row)
                for row in entry['ms']]
        return max(0.0, _interp(c_in, entry['in_widths'], rows))

    def atom_costs(self, backbone):
        """Refused: an AtomNAS backbone's blocks need a per-block table."""
        raise SearchRefused(
            f'{type(self).__name__}: costs the layers of channel units only '
            f'({self.source} is a per-layer table); the AtomNAS blocks of '
            f'{type(backbone).__name__} need a per-block latency table '
            '(LatencyCost: atom_latency_table.py on the AtomNAS config)')

    def total(self, root):
        positions = self.layer_positions(root)
        return self.table['fixed_ms'] + sum(
            self.layer_cost(layer, *layer_channels(layer), None, where)
            for layer, where in positions.items() if where[1] is not None)


def layer_channels(layer):
    """``(input, output)`` channels of a Conv2d / Linear."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


# -- the cost of a searched model as a function of its unit widths ----------
class WidthCost:
    """The cost of the searched part of a model as a function of the widths
    of its units, exact, for costing removals one channel at a time (the
    budget's cap).

    The cost is ``fixed + sum(terms)``; a term is a function of the width
    state ``{unit name: [width per group]}`` that depends on the units it
    names: an AtomNAS block's cost (its kernel groups), or one conv / linear
    layer whose input or output channels are a unit's (a layer between two
    units, e.g. a ResNet bottleneck's conv2, depends on both).

    Args:
        total (float): The cost now.
        units (dict): ``{name: unit}``.
        terms (list[tuple[tuple[str], callable]]): ``(unit names,
            state -> cost)``.
    """

    def __init__(self, total, units, terms):
        self.units = units
        self.state = {name: list(unit.widths()) for name, unit in
                      units.items()}
        self.terms_of = {name: [] for name in units}
        for names, fn in terms:
            for name in names:
                self.terms_of[name].append(fn)
        now = sum(fn(self.state) for _, fn in terms)
        self.fixed = total - now
        self._terms = [fn for _, fn in terms]
        self.total = total

    def at(self, state):
        """The cost with the widths ``state``."""
        full = dict(self.state, **state)
        return self.fixed + sum(fn(full) for fn in self._terms)

    def removal(self, name, group, count=1):
        """The cost change of removing ``count`` channels of ``group`` of
        unit ``name`` from the current state (<= 0)."""
        trial = dict(self.state)
        trial[name] = list(trial[name])
        trial[name][group] -= count
        return sum(fn(trial) - fn(self.state) for fn in self.terms_of[name])

    def remove(self, name, group, count=1):
        """Commit :meth:`removal`; returns the new total."""
        self.total += self.removal(name, group, count)
        self.state[name] = list(self.state[name])
        self.state[name][group] -= count
        return self.total

    def smallest(self, round_to=1):
        """The cost with every unit at its minimum width (rounded up to a
        multiple of ``round_to``, at most its width now), the cheapest
        channels kept."""
        state = {}
        for name, unit in self.units.items():
            widths = [0] * len(self.state[name])
            if unit.min_width:
                per = [-self.removal(name, g) if self.state[name][g] else
                       float('inf') for g in range(len(widths))]
                g = per.index(min(per))
                widths[g] = min(self.state[name][g], -(-unit.min_width //
                                                      round_to) * round_to)
            state[name] = widths
        return self.at(state)


def search_root(model):
    """The module a budget is counted on: ``model.backbone`` when there is
    one (classifiers, detectors), else ``model``."""
    backbone = getattr(model, 'backbone', None)
    return backbone if isinstance(backbone, nn.Module) else model


def unit_layers(model, units):
    """The Conv2d / Linear layers of ``model`` (unwrapped) that channel
    ``units`` (no AtomNAS atoms) resize, inside the counted module
    (:func:`search_root`): ``[(layer, src, dst, depthwise)]``, ``src`` /
    ``dst`` the name of the unit its input / output channels are (or None),
    a depthwise conv following its unit.

    Raises:
        SearchRefused: A layer of a unit outside the counted module (but a
            reader: its input is not counted).
    """
    root = search_root(model)
    inside = {id(m) for m in root.modules()}
    layers = {}  # id -> [layer, in unit, out unit, depthwise]
    for name, unit in units.items():
        for layer in unit.producers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                entry = layers.setdefault(id(layer),
                                          [layer, None, None, False])
                entry[2] = name
                entry[3] = isinstance(layer, nn.Conv2d) and \
                    layer.groups > 1 and layer.groups == layer.in_channels
        readers = {id(layer) for layer, _ in unit.consumers}
        for layer, _ in unit.consumers:
            if id(layer) in inside:  # a reader outside is not counted
                layers.setdefault(id(layer),
                                  [layer, None, None, False])[1] = name
        for layer in unit.modules():
            if id(layer) not in inside and id(layer) not in readers:
                raise SearchRefused(
                    f'{name}: a layer of this unit is outside the counted '
                    f'module {type(root).__name__}')
    return [tuple(entry) for entry in layers.values()]


def width_cost(model, cost, units, total):
    """:class:`WidthCost` of ``units`` of ``model`` (unwrapped) by ``cost``.

    Args:
        total (float): The model's cost now (``backbone_cost``).

    Raises:
        SearchRefused: A cost without layer costs (a per-block latency
            table) for units that are not AtomNAS atoms, a per-layer table
            for AtomNAS atoms, or a unit outside the counted module.
    """
    terms, fns = [], {}
    atom_units = {n: u for n, u in units.items() if isinstance(u, AtomUnit)}
    if atom_units:
        from .shrink import find_backbones
        for backbone in find_backbones(model).values():
            for block, fn in zip(backbone.blocks(),
                                 block_cost_fns(backbone, cost)):
                fns[id(block)] = fn
        for name, unit in atom_units.items():
            kernels = [k for k, _ in unit.groups]
            fn = fns[id(unit.block)]
            terms.append(((name, ), lambda state, name=name, kernels=kernels,
                           fn=fn: fn(list(zip(kernels, state[name])))))
    channel_units = {n: u for n, u in units.items() if n not in atom_units}
    if channel_units:
        if not hasattr(cost, 'layer_cost'):
            raise SearchRefused(
                f'{type(cost).__name__}: costs AtomNAS blocks only; '
                f'{next(iter(channel_units))} and the other units of this '
                'model are searched to a flops or params target, or to a '
                'latency target with a per-layer table (atom_latency_table.py '
                'on this config)')
        positions = cost.layer_positions(search_root(model))
        for layer, src, dst, depthwise in unit_layers(model, channel_units):
            names = tuple(n for n in dict.fromkeys((src, dst)) if n)
            terms.append((names, _layer_term(cost, layer, src, dst, depthwise,
                                             positions.get(layer, 0))))
        pool_cost = getattr(cost, 'pool_cost', None)  # FLOPs only
        for name, unit in channel_units.items():
            if unit.pooled is not None and pool_cost is not None:
                per = positions.get(unit.pooled, 0)
                terms.append(((name, ), lambda state, name=name, per=per:
                              pool_cost(per, state[name][0])))
    return WidthCost(total, units, terms)


def _layer_term(cost, layer, src, dst, depthwise, positions):
    c_in, c_out = layer_channels(layer)
    groups = getattr(layer, 'groups', 1)

    def term(state):
        w_in = state[src][0] if src else c_in
        w_out = state[dst][0] if dst else c_out
        if depthwise:
            return cost.layer_cost(layer, 1, w_out, 1, positions)
        return cost.layer_cost(layer, w_in, w_out, groups, positions)

    return term
