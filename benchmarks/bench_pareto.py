"""Budget search vs baselines of the same FLOPs (accuracy vs FLOPs).

At demo scale (configs/demo/atomnas_fashion_mnist_target.py, Fashion-MNIST),
for FLOPs targets given as fractions of the demo supernet's backbone
multiply-adds (1x1x28x28) and several seeds, trains through the mmengine
Runner, in-process:

* search: the supernet with BNL1PenaltyHook and AtomShrinkHook with
  ``target=dict(flops=T)`` (the budget controller); its own final top-1
  (the EMA weights after BN re-calibration, validated after the final
  shrink, as the demo reports);
* uniform: the supernet with every kernel group's width scaled by one
  factor, found by bisection so the backbone has the searched net's FLOPs;
* k3: a kernel-3-only net (each searchable block one 3x3 group, its width a
  single factor of the block's total width) with the same FLOPs;
* retrain (``--methods ... retrain``): each seed's searched arch trained
  from scratch, to tell the architecture from the one-pass training.

The baselines are trained with the same recipe and length minus the search
(AtomShrinkHook dropped, BNL1PenaltyHook at ``rho=0``: only the weight decay
term the demo recipe keeps in that hook). The recipe is the demo's, shortened
to ``--epochs`` on the first ``--images`` training images (default 4 x 15360,
480 iterations, a quarter of the demo's); iteration counts in the recipe (LR
warmup, penalty ramp, shrink interval) are scaled with the run length. The
search keeps the config's threshold (1e-3) and rho (3e-3; ``--threshold`` /
``--rho`` override them): the penalty is a proximal step with a target, so
atoms die when the controller asks, the net is on the target by the
deadline (half of training) and fine-tunes without penalty after.
Validation on the Fashion-MNIST test set (``--val-images``) at the end only.
One torch thread per run (``--threads``). Prints one table (landing error, top-1 mean and
spread over seeds) and writes an accuracy-vs-FLOPs plot.

    .venv/bin/python benchmarks/bench_pareto.py --quick        # ~2 min
    .venv/bin/python benchmarks/bench_pareto.py --json r.json  # ~26 min
    .venv/bin/python benchmarks/bench_pareto.py --epochs 4 --images 60000 \
        --targets 0.15 --seeds 0 --methods uniform retrain    # whole demo
    .venv/bin/python benchmarks/bench_pareto.py --latency-only # latency target

``--latency`` (or ``--latency-only``) also measures a latency table of the
demo supernet on this CPU (``tools/analysis_tools/atom_latency_table.py``,
batch 1, 28 px), runs the search with ``target=dict(latency_ms=...)`` at
``--latency-fraction`` of the supernet's predicted latency (the middle of
the reachable range when that is out of it), and prints the searched net's
predicted vs measured latency (interleaved with the supernet's, median of
``--latency-reps``). ``--latency-runtime onnxruntime`` measures the table
and the nets in ONNX Runtime (``--threads`` intra-op threads, each block
exported alone in the form ``pytorch2onnx.py`` writes: kernel groups in
parts padded to 16 channels; ``--latency-align`` another padding).
"""
import argparse
import copy
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
SEARCH_CONFIG = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist_target.py')
SIZE = 28
METHODS = ('search', 'uniform', 'k3', 'retrain')

import atomnas_mm  # noqa: E402,F401
from demo_recipe import short_recipe  # noqa: E402
from demo_recipe import train as train_recipe  # noqa: E402
from atomnas_mm.export import inject_archs  # noqa: E402
from atomnas_mm.models import AtomNAS, count_flops_params  # noqa: E402
from atomnas_mm.search.shrink import find_backbones  # noqa: E402


# -- architectures ------------------------------------------------------------
_FLOPS = {}


def backbone_flops(arch):
    """Multiply-adds of the AtomNAS backbone of ``arch`` at 1x1x28x28."""
    key = json.dumps(arch, sort_keys=True)
    if key not in _FLOPS:
        _FLOPS[key] = count_flops_params(AtomNAS(arch=copy.deepcopy(arch)),
                                         (1, 1, SIZE, SIZE))[0]
    return _FLOPS[key]


