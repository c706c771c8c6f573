"""Measure latency tables for :class:`~atomnas_mm.search.costs.LatencyCost`.

A table is measured on the machine it will describe: every block of a
backbone is rebuilt alone with one group of each of its kernel sizes at a few
widths up to the block's total width and timed (eval mode, no grad, the
inference form that deployment runs) with ``torch.utils.benchmark``; stem and
head too.
"""
import copy
import random

import torch
from torch.utils import benchmark

from ..models.blocks import AtomicBlock
from .costs import TABLE_VERSION, LatencyCost


def measure_ms(module, x, min_run_time=0.1):
    """Median forward time of ``module(x)`` in milliseconds (no grad)."""
    module.eval()
    with torch.no_grad():
        for _ in range(2):
            module(x)
        timer = benchmark.Timer(stmt='module(x)',
                                globals=dict(module=module, x=x),
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _block_like(block, kernel, width):
    """A fresh block of ``block``'s geometry with one group ``(k, w)``."""
    norm = block.expand or block.project or next(iter(block.dw.values()))
    return AtomicBlock(
        block.in_channels, block.out_channels, block.stride, [kernel],
        [width], block.has_expand, se_channels=block.se_channels,
        act_cfg=copy.deepcopy(getattr(norm, 'act_cfg', None) or
                              dict(type='ReLU')))


def measure_table(backbone, device='cpu', batch=1, input_size=224,
                  samples=4, min_run_time=0.1, progress=True):
    """Measure the latency table of ``backbone`` on ``device``.

    Args:
        backbone (AtomNAS): The supernet whose blocks are measured (at their
            current widths, the largest of the table).
        device (str): ``'cpu'`` or ``'cuda'``.
        batch (int): Batch size.
        input_size (int): Image side.
        samples (int): Widths measured per kernel size (evenly spaced up to
            the block's total width).
        min_run_time (float): Seconds of timing per measurement.
        progress (bool): Show mmengine's progress bar.

    Returns:
        dict: The table (JSON-serialisable).
    """
    from mmengine.utils import ProgressBar
    blocks = backbone.blocks()
    jobs = sum(len(b.atom_groups()) * samples for b in blocks) + 2
    bar = ProgressBar(jobs) if progress else None

    def tick():
        if bar is not None:
            bar.update()

    def run(module, shape):
        module = module.to(device)
        ms = measure_ms(module, torch.randn(shape, device=device),
                        min_run_time)
        tick()
        return ms

    channels = backbone.in_channels
    stem_ms = run(copy.deepcopy(backbone.conv1),
                  (batch, channels, input_size, input_size))
    entries = []
    sizes = backbone.block_input_sizes(input_size)
    for i, (block, size) in enumerate(zip(blocks, sizes)):
        shape = (batch, block.in_channels, size, size)
        kernels = {}
        total = sum(h for _, h in block.atom_groups())
        for k, h in block.atom_groups():
            # Up to the block's total width: with several groups the block
            # runs as one group of its largest kernel (LatencyCost).
            widths = sorted({max(1, round(total * (j + 1) / samples))
                             for j in range(samples)})
            if not block.has_expand:
                widths = [h]  # fixed width (no expand conv)
            ms = [run(_block_like(block, k, w), shape) for w in widths]
            kernels[str(k)] = dict(widths=widths, ms=ms)
        bases = []
        for curve in kernels.values():
            w, ms = curve['widths'], curve['ms']
            if len(w) > 1:
                slope = (ms[1] - ms[0]) / (w[1] - w[0])
                bases.append(max(0.0, ms[0] - slope * w[0]))
        base = sum(bases) / len(bases) if bases else 0.0
        entries.append(dict(
            index=i, geometry=[block.in_channels, block.out_channels,
                               block.stride],
            input_size=size, kernels=kernels, base_ms=base,
            empty_ms=0.0 if block.use_res else base))
    last = sizes[-1] if blocks else input_size
    last = (last + blocks[-1].stride - 1) // blocks[-1].stride if blocks \
        else last
    head_ms = run(copy.deepcopy(backbone.conv2),
                  (batch, backbone.conv2.conv.in_channels, last, last))
    if bar is not None:
        print()
    return dict(version=TABLE_VERSION, device=str(device), batch=batch,
                input_size=input_size,
                in_channels=channels, stem_ms=stem_ms, head_ms=head_ms,
                blocks=entries)


def random_subnet(backbone, seed=0):
    """The arch of a random narrower net of ``backbone`` (for checking a
    table's predictions): every searchable group keeps 10-100% of its
    atoms."""
    rng = random.Random(seed)
    arch = backbone.arch_dict()
    for row, block in zip(arch['rows'], backbone.blocks()):
        if block.searchable:
            row[4] = [max(1, round(h * rng.uniform(0.1, 1.0)))
                      for h in row[4]]
    return arch


def compare(table, backbones, device='cpu', batch=1, min_run_time=0.2):
    """``[(name, predicted ms, measured ms)]`` for named backbones."""
    cost = LatencyCost(table)
    size = table['input_size']
    rows = []
    for name, net in backbones.items():
        predicted = cost.total(net)
        x = torch.randn(batch, net.in_channels, size, size, device=device)
        measured = measure_ms(net.to(device), x, min_run_time)
        rows.append((name, predicted, measured))
    return rows


MAX_MS = 1e6  # 1000 s: no block takes that long; a table is in ms


def check_table(table, where):
    """Check the numbers of a latency table on load.

    Every latency (``stem_ms``, ``head_ms``, each block's ``base_ms``,
    ``empty_ms`` and curve samples) must be a finite number of milliseconds
    in ``[0, 1e6]``, and each curve's widths positive, increasing integers,
    one per sample. A negative sample made a search land at an impossible
    latency, a NaN was blamed on the target and 1e300 overflowed in torch.

    Args:
        table (dict): The table (version already checked).
        where (str): How to name it in messages (its path).

    Raises:
        ValueError: Naming ``where``, the field and why.
    """
    import math

    def bad(field, value, why):
        raise ValueError(
            f'table: {where}: {field} = {value!r}: {why}; measure the table '
            'again with tools/analysis_tools/atom_latency_table.py')

    def check_ms(field, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad(field, value, 'a latency must be a number of milliseconds')
        if not math.isfinite(value):
            bad(field, value, 'a latency must be finite (a failed '
                'measurement?)')
        if value < 0:
            bad(field, value, 'a latency cannot be negative')
        if value > MAX_MS:
            bad(field, value, f'over {MAX_MS:g} ms (1000 s) is no latency of '
                'a block; a table is in milliseconds')

    check_ms('stem_ms', table.get('stem_ms'))
    check_ms('head_ms', table.get('head_ms'))
    blocks = table.get('blocks')
    if not isinstance(blocks, list):
        bad('blocks', blocks, 'must be a list with one entry per block')
    for i, entry in enumerate(blocks):
        name = f'blocks[{i}]'
        if not isinstance(entry, dict):
            bad(name, entry, 'must be a dict')
        for key in ('base_ms', 'empty_ms'):
            check_ms(f'{name}.{key}', entry.get(key))
        geometry = entry.get('geometry')
        if not (isinstance(geometry, list) and len(geometry) == 3 and all(
                isinstance(g, int) and not isinstance(g, bool) and g > 0
                for g in geometry)):
            bad(f'{name}.geometry', geometry,
                'must be [in_channels, out_channels, stride]')
        kernels = entry.get('kernels')
        if not isinstance(kernels, dict) or not kernels:
            bad(f'{name}.kernels', kernels,
                'must map each kernel size to its curve')
        for k, curve in kernels.items():
            field = f'{name}.kernels[{k!r}]'
            widths = curve.get('widths') if isinstance(curve, dict) else None
            samples = curve.get('ms') if isinstance(curve, dict) else None
            if not (isinstance(widths, list) and isinstance(samples, list)
                    and widths and len(widths) == len(samples)):
                bad(field, curve, 'must hold "widths" and "ms", one sample '
                    'per width')
            if not all(isinstance(w, int) and not isinstance(w, bool)
                       and w > 0 for w in widths) or any(
                           a >= b for a, b in zip(widths, widths[1:])):
                bad(f'{field}.widths', widths,
                    'must be increasing positive integers')
            for j, value in enumerate(samples):
                check_ms(f'{field}.ms[{j}]', value)
