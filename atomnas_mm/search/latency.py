"""Measure latency tables for :class:`~atomnas_mm.search.costs.LatencyCost`.

A table is measured on the machine and in the runtime it will describe:
every block of a backbone is rebuilt alone with one group of each of its
kernel sizes at a few widths and timed, stem and head too.

* ``runtime='torch'``: eval mode, no grad, the inference form PyTorch runs
  (one zero-padded depthwise conv of the largest kernel per block), timed
  with ``torch.utils.benchmark``.
* ``runtime='onnxruntime'``: each part exported alone with torch's ONNX
  exporter in the form deployed (``form='export'``: what
  ``tools/deployment/pytorch2onnx.py`` writes, a block's kernel groups in
  one depthwise conv, or in parts with ``merge``, padded to ``align``
  channels; ``'split'``: the block traced as
  built, a depthwise conv per kernel group between a Split and a Concat;
  ``'merged'``: the :func:`deploy_model` form) and
  timed in an ONNX Runtime CPU session (graph optimisation ALL, a fixed
  intra-op thread count, warm-up, the median of single runs). The fixed
  cost of one ``session.run`` call (an Identity graph of the part's input)
  is subtracted from every part but the stem: the whole net pays it once.
"""
import copy
import io
import math
import random
import statistics
import time
import warnings

import torch
from torch.utils import benchmark

from ..models.blocks import AtomicBlock
from .costs import (FORMS, LAYER_TABLE_VERSION, RUNTIMES, TABLE_VERSION,
                    LatencyCost, LayerLatencyCost, is_depthwise,
                    latency_cost, layer_channels, layer_geometry,
                    search_root, unit_layers)


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


def onnx_bytes(module, x, opset=17):
    """``module`` (eval mode) exported to ONNX in memory, input ``x``."""
    module.eval()  # (some backbones' train() returns None)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the legacy exporter, on purpose
        torch.onnx.export(module, (x, ), buffer, dynamo=False,
                          opset_version=opset, input_names=['input'])
    return buffer.getvalue()


def ort_session(model, threads=1):
    """An ONNX Runtime CPU session of ``model`` (bytes or a path): graph
    optimisation ALL, ``threads`` intra-op threads, sequential, denormals as
    zero, idle threads not spinning."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = \
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # as bench_deploy.py times deployed nets
    options.add_session_config_entry('session.set_denormal_as_zero', '1')
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return onnxruntime.InferenceSession(
        model, options, providers=['CPUExecutionProvider'])


def time_session(session, x, min_run_time=0.1, warmup=20, min_runs=20):
    """Median of single ``session.run`` calls on ``x`` in milliseconds,
    after ``warmup`` runs, for at least ``min_run_time`` seconds."""
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_run_time:
        begin = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


class _Copy(torch.nn.Module):
    """The empty part (exported as one Identity): a session call's cost."""

    def forward(self, x):
        return x.clone()


def measure_ms_ort(module, x, threads=1, min_run_time=0.1):
    """Median latency of ``module`` exported to ONNX and run in ONNX Runtime
    (CPU, ``threads`` intra-op threads), in milliseconds."""
    return time_session(ort_session(onnx_bytes(module, x), threads), x,
                        min_run_time)


def deployed(module, form, x=None, align=1, merge='merged'):
    """The form of ``module`` a runtime runs on input ``x``: ``'merged'``:
    the :func:`~atomnas_mm.models.deploy.deploy_model` copy (BN folded,
    kernel groups in one padded depthwise conv); ``'split'``: as it is;
    ``'export'``: what ``pytorch2onnx.py`` writes
    (:func:`~atomnas_mm.models.deploy_onnx.onnx_model`, parts padded to
    ``align``)."""
    if form == 'merged':
        from ..models.deploy import deploy_model
        return deploy_model(module)
    if form == 'export':
        from ..models.deploy_onnx import onnx_model
        return onnx_model(module, x, align, merge)
    return module


def _block_like(block, groups):
    """A fresh block of ``block``'s geometry with ``[(k, w), ...]``."""
    norm = block.expand or block.project or next(iter(block.dw.values()))
    return AtomicBlock(
        block.in_channels, block.out_channels, block.stride,
        [k for k, _ in groups], [w for _, w in groups], block.has_expand,
        se_channels=block.se_channels,
        act_cfg=copy.deepcopy(getattr(norm, 'act_cfg', None) or
                              dict(type='ReLU')))