def supernet_arch():
    """The demo supernet's complete arch dict (rows expanded)."""
    cfg = Config.fromfile(SEARCH_CONFIG)
    backbone = cfg.model.backbone
    return AtomNAS(arch=copy.deepcopy(backbone.arch.to_dict()),
                   in_channels=backbone.in_channels).arch_dict()


def thinned(arch, factor):
    """Every searchable kernel group's width times ``factor`` (>= 1)."""
    arch = copy.deepcopy(arch)
    for row in arch['rows']:
        if row[5]:  # has_expand: a searchable block
            row[4] = [max(1, round(h * factor)) for h in row[4]]
    return arch


def kernel3(arch, factor):
    """Each searchable block one 3x3 group of ``factor`` x its total width."""
    arch = copy.deepcopy(arch)
    for row in arch['rows']:
        if row[5]:
            row[3], row[4] = [3], [max(1, round(sum(row[4]) * factor))]
    return arch


def match_flops(make, goal, high=1.0, steps=24):
    """The arch ``make(f)`` whose FLOPs are closest to ``goal`` (bisection on
    f; FLOPs grow with f). Returns ``(arch, factor, flops)``."""
    while backbone_flops(make(high)) < goal:
        high *= 2
    low = 0.0
    for _ in range(steps):
        mid = (low + high) / 2
        if backbone_flops(make(mid)) < goal:
            low = mid
        else:
            high = mid
    candidates = [(abs(backbone_flops(make(f)) - goal), f)
                  for f in (low, high)]
    factor = min(candidates)[1]
    arch = make(factor)
    return arch, factor, backbone_flops(arch)


# -- runs ---------------------------------------------------------------------
def recipe_cfg(args, work_dir, seed):
    """The demo target config, shortened (see the module docstring)."""
    cfg, scale = short_recipe(SEARCH_CONFIG, work_dir, seed, args.epochs,
                              args.images, args.val_images, args.workers)
    for hook in cfg.custom_hooks:
        if hook.type.endswith('BNL1PenaltyHook'):
            hook.pop('warmup_epochs', None)
            hook.warmup_iters = round(0.5 * 469 * scale)
            if args.rho is not None:
                hook.rho = args.rho
        elif hook.type.endswith('AtomShrinkHook') and \
                args.threshold is not None:
            hook.threshold = args.threshold
    return cfg


def search_cfg(args, work_dir, seed, target, latency_table=None):
    """The budget search with ``target`` (a dict) on AtomShrinkHook."""
    cfg = recipe_cfg(args, work_dir, seed)
    for hook in cfg.custom_hooks:
        if hook.type.endswith('AtomShrinkHook'):
            hook.target = target
            if latency_table is not None:
                hook.latency_table = latency_table
    return cfg


def baseline_cfg(args, work_dir, seed, arch):
    """``arch`` trained with the same recipe: no shrinking, no penalty
    (BNL1PenaltyHook at rho=0 keeps the recipe's weight decay)."""
    cfg = recipe_cfg(args, work_dir, seed)
    inject_archs(cfg.model, {'backbone': copy.deepcopy(arch)})
    hooks = []
    for hook in cfg.custom_hooks:
        if hook.type.endswith('AtomShrinkHook'):
            continue
        if hook.type.endswith('BNL1PenaltyHook'):
            hook = dict(type=hook.type, rho=0,
                        weight_decay=hook.weight_decay)
        hooks.append(hook)
    cfg.custom_hooks = hooks
    return cfg


