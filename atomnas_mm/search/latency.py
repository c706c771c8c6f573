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
from .costs import FORMS, RUNTIMES, TABLE_VERSION, LatencyCost


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
    module = module.eval()
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


def compare(table, backbones, device='cpu', batch=None, min_run_time=0.2,
            repeats=3):
    """``[(name, predicted ms, measured ms)]`` for named backbones, each
    measured whole in the table's runtime (``batch``: the table's), the
    median of ``repeats`` measurements taken in turns (a shared machine's
    load moves in seconds)."""
    cost = LatencyCost(table)
    if batch is not None and batch != cost.table.get('batch', 1):
        raise ValueError(f'batch: {batch}, the table was measured at batch '
                         f'{cost.table.get("batch", 1)}')
    times = {name: [] for name in backbones}
    for _ in range(repeats):
        for name, net in backbones.items():
            times[name].append(measure_net_ms(cost.table, net, device,
                                              min_run_time))
    return [(name, cost.total(net), statistics.median(times[name]))
            for name, net in backbones.items()]


MAX_MS = 1e6  # 1000 s: no block takes that long; a table is in ms


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