def _round_up(width, align):
    return -(-width // align) * align


def sample_widths(top, samples, step=1):
    """Widths a curve is measured at: ``step`` (the narrowest: the low end
    decides whether emptying a block pays) and ``samples`` evenly spaced up
    to ``top``, all multiples of ``step``."""
    top = _round_up(top, step)
    return sorted({step} | {_round_up(max(1, round(top * (j + 1) / samples)),
                                      step) for j in range(samples)})


def off_widths(widths, align, quantum):
    """The unaligned widths measured next to aligned ``widths``: ``align``
    and one ``align`` step below each, those not multiples of ``quantum``."""
    return sorted(w for w in {align} | {w - align for w in widths}
                  if w >= 1 and w % quantum)


def measure_table(backbone, device='cpu', batch=1, input_size=224,
                  samples=4, min_run_time=0.1, progress=True,
                  runtime='torch', threads=None, form=None, align=None,
                  quantum=None, merge='merged', calibrate=True):
    """Measure the latency table of ``backbone`` on ``device``.

    Args:
        backbone (AtomNAS): The supernet whose blocks are measured (at their
            current widths, the largest of the table).
        device (str): ``'cpu'`` or ``'cuda'`` (``onnxruntime``: ``'cpu'``).
        batch (int): Batch size.
        input_size (int): Image side.
        samples (int): Widths measured per kernel size (evenly spaced up to
            the block's total width, ``'split'``: the group's width), plus
            the narrowest (``align``).
        min_run_time (float): Seconds of timing per measurement.
        progress (bool): Show mmengine's progress bar.
        runtime (str): ``'torch'`` or ``'onnxruntime'``.
        threads (int, optional): Intra-op threads (``onnxruntime``: default
            1; ``torch``: the process's, ``torch.set_num_threads``).
        form (str, optional): How a block's kernel groups run:
            ``'merged'`` (one padded depthwise conv; the only form of
            ``torch``), ``'split'`` (one conv per group: the block traced as
            built) or ``'export'`` (what ``pytorch2onnx.py`` writes: groups
            gathered into aligned parts; the default of ``onnxruntime``).
        align (int, optional): The deployed form pads every kernel group
            (``export``: part) to a multiple of this width; curves are
            measured at such widths (default: the export's 16 for
            ``export``, else 1).
        quantum (int, optional): A conv whose width is a multiple of it runs
            another (faster) path: ONNX Runtime's blocked NCHWc convs need
            multiples of 4 (default 4 for ``onnxruntime``, 1 for ``torch``).
            With ``quantum`` > 1 every curve has a second one (``off_widths``,
            ``off_ms``) for the other widths.
        merge (str): The export's parts (``'merged'``: one per block, what
            ``pytorch2onnx.py`` writes by default; ``'auto'``, ``'split'``:
            its ``--deploy-form``; ``export`` only).
        calibrate (bool): Scale every latency of the table by one factor so
            that it predicts ``backbone`` as measured whole (the median of 3):
            parts timed alone miss what the whole graph adds or saves
            (caches, layout changes between parts; docs/benchmarks.md).

    Returns:
        dict: The table (JSON-serialisable).
    """
    from mmengine.utils import ProgressBar
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime: one of {RUNTIMES}, got {runtime!r}')
    form = form or ('merged' if runtime == 'torch' else 'export')
    if align is None:
        from ..models.deploy_onnx import DEFAULT_ALIGN
        align = DEFAULT_ALIGN if form == 'export' else 1
    if form not in FORMS:
        raise ValueError(f'form: one of {FORMS}, got {form!r}')
    if runtime == 'torch' and form != 'merged':
        raise ValueError("form: PyTorch runs a block's kernel groups merged "
                         f"(eval mode); {form!r} is an exported form")
    if runtime == 'onnxruntime' and str(device) != 'cpu':
        raise ValueError(f'device: onnxruntime tables are measured on the '
                         f'CPU, got {device!r}')
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f'align: a positive int, got {align!r}')
    if runtime == 'torch':
        threads = torch.get_num_threads()
    elif threads is None:
        threads = 1
    if quantum is None:
        quantum = 4 if runtime == 'onnxruntime' else 1
    if not isinstance(quantum, int) or isinstance(quantum, bool) or \
            quantum < 1:
        raise ValueError(f'quantum: a positive int, got {quantum!r}')
    step = align * quantum // math.gcd(align, quantum)
    blocks = backbone.blocks()
    jobs = sum(len(b.atom_groups()) * (samples + 1) * (1 + (step > align)) + 1
               for b in blocks) + 2
    bar = ProgressBar(jobs) if progress else None

    def tick():
        if bar is not None:
            bar.update()

    calls = {}

    def call_ms(shape):
        """The cost of one session call on an input of ``shape``."""
        if runtime == 'torch':
            return 0.0
        if shape not in calls:
            calls[shape] = measure_ms_ort(_Copy(), torch.randn(shape),
                                          threads, min_run_time)
        return calls[shape]

    def run(module, shape, whole_call=False, parts=None):
        """``module``'s time on ``shape``; without the session call's own
        cost unless ``whole_call`` (the stem: the net pays it once)."""
        x = torch.randn(shape, device=device)
        if runtime == 'torch':
            ms = measure_ms(module.to(device).eval(), x, min_run_time)
        else:
            ms = measure_ms_ort(deployed(module.eval(), form, x, align,
                                         parts or merge), x, threads,
                                min_run_time)
            if not whole_call:
                ms = max(0.0, ms - call_ms(shape))
        tick()
        return ms

    channels = backbone.in_channels
    net_shape = (batch, channels, input_size, input_size)
    stem_ms = run(copy.deepcopy(backbone.conv1), net_shape, whole_call=True)
    entries = []
    sizes = backbone.block_input_sizes(input_size)
    for i, (block, size) in enumerate(zip(blocks, sizes)):
        shape = (batch, block.in_channels, size, size)
        kernels = {}
        total = sum(h for _, h in block.atom_groups())
        for k, h in block.atom_groups():
            if not block.has_expand:
                widths = [h]  # fixed width (no expand conv)
            else:
                # merged (and export parts): up to the block's total width,
                # one group of its largest kernel (LatencyCost); split: each
                # group alone
                alone = form == 'split' or (form == 'export' and
                                            merge == 'split')
                widths = sample_widths(h if alone else total, samples, step)
            ms = [run(_block_like(block, [(k, w)]), shape) for w in widths]
            kernels[str(k)] = dict(widths=widths, ms=ms)
            off = off_widths(widths, align, quantum) if block.has_expand \
                else []
            if off:
                kernels[str(k)].update(off_widths=off, off_ms=[
                    run(_block_like(block, [(k, w)]), shape) for w in off])
        bases = []
        for curve in kernels.values():
            w, ms = curve['widths'], curve['ms']
            if len(w) > 1:
                slope = (ms[1] - ms[0]) / (w[1] - w[0])
                bases.append(max(0.0, ms[0] - slope * w[0]))
        base = sum(bases) / len(bases) if bases else 0.0
        entry = dict(
            index=i, geometry=[block.in_channels, block.out_channels,
                               block.stride],
            input_size=size, kernels=kernels, base_ms=base,
            empty_ms=0.0 if block.use_res else base, group_ms=0.0,
            se_channels=block.se_channels or 0)
        groups = [(k, h) for k, h in block.atom_groups() if h]
        if form != 'merged' and len(groups) > 1 and block.has_expand:
            # Split (or parts' expand convs), Concat and one more conv per
            # extra group: the block with a part per group against the sum
            # of its groups, each measured alone.
            whole = run(_block_like(block, groups), shape, parts='split')
            alone = LatencyCost.block_ms(entry, groups, form, align,
                                         quantum, 'split')
            entry['group_ms'] = max(0.0, (whole - alone) / (len(groups) - 1))
        else:
            tick()
        entries.append(entry)
    last = sizes[-1] if blocks else input_size
    last = (last + blocks[-1].stride - 1) // blocks[-1].stride if blocks \
        else last
    head_ms = run(copy.deepcopy(backbone.conv2),
                  (batch, backbone.conv2.conv.in_channels, last, last))
    if bar is not None:
        print()
    table = dict(version=TABLE_VERSION, runtime=runtime, form=form,
                 merge=merge, align=align, quantum=quantum, threads=threads,
                 device=str(device),
                 batch=batch, input_size=input_size, in_channels=channels,
                 stem_ms=stem_ms, head_ms=head_ms, blocks=entries)
    if runtime == 'onnxruntime':
        import onnxruntime
        table.update(onnxruntime=onnxruntime.__version__,
                     call_ms=call_ms(net_shape))
    if calibrate:
        predicted = LatencyCost(table).total(backbone)
        whole = statistics.median(
            measure_net_ms(table, backbone, device, min_run_time)
            for _ in range(3))
        table = scaled(table, whole / predicted)
        table.update(supernet_ms=whole, scale=whole / predicted)
    return table


