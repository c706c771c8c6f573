"""Measure a latency table of a config's model: per AtomNAS block, or per
layer of a stock model's channel units.

    python tools/analysis_tools/atom_latency_table.py CONFIG \
        --device cpu --batch 1 --shape 224 --out latency_cpu.json
    # in ONNX Runtime (CPU), each block exported alone as pytorch2onnx.py
    # exports it (kernel groups in one conv padded to 16 channels), 1 thread:
    python tools/analysis_tools/atom_latency_table.py CONFIG \
        --runtime onnxruntime --threads 1 --shape 224 --out latency_ort.json
    # check it: predicted vs measured latency of the zoo nets that fit the
    # table and of random sub-nets of the supernet
    python tools/analysis_tools/atom_latency_table.py CONFIG \
        --table latency_cpu.json --predict

A config whose model has no AtomNAS backbone (mmpretrain's MobileNetV2,
ResNet, ...) gets a per-layer table (``kind: "layers"``): every Conv2d /
Linear of its channel units (the units the search finds) timed alone, BN
folded, at a grid of widths at its input size in the model, and the fixed
rest of the counted module (its backbone) measured whole; ``--predict``
compares the model and random narrower ones (``--align``: their widths, and
the table's samples, multiples of it, as a search with ``round_to``).

Use the table as the cost of a latency budget:
``AtomShrinkHook(target=dict(latency_ms=...), latency_table='latency_cpu.json')``
(README, "Budgets").
"""
import argparse
import json
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config whose model has an AtomNAS '
                        'backbone (the supernet to measure), or any model '
                        'with channel units (a per-layer table)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--runtime', default='torch',
                        choices=['torch', 'onnxruntime'],
                        help='where the net will run: PyTorch (eval mode) or '
                        'ONNX Runtime on the CPU (each part exported alone)')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads (onnxruntime: default 1; '
                        'torch: default the process\'s)')
    parser.add_argument('--form', choices=['export', 'split', 'merged'],
                        default=None,
                        help='how a block runs its kernel groups: export '
                        '(what pytorch2onnx.py writes, padded to --align; the '
                        'onnxruntime default), split (one '
                        'depthwise conv per group, the block traced as built) '
                        'or merged (one padded conv: PyTorch eval mode, '
                        'deploy_model; the torch form)')
    parser.add_argument('--merge', choices=['merged', 'auto', 'split'],
                        default='merged', help='--form export: the parts, as '
                        'pytorch2onnx.py --deploy-form (default merged, its '
                        'default: one depthwise conv per block)')
    parser.add_argument('--align', type=int, default=None,
                        help='the deployed net pads every kernel group '
                        '(export: part) to a multiple of this width (default '
                        '16 for export, as pytorch2onnx.py; else 1); '
                        'per-layer tables: widths are sampled at multiples '
                        'of it, as the search with round_to reaches them '
                        '(default 1 for torch, 8 for onnxruntime, whose '
                        'convs run fast at multiples of 4 and 8)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--shape', type=int, default=None,
                        help='image side (default: the config\'s '
                        'AtomShrinkHook input_size, else 224)')
    parser.add_argument('--samples', type=int, default=4,
                        help='widths measured per kernel size, up to the block '
                        'width (per-layer tables: per axis, besides the '
                        'narrowest)')
    parser.add_argument('--min-run-time', type=float, default=0.1,
                        help='seconds of timing per measurement')
    parser.add_argument('--no-calibrate', action='store_true',
                        help='keep the parts\' times as measured (default: '
                        'one factor makes the table predict the supernet as '
                        'measured whole; per-layer tables: the factor fitted '
                        'on the model and 3 narrower ones measured whole)')
    parser.add_argument('--out', help='where to write the table (JSON)')
    parser.add_argument('--table', help='an existing table (skip measuring)')
    parser.add_argument('--predict', action='store_true',
                        help='print predicted vs measured latency of the zoo '
                        'nets that fit the table and of random sub-nets')
    parser.add_argument('--subnets', type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.out or args.table):
        parser.error('give --out (measure a table) or --table (use one)')
    for name in ('batch', 'samples', 'align', 'threads'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1')
    if args.subnets < 0:
        parser.error('--subnets must be >= 0')
    if args.runtime == 'onnxruntime' and args.device != 'cpu':
        parser.error('--runtime onnxruntime measures on the CPU (--device '
                     'cpu)')
    if args.runtime == 'torch' and args.form not in (None, 'merged'):
        parser.error(f"--form {args.form} is an exported form: PyTorch's eval "
                     'mode runs the kernel groups merged (use --runtime '
                     'onnxruntime)')
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
        osp.abspath(__file__)))))
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import atomnas_mm  # noqa: F401
    from atomnas_mm.models import ARCHS, AtomNAS
    from atomnas_mm.search import find_backbones
    from atomnas_mm.search.latency import measure_table, random_subnet

    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('atom_latency_table.py: error: --device cuda but '
                         'CUDA is not available')
    if args.runtime == 'onnxruntime':
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SystemExit('atom_latency_table.py: error: --runtime '
                             'onnxruntime needs the onnxruntime package '
                             '(pip install onnxruntime)') from None
    if args.runtime == 'torch' and args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    from mmengine.registry import MODELS
    model = MODELS.build(cfg.model)
    size = args.shape or next((h.get('input_size') for h in cfg.get(
        'custom_hooks', []) if 'AtomShrinkHook' in h.get('type', '')), 224)
    backbones = find_backbones(model)
    if not backbones:
        return layer_table(args, model, size)
    backbone = next(iter(backbones.values())).eval()
    if args.table:
        from atomnas_mm.search.costs import LatencyCost
        try:
            table = LatencyCost(args.table).table
        except ValueError as e:
            raise SystemExit(f'atom_latency_table.py: error: {e}') from None
        table = dict(table)
    else:
        table = measure_table(backbone, args.device, args.batch, size,
                              args.samples, args.min_run_time,
                              runtime=args.runtime, threads=args.threads,
                              form=args.form, align=args.align,
                              merge=args.merge,
                              calibrate=not args.no_calibrate)
        with open(args.out, 'w') as f:
            json.dump(table, f, indent=1)
        print(f'{args.out}: {len(table["blocks"])} blocks, '
              f'{table["runtime"]} ({table["form"]} kernel groups, align '
              f'{table["align"]}, {table["threads"]} threads), device '
              f'{table["device"]}, batch {table["batch"]}, '
              f'{table["input_size"]} px' + (
                  f'; parts scaled by {table["scale"]:.3f} to the supernet '
                  f'measured whole ({table["supernet_ms"]:.3f} ms)'
                  if 'scale' in table else ''))
    if args.predict:
        nets = {'supernet (this config)': backbone}
        for name, arch in ARCHS.items():
            try:
                net = AtomNAS(arch=arch, in_channels=backbone.in_channels)
                from atomnas_mm.search.costs import LatencyCost
                LatencyCost(table).total(net)
            except ValueError:
                continue  # another geometry than the table's
            nets[name] = net.eval()
        for seed in range(args.subnets):
            nets[f'random sub-net {seed}'] = AtomNAS(
                arch=random_subnet(backbone, seed)).eval()
        print_rows(table, nets, args)