def train(cfg, extra_hooks=()):
    """Train; return top-1, backbone FLOPs, arch and wall seconds."""
    runner, top1, seconds = train_recipe(cfg, extra_hooks)
    model = runner.model.module if hasattr(runner.model, 'module') \
        else runner.model
    backbone = next(iter(find_backbones(model).values()))
    result = dict(top1=top1,
                  flops=count_flops_params(backbone, (1, 1, SIZE, SIZE))[0],
                  arch=backbone.arch_dict(), seconds=seconds,
                  iters=runner.max_iters)
    shrink = [h for h in runner.hooks if type(h).__name__ == 'AtomShrinkHook']
    if shrink and shrink[0].planner.controller is not None:
        # When the penalty brought the net within tolerance: before the
        # end, or only by the final shrink (which then cuts live atoms).
        controller, history = shrink[0].planner.controller, shrink[0].history
        limit = controller.target * (1 + controller.tolerance)
        result['reached_iter'] = next(
            (h['iter'] for h in history if h['cost'] <= limit), None)
        result['history'] = [(h['iter'], h['flops'], h['cost'])
                             for h in history]
    del runner
    return result, backbone


# -- the FLOPs benchmark ------------------------------------------------------
def run_flops(args, tmp, log):
    supernet = supernet_arch()
    super_flops = backbone_flops(supernet)
    runs = []
    for fraction in args.targets:
        target = fraction * super_flops
        searched = []
        for seed in args.seeds:
            result, _ = train(search_cfg(
                args, osp.join(tmp, f'search_{fraction}_{seed}'), seed,
                dict(flops=target)))
            result.update(method='search', fraction=fraction, target=target,
                          seed=seed)
            runs.append(result)
            searched.append(result)
            log(result)
        for found in searched if 'retrain' in args.methods else []:
            seed = found['seed']
            result, _ = train(baseline_cfg(
                args, osp.join(tmp, f'retrain_{fraction}_{seed}'), seed,
                found['arch']))
            result.update(method='retrain', fraction=fraction, target=target,
                          seed=seed)
            runs.append(result)
            log(result)
        goal = statistics.mean(r['flops'] for r in searched)
        for method, make in (('uniform', lambda f: thinned(supernet, f)),
                             ('k3', lambda f: kernel3(supernet, f))):
            if method not in args.methods:
                continue
            arch, factor, flops = match_flops(make, goal)
            for seed in args.seeds:
                result, _ = train(baseline_cfg(
                    args, osp.join(tmp, f'{method}_{fraction}_{seed}'), seed,
                    arch))
                result.update(method=method, fraction=fraction, target=target,
                              seed=seed, factor=factor)
                assert result['flops'] == flops
                runs.append(result)
                log(result)
    return super_flops, runs


def summarise(super_flops, runs):
    """Table rows and the goal lines."""
    rows, lines, means = [], [], {}
    for fraction in sorted({r['fraction'] for r in runs}):
        for method in METHODS:
            group = [r for r in runs if r['fraction'] == fraction
                     and r['method'] == method]
            if not group:
                continue
            target = group[0]['target']
            top1 = [r['top1'] for r in group]
            errors = [(r['flops'] - target) / target * 100 for r in group]
            mean = statistics.mean(top1)
            means[fraction, method] = mean
            spread = (max(top1) - min(top1)) / 2
            rows.append([
                f'{target / 1e6:.3f}M ({fraction:.0%})', method,
                '/'.join(f'{r["flops"] / 1e6:.3f}' for r in group),
                '/'.join(f'{e:+.2f}' for e in errors),
                f'{mean:.2f} +- {spread:.2f}',
                '/'.join(f'{t:.2f}' for t in top1),
                '/'.join(str(r['reached_iter']) for r in group)
                + f' of {group[0]["iters"]}' if method == 'search' else '-',
                f'{statistics.mean(r["seconds"] for r in group):.0f}'])
    search = [r for r in runs if r['method'] == 'search']
    worst = max(abs(r['flops'] - r['target']) / r['target'] for r in search)
    lines.append(f'landing: worst |searched - target| / target = '
                 f'{worst:.2%}; goal every target within 2% -> '
                 f'{"met" if worst <= 0.02 else "NOT met"}')
    tight = min(r['fraction'] for r in runs)
    for method in ('uniform', 'k3'):
        if (tight, method) in means:
            gap = means[tight, 'search'] - means[tight, method]
            goal = ' (goal >= 1 point -> ' + (
                'met)' if gap >= 1 else 'NOT met)') if method == 'uniform' \
                else ''
            lines.append(f'tightest budget ({tight:.0%}): search - {method} '
                         f'= {gap:+.2f} top-1 points{goal}')
    for fraction in sorted({r['fraction'] for r in runs})[1:]:
        search = means[fraction, 'search']
        gaps = ', '.join(f'search - {m} = {search - means[fraction, m]:+.2f}'
                         for m in ('uniform', 'k3') if (fraction, m) in means)
        if gaps:
            lines.append(f'{fraction:.0%}: {gaps}')
    return rows, lines