def scaled(table, factor):
    """A copy of ``table`` with every latency multiplied by ``factor``."""
    table = copy.deepcopy(table)
    for key in ('stem_ms', 'head_ms'):
        table[key] *= factor
    for entry in table['blocks']:
        for key in ('base_ms', 'empty_ms', 'group_ms'):
            if key in entry:
                entry[key] *= factor
        for curve in entry['kernels'].values():
            for key in ('ms', 'off_ms'):
                if key in curve:
                    curve[key] = [ms * factor for ms in curve[key]]
    return table


def one_atom_ms(cost, backbone):
    """The predicted latency of ``backbone`` with every searchable block
    kept at one atom of its cheapest kernel: below it a target is reached
    only by emptying residual blocks, each a step of a whole block's cost
    (at small inputs most of it fixed), which the budget cannot land on."""
    total = cost.table['stem_ms'] + cost.table['head_ms']
    for entry, block in cost._entries(backbone):
        groups = block.atom_groups()
        if block.searchable:
            total += min(cost._block_ms(entry, [(k, 1)]) for k, _ in groups)
        else:
            total += cost._block_ms(entry, groups)
    return total


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


def padded(net, align):
    """A net of ``net``'s shapes with every kernel group's width rounded up
    to a multiple of ``align`` (what a padded export runs; random weights:
    for timing)."""
    from ..models import AtomNAS
    if align == 1:
        return net
    arch = net.arch_dict()
    for row, block in zip(arch['rows'], net.blocks()):
        if block.has_expand:
            row[4] = [_round_up(h, align) for h in row[4]]
    return AtomNAS(arch=arch).eval()