def layer_table(args, model, size):
    """The per-layer table of a model without an AtomNAS backbone (its
    channel units), measured or loaded, and ``--predict``."""
    import copy

    from atomnas_mm.search.costs import (FLOPsCost, LayerLatencyCost,
                                         latency_cost, search_root)
    from atomnas_mm.search.latency import (measure_layer_table,
                                           random_widths)
    from atomnas_mm.search.shrink import narrow_to_widths
    from atomnas_mm.search.units import SearchRefused, require_units
    if args.form or args.merge != 'merged':
        raise SystemExit('atom_latency_table.py: error: --form and --merge '
                         'describe AtomNAS blocks; this config has no '
                         'AtomNAS backbone (a per-layer table)')
    try:
        units, _ = require_units(model, where=args.config)
    except SearchRefused as e:
        raise SystemExit(f'atom_latency_table.py: error: {e}') from None
    align = args.align or (8 if args.runtime == 'onnxruntime' else 1)
    if args.table:
        try:
            cost = latency_cost(args.table)
        except ValueError as e:
            raise SystemExit(f'atom_latency_table.py: error: {e}') from None
        if not isinstance(cost, LayerLatencyCost):
            raise SystemExit(f'atom_latency_table.py: error: {args.table} is '
                             'a per-block table (AtomNAS); this config has no '
                             'AtomNAS backbone')
        table = cost.table
        align = args.align or table.get('step', 1)
    else:
        shape = FLOPsCost(size).input_shape(search_root(model))
        table = measure_layer_table(
            model, (args.batch, ) + shape[1:], args.device, args.runtime,
            args.samples, align, args.min_run_time, args.threads,
            units=units, calibrate=0 if args.no_calibrate else 3)
        with open(args.out, 'w') as f:
            json.dump(table, f, indent=1)
        print(f'{args.out}: {len(table["layers"])} layers of '
              f'{len(units)} channel units, {table["runtime"]} '
              f'({table["threads"]} threads), device {table["device"]}, '
              f'input {table["input_shape"]}, widths multiples of {align}; '
              f'whole {table["model_ms"]:.3f} ms = fixed '
              f'{table["fixed_ms"]:.3f} + layers {table["layers_ms"]:.3f} '
              f'(scaled by {table["scale"]:.3f})')
    if args.predict:
        nets = {'full model (this config)': search_root(model)}
        for seed in range(args.subnets):
            net = copy.deepcopy(model)
            narrow_to_widths(net, random_widths(model, seed, align))
            nets[f'random sub-net {seed}'] = search_root(net)
        print_rows(table, nets, args)


def print_rows(table, nets, args):
    """Predicted vs measured latency of ``nets`` by ``table``."""
    from atomnas_mm.search.latency import compare
    rows = compare(table, nets, args.device,
                   min_run_time=2 * args.min_run_time)
    print(f'measured whole in {table.get("runtime", "torch")} '
          f'({table.get("threads", "?")} threads)')
    print(f'{"net":28s} {"predicted ms":>12s} {"measured ms":>12s} '
          f'{"error":>7s}')
    for name, predicted, measured in rows:
        print(f'{name:28s} {predicted:12.3f} {measured:12.3f} '
              f'{(predicted - measured) / measured:+7.1%}')

if __name__ == '__main__':
    main()