def plot(super_flops, runs, path, title):
    """Top-1 vs backbone MFLOPs: every run, and the mean per method."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = dict(search=('tab:red', 'o', 'budget search (own final)'),
                  uniform=('tab:blue', 's', 'uniformly thinned supernet'),
                  k3=('tab:green', '^', 'kernel-3-only net'),
                  retrain=('tab:purple', 'D', 'searched arch, from scratch'))
    for method, (color, marker, label) in styles.items():
        group = [r for r in runs if r['method'] == method]
        if not group:
            continue
        ax.scatter([r['flops'] / 1e6 for r in group],
                   [r['top1'] for r in group], color=color, marker=marker,
                   alpha=0.35, s=18)
        means = []
        for fraction in sorted({r['fraction'] for r in group}):
            sub = [r for r in group if r['fraction'] == fraction]
            means.append((statistics.mean(r['flops'] for r in sub) / 1e6,
                          statistics.mean(r['top1'] for r in sub)))
        ax.plot(*zip(*means), color=color, marker=marker, label=label)
    for fraction in sorted({r['fraction'] for r in runs}):
        ax.axvline(fraction * super_flops / 1e6, color='grey', lw=0.6,
                   ls=':')
    ax.set_xlabel('backbone multiply-adds (M), 1x28x28; dotted: targets')
    ax.set_ylabel('Fashion-MNIST test top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- the latency target -------------------------------------------------------
def uptime():
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return 'uptime unavailable'


def run_latency(args, tmp):
    """Measure a table, search at a latency target, measure the result."""
    from atomnas_mm.search.costs import LatencyCost
    from atomnas_mm.search.latency import measure_net_ms, one_atom_ms
    from atomnas_mm.search.shrink import width_cost_of
    tool = osp.join(ROOT, 'tools/analysis_tools/atom_latency_table.py')
    table = args.latency_table or osp.join(tmp, 'latency_cpu.json')
    if osp.isfile(table):
        print(f'\nlatency table: {table} (kept from an earlier run)')
    else:
        print(f'\nlatency table ({uptime()})', flush=True)
        subprocess.run([sys.executable, tool, SEARCH_CONFIG, '--device',
                        'cpu', '--batch', '1', '--shape', str(SIZE), '--out',
                        table, '--runtime', args.latency_runtime,
                        '--threads', str(args.threads), '--samples',
                        str(args.latency_samples)] + (
                            ['--align', str(args.latency_align)]
                            if args.latency_align else []), check=True)
    print(f'predicted vs measured, sub-nets ({uptime()}):', flush=True)
    subprocess.run([sys.executable, tool, SEARCH_CONFIG, '--table', table,
                    '--predict'], check=True)
    cost = LatencyCost(table)
    supernet = AtomNAS(arch=supernet_arch())
    widths = width_cost_of(supernet, cost)
    low, high = widths.smallest(), widths.total
    target = args.latency_fraction * high
    print(f'predicted supernet {high:.3f} ms; reachable by the search '
          f'[{low:.3f}, {high:.3f}] ms (table)')
    kept = one_atom_ms(cost, supernet)
    print(f'every block kept at one atom: {kept:.3f} ms (below it only '
          'emptying whole residual blocks, steps the budget cannot land on)')
    if not kept <= target <= high:
        print(f'{args.latency_fraction} x supernet = {target:.3f} ms is not '
              f'in [{kept:.3f}, {high:.3f}]: the target is its middle instead')
        target = (kept + high) / 2
    cfg = search_cfg(args, osp.join(tmp, 'search_latency'), args.seeds[0],
                     dict(latency_ms=target), latency_table=table)
    result, backbone = train(cfg)
    print('shrinks (iter, MFLOPs, predicted ms): ' + ', '.join(
        f'({i}, {f / 1e6:.3f}, {c:.3f})' for i, f, c in result['history']))
    measured = dict(searched=[], supernet=[])
    for _ in range(args.latency_reps):  # interleaved, median
        measured['searched'].append(measure_net_ms(cost.table, backbone.eval(),
                                                   min_run_time=0.5))
        measured['supernet'].append(measure_net_ms(cost.table, supernet.eval(),
                                                   min_run_time=0.5))
    med = {k: statistics.median(v) for k, v in measured.items()}
    predicted = cost.total(backbone.eval())
    print(f'\n### latency target, batch 1, 28 px, CPU, '
          f'{cost.table.get("runtime", "torch")} (kernel groups: '
          f'{cost.table.get("form", "merged")}, padded to '
          f'{cost.table.get("align", 1)}; {cost.table.get("threads")} '
          f'threads; {uptime()})\n')
    print('| net | backbone MFLOPs | predicted ms | measured ms (median of '
          f'{args.latency_reps}) | predicted vs measured |')
    print('|---|---|---|---|---|')
    print(f'| supernet | {backbone_flops(supernet.arch_dict()) / 1e6:.3f} | '
          f'{cost.total(supernet):.3f} | {med["supernet"]:.3f} | '
          f'{(cost.total(supernet) - med["supernet"]) / med["supernet"]:+.1%}'
          ' |')
    print(f'| searched (target {target:.3f} ms) | {result["flops"] / 1e6:.3f} '
          f'| {predicted:.3f} | {med["searched"]:.3f} | '
          f'{(predicted - med["searched"]) / med["searched"]:+.1%} |')
    err = (med['searched'] - target) / target
    print(f'\nsearched top-1 {result["top1"]:.2f}; measured latency vs target '
          f'{err:+.1%}; goal within 10% -> '
          f'{"met" if abs(err) <= 0.10 else "NOT met"}; predicted vs target '
          f'{(predicted - target) / target:+.2%}')
    print('searched rows:', json.dumps(result['arch']['rows']))


# -- main ---------------------------------------------------------------------
def log_run(start):
    def log(r):
        print(f'{r["method"]:8s} target {r["fraction"]:.0%} seed '
              f'{r["seed"]}: {r["flops"] / 1e6:.3f}M FLOPs, top-1 '
              f'{r["top1"]:.2f}, {r["seconds"]:.0f} s '
              f'(t={time.perf_counter() - start:.0f} s)' + (
                  f'; within tolerance from iter {r["reached_iter"]} of '
                  f'{r["iters"]}' if 'reached_iter' in r else '')
              + f'; widths {[row[4] for row in r["arch"]["rows"]]}',
              flush=True)
    return log


def report(args, super_flops, runs):
    """Print the table and the goal lines, write the plot (and JSON)."""
    from _timing import print_table
    rows, lines = summarise(super_flops, runs)
    title = (f'demo supernet {super_flops / 1e6:.3f}M; {args.epochs} epochs x '
             f'{args.images} images; seeds {sorted({r["seed"] for r in runs})}'
             f'\nsearch threshold {args.threshold or "1e-3 (demo)"}, rho '
             f'{args.rho or "3e-3 (demo)"}')
    print_table(['target', 'method', 'backbone MFLOPs (per seed)',
                 'vs target % (per seed)', 'top-1 mean +- half range',
                 'top-1 per seed', 'search at target from iter', 's/run'],
                rows, title=title.replace('\n', '; '))
    print()
    for line in lines:
        print(line)
    plot(super_flops, runs, args.out, title)
    print(f'plot: {args.out}')
    if args.json and not args.from_json:
        with open(args.json, 'w') as f:
            json.dump(dict(super_flops=super_flops, runs=runs), f, indent=1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='one target (15%%), one seed, 2 epochs x 7680 '
                        'images, 2k test images')
    parser.add_argument('--targets', type=float, nargs='+',
                        default=[0.15, 0.3, 0.5],
                        help='FLOPs targets, fractions of the supernet')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--methods', nargs='*', default=['uniform', 'k3'],
                        choices=METHODS[1:], help='baselines to train '
                        '(retrain: each seed\'s searched arch from scratch)')
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--images', type=int, default=15360,
                        help='first N Fashion-MNIST training images')
    parser.add_argument('--val-images', type=int, default=10000)
    parser.add_argument('--threshold', type=float,
                        help='death threshold of the search (default: the '
                        'config\'s, 1e-3)')
    parser.add_argument('--rho', type=float,
                        help='starting penalty strength of the search '
                        '(default: the config\'s, 3e-3); the controller '
                        'scales it by 1e-3..1e3')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (training and timing)')
    parser.add_argument('--out', default=osp.join(ROOT, 'docs/pareto.png'))
    parser.add_argument('--json', help='write every run here')
    parser.add_argument('--from-json', help='table and plot from a --json '
                        'file of an earlier run (give its recipe flags too)')
    parser.add_argument('--latency', action='store_true',
                        help='also run the latency target')
    parser.add_argument('--latency-only', action='store_true')
    parser.add_argument('--latency-fraction', type=float, default=0.5)
    parser.add_argument('--latency-reps', type=int, default=5)
    parser.add_argument('--latency-table', help='where to keep the table '
                        '(an existing file is used as it is)')
    parser.add_argument('--latency-runtime', default='torch',
                        choices=['torch', 'onnxruntime'])
    parser.add_argument('--latency-align', type=int, default=None,
                        help='kernel groups of the deployed net padded to a '
                        'multiple of this width (table and measurement; '
                        'default: the tool\'s, 16 for onnxruntime as '
                        'pytorch2onnx.py exports)')
    parser.add_argument('--latency-samples', type=int, default=4,
                        help='widths per kernel curve of the table')
    args = parser.parse_args()
    if args.quick:
        args.targets, args.seeds = args.targets[:1], args.seeds[:1]
        args.epochs, args.images, args.val_images = 2, 7680, 2000
    return args


def main():
    args = parse_args()
    # One intra-op thread: on a shared 2-core machine two threads per
    # process oversubscribe the cores (measured 8x slower under load 8).
    torch.set_num_threads(args.threads)
    os.environ['OMP_NUM_THREADS'] = str(args.threads)  # the tool's timing
    start = time.perf_counter()
    print(f'recipe: {args.epochs} epochs x {args.images} images, batch 128, '
          f'val {args.val_images} test images; search threshold '
          f'{args.threshold or "demo"}, rho {args.rho or "demo"}; targets '
          f'{args.targets}, seeds {args.seeds}; {uptime()}', flush=True)
    with tempfile.TemporaryDirectory(prefix='bench_pareto_') as tmp:
        if not args.latency_only:
            if args.from_json:
                with open(args.from_json) as f:
                    saved = json.load(f)
                super_flops, runs = saved['super_flops'], saved['runs']
            else:
                super_flops, runs = run_flops(args, tmp, log_run(start))
            report(args, super_flops, runs)
        if args.latency or args.latency_only:
            run_latency(args, tmp)
    print(f'\ntotal {time.perf_counter() - start:.0f} s; {uptime()}')


if __name__ == '__main__':
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    main()