def measure_net_ms(table, net, device='cpu', min_run_time=0.2):
    """The whole ``net``'s latency the way ``table`` was measured (its
    runtime, form, threads, batch and group padding)."""
    form, align = table.get('form', 'merged'), table.get('align', 1)
    if form != 'export':  # the export pads by itself
        net = padded(net, align)
    size = table['input_size']
    x = torch.randn(table.get('batch', 1), net.in_channels, size, size,
                    device=device)
    if table.get('runtime', 'torch') == 'torch':
        return measure_ms(net.to(device).eval(), x, min_run_time)
    return measure_ms_ort(deployed(net.eval(), form, x, align,
                                   table.get('merge', 'merged')),
                          x, table.get('threads', 1), min_run_time)


def compare(table, nets, device='cpu', batch=None, min_run_time=0.2,
            repeats=3):
    """``[(name, predicted ms, measured ms)]`` for named nets (AtomNAS
    backbones for a per-block table, counted modules for a per-layer one),
    each measured whole in the table's runtime (``batch``: the table's), the
    median of ``repeats`` measurements taken in turns (a shared machine's
    load moves in seconds)."""
    cost = latency_cost(table)
    if batch is not None and batch != cost.table.get('batch', 1):
        raise ValueError(f'batch: {batch}, the table was measured at batch '
                         f'{cost.table.get("batch", 1)}')
    measure = measure_model_ms if isinstance(cost, LayerLatencyCost) else \
        measure_net_ms
    times = {name: [] for name in nets}
    for _ in range(repeats):
        for name, net in nets.items():
            times[name].append(measure(cost.table, net, device,
                                       min_run_time))
    return [(name, cost.total(net), statistics.median(times[name]))
            for name, net in nets.items()]


# -- per-layer tables of stock models (LayerLatencyCost) ---------------------
def deployed_root(root, runtime):
    """A copy of ``root`` in eval mode as the table's runtime runs it: BN
    folded into the convs before it (``torch``: mmcv's ``fuse_conv_bn``, as
    mmdet's ``test.py --fuse-conv-bn``; ONNX Runtime folds it itself)."""
    root = copy.deepcopy(root)
    root.train(False)  # some backbones' train() returns None
    if runtime == 'torch':
        from mmcv.cnn import fuse_conv_bn
        root = fuse_conv_bn(root)
    return root


def measure_model_ms(table, root, device='cpu', min_run_time=0.2):
    """The whole ``root``'s latency the way the per-layer ``table`` was
    measured (its runtime, threads and input shape)."""
    x = torch.randn(table['input_shape'], device=device)
    net = deployed_root(root, table.get('runtime', 'torch'))
    if table.get('runtime', 'torch') == 'torch':
        return measure_ms(net.to(device), x, min_run_time)
    return measure_ms_ort(net, x, table.get('threads', 1), min_run_time)


def _layer_like(layer, c_in, c_out):
    """A fresh layer of ``layer``'s kind with these widths and a bias (a
    folded BN's); a depthwise conv stays depthwise (``c_out`` channels)."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.Linear(c_in, c_out)
    groups = 1
    if is_depthwise(layer):
        c_in = groups = c_out
    return torch.nn.Conv2d(c_in, c_out, layer.kernel_size, layer.stride,
                           layer.padding, layer.dilation, groups, True,
                           layer.padding_mode)


def layer_widths(full, samples, step=1):
    """Widths a layer is measured at along a unit's axis: those of
    :func:`sample_widths` and ``2 * step``, at most ``full``, and ``full``
    (PyTorch runs a depthwise conv of one channel as a plain conv, 6x faster
    than at two channels at 7 px: the narrow end is not linear)."""
    return sorted({min(w, full) for w in sample_widths(full, samples, step)}
                  | {min(2 * step, full), full})


def measure_layer_table(model, input_shape, device='cpu', runtime='torch',
                        samples=4, step=1, min_run_time=0.1, threads=None,
                        progress=True, units=None, repeats=3,
                        calibrate=3):
    """Measure the per-layer latency table of ``model``'s channel units for
    :class:`~atomnas_mm.search.costs.LayerLatencyCost`.

    Every Conv2d / Linear a unit resizes (:func:`~atomnas_mm.search.costs.
    unit_layers`, the layers the search costs) is rebuilt alone with a bias
    (the folded BN's) at a grid of widths (``samples`` + 1 along each axis
    that is a unit's; a depthwise conv: its channels) and timed on an input
    of its shape in the model; the counted module
    (:func:`~atomnas_mm.search.costs.search_root`) is timed whole, BN
    folded (:func:`deployed_root`), at full width and at ``calibrate``
    narrower widths. Layers timed alone miss what the whole graph fuses or
    adds (ONNX Runtime fuses a conv with its activation and addition; a
    call alone has its own overhead): one factor on every sample
    (``scale``) fits how the whole nets' times change with the sum of their
    layers' samples, and ``fixed_ms`` is what the scaled layers at full
    width leave of the full net (:func:`fit_layers`).

    Args:
        model (nn.Module): The model (unwrapped), at full width.
        input_shape (tuple[int]): The counted module's input
            ``(batch, C, H, W)``.
        device (str): ``'cpu'`` or ``'cuda'`` (``onnxruntime``: ``'cpu'``).
        runtime (str): ``'torch'`` (eval mode) or ``'onnxruntime'`` (each
            layer exported alone, one session call's cost subtracted).
        samples (int): Widths per axis besides the narrowest.
        step (int): Widths are multiples of it (but the full width): a
            search with ``round_to`` only reaches those.
        min_run_time (float): Seconds of timing per measurement.
        threads (int, optional): Intra-op threads (``onnxruntime``: default
            1; ``torch``: the process's).
        progress (bool): Show mmengine's progress bar.
        units (dict, optional): The units (default: ``find_units``).
        repeats (int): A whole module's time is the median of this many.
        calibrate (int): Narrower nets measured whole to fit the scale,
            every unit at its narrowest (one channel, ``step`` when it is
            wider), ``1 / calibrate``, ``2 / calibrate``, ... of its width
            (0: scale 1).

    Returns:
        dict: The table (JSON-serialisable).
    """
    from mmengine.utils import ProgressBar

    from .shrink import narrow_to_widths
    from .units import AtomUnit, find_units
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime: one of {RUNTIMES}, got {runtime!r}')
    if runtime == 'onnxruntime' and str(device) != 'cpu':
        raise ValueError(f'device: onnxruntime tables are measured on the '
                         f'CPU, got {device!r}')
    threads = torch.get_num_threads() if runtime == 'torch' else threads or 1
    units = find_units(model) if units is None else units
    units = {n: u for n, u in units.items() if not isinstance(u, AtomUnit)}
    root = search_root(model)
    names = {id(m): n for n, m in root.named_modules()}
    layers = unit_layers(model, units)
    if not layers:
        raise ValueError(f'model: {type(model).__name__} has no layer of a '
                         'channel unit to measure')
    shapes = {}  # the input shape of every layer in the model

    def record(module, args):
        shapes.setdefault(id(module), tuple(args[0].shape))

    handles = [layer.register_forward_pre_hook(record)
               for layer, *_ in layers]
    was_training = root.training
    root.train(False)
    try:
        with torch.no_grad():
            root(torch.randn(input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        root.train(was_training)
    grids = []
    for layer, src, dst, depthwise in layers:
        name = names[id(layer)]
        c_in, c_out = layer_channels(layer)
        if depthwise and not is_depthwise(layer) or not depthwise and \
                getattr(layer, 'groups', 1) != 1:
            raise ValueError(f'{name}: a grouped conv ({layer.groups} groups, '
                             f'{c_in} -> {c_out} channels) that is not '
                             'depthwise: not measured')
        if depthwise:
            grid = ([c_in], layer_widths(c_out, samples, step))
        else:
            grid = (layer_widths(c_in, samples, step) if src else [c_in],
                    layer_widths(c_out, samples, step) if dst else [c_out])
        grids.append((name, layer, grid))
    jobs = sum(len(a) * len(b) for _, _, (a, b) in grids) + \
        repeats * (1 + calibrate)
    bar = ProgressBar(jobs) if progress else None
    calls = {}

    def run(module, shape):
        x = torch.randn(shape, device=device)
        if runtime == 'torch':
            ms = measure_ms(module.to(device).eval(), x, min_run_time)
        else:
            if shape not in calls:  # one session call's cost
                calls[shape] = measure_ms_ort(_Copy(), x, threads,
                                              min_run_time)
            ms = max(0.0, measure_ms_ort(module.eval(), x, threads,
                                         min_run_time) - calls[shape])
        if bar is not None:
            bar.update()
        return ms

    entries = []
    for name, layer, (in_widths, out_widths) in grids:
        shape = shapes[id(layer)]
        ms = []
        for w_in in in_widths:
            row = []
            for w_out in out_widths:
                module = _layer_like(layer, w_in, w_out)
                x_shape = (shape[0], module.in_channels) + shape[2:] \
                    if isinstance(module, torch.nn.Conv2d) else \
                    shape[:-1] + (w_in, )
                row.append(run(module, x_shape))
            ms.append(row)
        entry = dict(name=name, **layer_geometry(layer),
                     depthwise=is_depthwise(layer),
                     input_size=list(shape[2:] if isinstance(
                         layer, torch.nn.Conv2d) else shape[1:-1]),
                     in_widths=in_widths, out_widths=out_widths, ms=ms)
        entries.append(entry)
    table = dict(kind='layers', version=LAYER_TABLE_VERSION, runtime=runtime,
                 threads=threads, device=str(device),
                 batch=int(input_shape[0]), input_shape=list(input_shape),
                 samples=samples, step=step, layers=entries, fixed_ms=0.0,
                 model_ms=0.0)
    # The whole module at full width and at ``calibrate`` random widths,
    # measured in turns, against the sum of its layers' samples.
    nets = [model]
    for j in range(calibrate):
        net = copy.deepcopy(model)
        narrow_to_widths(net, random_widths(model, fraction=j / calibrate,
                                            align=step))
        nets.append(net)
    whole = [[] for _ in nets]
    for _ in range(repeats):
        for times, net in zip(whole, nets):
            times.append(measure_model_ms(table, search_root(net), device,
                                          min_run_time))
            if bar is not None:
                bar.update()
    if bar is not None:
        print()
    raw = LayerLatencyCost(table)
    points = [(raw.total(search_root(net)), statistics.median(times))
              for net, times in zip(nets, whole)]
    scale, fixed = fit_layers(points)
    for entry in entries:
        entry['ms'] = [[ms * scale for ms in row] for row in entry['ms']]
    table.update(model_ms=points[0][1], layers_ms=points[0][0] * scale,
                 fixed_ms=fixed, scale=scale,
                 calibration=[list(p) for p in points])
    if runtime == 'onnxruntime':
        import onnxruntime
        table.update(onnxruntime=onnxruntime.__version__)
    return table


def fit_layers(points):
    """``(scale, fixed_ms)`` of a per-layer table from ``[(sum of the
    layers' samples, measured ms)]`` of whole nets, the full one first: the
    prediction ``fixed_ms + scale * sum`` passes through the full net and
    fits the slope of the others (least squares); ``fixed_ms`` >= 0 (else
    the scale that predicts the full net with no fixed part), the scale 1
    when the narrower nets give no slope."""
    (x0, m0), rest = points[0], points[1:]
    dx = [x - x0 for x, _ in rest]
    dm = [m - m0 for _, m in rest]
    squares = sum(d * d for d in dx)
    scale = sum(a * b for a, b in zip(dx, dm)) / squares if squares else 1.0
    if scale <= 0:
        scale = 1.0
    fixed = m0 - scale * x0
    if fixed < 0:
        scale, fixed = m0 / x0, 0.0
    return scale, fixed


def random_widths(model, seed=0, align=1, fraction=None):
    """``{unit name: [width]}``: every channel unit of ``model`` (no AtomNAS
    atoms) at a random 10-100% of its width (``fraction`` when given),
    rounded up to a multiple of ``align`` (at most its width), for checking
    a table's predictions (:func:`~atomnas_mm.search.shrink.
    narrow_to_widths`)."""
    from .units import AtomUnit, find_units
    rng = random.Random(seed)
    widths = {}
    for name, unit in find_units(model).items():
        if isinstance(unit, AtomUnit):
            continue
        full = unit.num_channels
        share = rng.uniform(0.1, 1.0) if fraction is None else fraction
        width = max(unit.min_width, round(full * share))
        widths[name] = [min(full, _round_up(width, align))]
    return widths


MAX_MS = 1e6  # 1000 s: no block takes that long; a table is in ms


def _bad(where, field, value, why):
    raise ValueError(
        f'table: {where}: {field} = {value!r}: {why}; measure the table '
        'again with tools/analysis_tools/atom_latency_table.py')


def _check_ms(where, field, value):
    """A latency: a finite number of milliseconds in ``[0, MAX_MS]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _bad(where, field, value, 'a latency must be a number of '
             'milliseconds')
    if not math.isfinite(value):
        _bad(where, field, value, 'a latency must be finite (a failed '
             'measurement?)')
    if value < 0:
        _bad(where, field, value, 'a latency cannot be negative')
    if value > MAX_MS:
        _bad(where, field, value, f'over {MAX_MS:g} ms (1000 s) is no '
             'latency of a block; a table is in milliseconds')


def _is_width(value):
    return isinstance(value, int) and not isinstance(value, bool) and \
        value > 0


def _check_widths(where, field, widths, count=None):
    """Increasing positive integers (``count`` of them when given)."""
    if not (isinstance(widths, list) and widths and all(
            _is_width(w) for w in widths) and all(
                a < b for a, b in zip(widths, widths[1:]))) or (
                    count is not None and len(widths) != count):
        _bad(where, field, widths, 'must be increasing positive integers' + (
            f', {count} of them' if count is not None else ''))



def check_table(table, where):
    """Check the numbers of a latency table on load.

    Every latency (``stem_ms``, ``head_ms``, ``call_ms``, each block's
    ``base_ms``, ``empty_ms``, ``group_ms`` and curve samples) must be a
    finite number of milliseconds
    in ``[0, 1e6]``, and each curve's widths positive, increasing integers,
    one per sample. A negative sample made a search land at an impossible
    latency, a NaN was blamed on the target and 1e300 overflowed in torch.

    Args:
        table (dict): The table (version already checked).
        where (str): How to name it in messages (its path).

    Raises:
        ValueError: Naming ``where``, the field and why.
    """
    def bad(field, value, why):
        _bad(where, field, value, why)

    def check_ms(field, value):
        _check_ms(where, field, value)

    check_ms('stem_ms', table.get('stem_ms'))
    check_ms('head_ms', table.get('head_ms'))
    for key in ('call_ms', 'supernet_ms', 'scale'):
        if key in table:
            check_ms(key, table[key])
    if table.get('runtime', 'torch') not in RUNTIMES:
        bad('runtime', table.get('runtime'), f'must be one of {RUNTIMES}')
    if table.get('form', 'merged') not in FORMS:
        bad('form', table.get('form'), f'must be one of {FORMS}')
    if table.get('merge', 'merged') not in ('auto', 'split', 'merged'):
        bad('merge', table.get('merge'), "must be 'auto', 'split' or "
            "'merged' (the export's parts)")
    for key, why in (('align', 'the width every kernel group is padded to '
                      'a multiple of'), ('quantum', 'widths that are its '
                                         'multiples run the fast path')):
        value = table.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or \
                value < 1:
            bad(key, value, f'must be a positive int ({why})')
    blocks = table.get('blocks')
    if not isinstance(blocks, list):
        bad('blocks', blocks, 'must be a list with one entry per block')
    for i, entry in enumerate(blocks):
        name = f'blocks[{i}]'
        if not isinstance(entry, dict):
            bad(name, entry, 'must be a dict')
        for key in ('base_ms', 'empty_ms'):
            check_ms(f'{name}.{key}', entry.get(key))
        if 'group_ms' in entry:
            check_ms(f'{name}.group_ms', entry['group_ms'])
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
            if 'off_widths' in curve or 'off_ms' in curve:
                off, off_ms = curve.get('off_widths'), curve.get('off_ms')
                if not (isinstance(off, list) and isinstance(off_ms, list)
                        and off and len(off) == len(off_ms)) or not all(
                            isinstance(w, int) and not isinstance(w, bool)
                            and w > 0 for w in off) or any(
                                a >= b for a, b in zip(off, off[1:])):
                    bad(f'{field}.off_widths', off, 'must be increasing '
                        'positive integers, one "off_ms" sample each')
                for j, value in enumerate(off_ms):
                    check_ms(f'{field}.off_ms[{j}]', value)


def check_layer_table(table, where):
    """Check a per-layer latency table (:class:`~atomnas_mm.search.costs.
    LayerLatencyCost`) on load.

    ``fixed_ms``, ``model_ms`` and every sample must be a latency as in
    :func:`check_table`; every layer needs a unique ``name``, its
    ``type`` (``Conv2d`` / ``Linear``), channels, and ``in_widths`` /
    ``out_widths`` (increasing positive integers ending at its channels; one
    width along an axis that is no unit's, and the input axis of a
    depthwise conv) with ``ms`` one row per input width, one sample per
    output width.

    Args:
        table (dict): The table (kind and version already checked).
        where (str): How to name it in messages (its path).

    Raises:
        ValueError: Naming ``where``, the field and why.
    """
    for key in ('fixed_ms', 'model_ms'):
        _check_ms(where, key, table.get(key))
    if table.get('runtime', 'torch') not in RUNTIMES:
        _bad(where, 'runtime', table.get('runtime'),
             f'must be one of {RUNTIMES}')
    shape = table.get('input_shape')
    if not (isinstance(shape, list) and len(shape) >= 2 and
            all(_is_width(d) for d in shape)):
        _bad(where, 'input_shape', shape, 'must be the counted module\'s '
             'input shape, e.g. [1, 3, 224, 224]')
    layers = table.get('layers')
    if not isinstance(layers, list) or not layers:
        _bad(where, 'layers', layers, 'must be a list with one entry per '
             'layer of a channel unit')
    seen = set()
    for i, entry in enumerate(layers):
        field = f'layers[{i}]'
        if not isinstance(entry, dict):
            _bad(where, field, entry, 'must be a dict')
        name = entry.get('name')
        if not isinstance(name, str) or not name or name in seen:
            _bad(where, f'{field}.name', name, 'must be the layer\'s module '
                 'path in the counted module, once')
        seen.add(name)
        field = f'layers[{i}] ({name})'
        if entry.get('type') not in ('Conv2d', 'Linear'):
            _bad(where, f'{field}.type', entry.get('type'),
                 "must be 'Conv2d' or 'Linear'")
        if not isinstance(entry.get('depthwise'), bool):
            _bad(where, f'{field}.depthwise', entry.get('depthwise'),
                 'must be a bool')
        for key in ('in_channels', 'out_channels'):
            if not _is_width(entry.get(key)):
                _bad(where, f'{field}.{key}', entry.get(key),
                     'must be a positive int')
        for key in ('in', 'out'):
            widths = entry.get(f'{key}_widths')
            _check_widths(where, f'{field}.{key}_widths', widths)
            if widths[-1] != entry[f'{key}_channels'] or (
                    key == 'in' and entry['depthwise'] and len(widths) > 1):
                _bad(where, f'{field}.{key}_widths', widths,
                     f'must end at {key}_channels ({entry[f"{key}_channels"]})'
                     + (', one width (a depthwise conv follows its output)'
                        if key == 'in' and entry['depthwise'] else ''))
        ms = entry.get('ms')
        rows, cols = len(entry['in_widths']), len(entry['out_widths'])
        if not (isinstance(ms, list) and len(ms) == rows and all(
                isinstance(row, list) and len(row) == cols for row in ms)):
            _bad(where, f'{field}.ms', ms, f'must be {rows} rows (input '
                 f'widths) of {cols} samples (output widths)')
        for a, row in enumerate(ms):
            for b, value in enumerate(row):
                _check_ms(where, f'{field}.ms[{a}][{b}]', value)
