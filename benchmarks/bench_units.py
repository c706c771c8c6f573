"""Channel-unit search vs Torch-Pruning and width scaling (issue 18).

On the Fashion-MNIST demo data, for a stock mmpretrain network
(``--config mbv2``: configs/demo/mobilenet-v2_fashion_mnist.py, MobileNetV2
1.0; ``--config r18``: configs/demo/resnet-18_fashion_mnist.py, ResNet-18),
FLOPs targets given as fractions of the full backbone's multiply-adds
(``atomnas_mm.models.count_flops_params(model.backbone, (1, C, 28, 28))``,
C the stem's input channels: 3 for MobileNetV2, 1 for ResNet-18) and
several seeds, trains through the mmengine Runner, in-process, and reports
the final top-1 (EMA weights after BN re-calibration, whole test set) of:

* full: the unpruned network (a reference; one seed, the first);
* scaled: a width-scaled network trained from scratch with the same recipe.
  MobileNetV2: ``widen_factor`` bisected so the backbone's FLOPs are the
  closest to the target (mmpretrain rounds every width to a multiple of 8
  and keeps the last conv at 1280 channels for factors <= 1, so the steps
  are coarse; ``--scaled-rules below`` also trains the widest net at most
  the target). ResNet-18:
  the stock width arguments ``base_channels = stem_channels = b`` (every
  stage's width b, 2b, 4b, 8b, the head's input 8b), the integer b whose
  FLOPs are the closest to the target;
* tp_bn / tp_l1: Torch-Pruning (``torch_pruning`` 1.6, MetaPruner) the way
  its users do it in one run of the same length: the first half of the
  recipe on the full network, then at that iteration the network is pruned
  to the target with ``BNScaleImportance`` resp. ``MagnitudeImportance(p=1)``,
  and fine-tuned for the second half with the schedule continuing (the
  optimizer keeps its hyper-parameters and learning-rate schedule but its
  state and parameter list are rebuilt on the pruned model, the EMA copy is
  rebuilt from the pruned model). The pruning ratio is bisected (on copies)
  so the pruned backbone's FLOPs are the closest to the target. Two settings
  (``--tp-modes``): ``local`` (one ratio for every layer) and ``global``
  (global ranking, at most 0.7 of any layer removed). The backbone alone is
  pruned: the classifier (``head``) and the backbone's last conv (the
  channels the head reads: MobileNetV2's 1280, ResNet-18's 512 residual
  channels) are TP ``ignored_layers``; the stem's input channels have no
  producer and stay. With ``--tp-select first-seed`` (default) both modes
  run on the first seed and the better one on the other seeds;
* search: when ``<config>_search.py`` exists beside the base config (the
  search hooks on top of it), that config with its AtomShrinkHook's
  ``target=dict(flops=fraction * full)``; its final top-1 and the backbone
  FLOPs it ended with. Skipped with a message while the file is missing.

Recipe (benchmarks/demo_recipe.py, as bench_pareto.py): the demo config shortened to
``--epochs`` (4) on the first ``--images`` (15360) training images, batch
128: 480 iterations. Iteration counts of the config are scaled by the run
length over the demo's (4 x 469): the LR warm-up (100 -> 26 iterations) and
a search's AtomShrinkHook ``interval``; epoch-based counts (cosine over 4
epochs, a penalty ramp in epochs) follow the shortened epoch by themselves.
Validation at the end only; one torch thread per run; logs off.

    .venv/bin/python benchmarks/bench_units.py --config mbv2 \\
        --json benchmarks/results/units_baselines_mbv2.json
    .venv/bin/python benchmarks/bench_units.py --config r18 --fractions 0.3 \\
        --json benchmarks/results/units_baselines_r18.json
    .venv/bin/python benchmarks/bench_units.py --config r18 --methods search \
        --cfg-options model.backbone.zero_init_residual=False \
        --label zero_init_residual=False --json variant.json
    .venv/bin/python benchmarks/bench_units.py --from-json a.json b.json

``--json`` is written after every run and read first: runs already in it
(same method, mode, variant label, fraction, seed) are not trained again,
so an interrupted or split benchmark continues; ``--from-json`` merges
files and prints. A variant of the search that ``--cfg-options`` cannot
write (e.g. other finders) is a search config beside a copy of the base
config: ``--config /tmp/variant/resnet-18_fashion_mnist.py`` with
``/tmp/variant/resnet-18_fashion_mnist_search.py``.
"""
import argparse
import copy
import json
import os
import os.path as osp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch import nn
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = dict(
    mbv2=osp.join(ROOT, 'configs/demo/mobilenet-v2_fashion_mnist.py'),
    r18=osp.join(ROOT, 'configs/demo/resnet-18_fashion_mnist.py'))
SIZE = 28
METHODS = ('full', 'scaled', 'tp_bn', 'tp_l1', 'search')
TP_MAX_RATIO = 0.7  # the per-layer cap of the "global" setting

import atomnas_mm  # noqa: E402,F401
from demo_recipe import iterations as recipe_iterations  # noqa: E402
from demo_recipe import short_recipe  # noqa: E402
from demo_recipe import train as train_recipe  # noqa: E402
from atomnas_mm.models import count_flops_params  # noqa: E402


def uptime():
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return 'uptime unavailable'


# -- models -------------------------------------------------------------------
def build_backbone(cfg_backbone):
    from mmpretrain.registry import MODELS
    return MODELS.build(copy.deepcopy(cfg_backbone))


def in_channels(backbone):
    """Input channels of the backbone's first conv."""
    return next(m for m in backbone.modules()
                if isinstance(m, nn.Conv2d)).in_channels


def backbone_flops(backbone):
    return count_flops_params(
        backbone, (1, in_channels(backbone), SIZE, SIZE))[0]


def pick(candidates, goal, rule):
    """The ``(flops, setting)`` candidate by ``rule``: the FLOPs closest to
    ``goal``, or the largest at most ``goal`` ('below')."""
    if rule == 'below':
        return max(c for c in candidates if c[0] <= goal)
    return min(candidates, key=lambda c: abs(c[0] - goal))


def scaled_model(model_cfg, goal, rule='closest'):
    """``(model_cfg, description, flops)`` of the width-scaled net whose
    backbone FLOPs are the closest to ``goal`` (``rule='below'``: the
    largest at most ``goal``)."""
    kind = model_cfg.backbone.type.split('.')[-1]
    model_cfg = copy.deepcopy(model_cfg)
    if kind == 'MobileNetV2':
        def flops(f):
            return backbone_flops(build_backbone(
                dict(model_cfg.backbone, widen_factor=f)))
        low, high = 0.0, 1.0
        for _ in range(20):
            mid = (low + high) / 2
            if flops(mid) < goal:
                low = mid
            else:
                high = mid
        factor = pick([(flops(f), f) for f in (low, high)], goal, rule)[1]
        model_cfg.backbone.widen_factor = factor
        return model_cfg, f'widen_factor={factor:.4f}', flops(factor)
    if kind in ('ResNet', 'ResNetV1c', 'ResNetV1d'):
        def flops(b):
            return backbone_flops(build_backbone(
                dict(model_cfg.backbone, base_channels=b, stem_channels=b)))
        base = pick([(flops(b), b) for b in range(1, 129)], goal, rule)[1]
        model_cfg.backbone.base_channels = base
        model_cfg.backbone.stem_channels = base
        model_cfg.head.in_channels = base * 8  # BasicBlock: expansion 1
        return model_cfg, f'base_channels=stem_channels={base}', flops(base)
    raise ValueError(f'scaled: no width rule for backbone {kind}')


# -- Torch-Pruning ------------------------------------------------------------
def tp_importance(method):
    import torch_pruning as tp
    if method == 'tp_bn':
        return tp.importance.BNScaleImportance()
    return tp.importance.MagnitudeImportance(p=1)


def tp_pruner(model, method, mode, ratio):
    """A MetaPruner on the whole classifier that prunes the backbone only."""
    import torch_pruning as tp
    backbone = model.backbone
    last_conv = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)][-1]
    example = torch.randn(1, in_channels(backbone), SIZE, SIZE,
                          device=next(model.parameters()).device)
    return tp.pruner.MetaPruner(
        model, example, importance=tp_importance(method),
        global_pruning=mode == 'global', pruning_ratio=ratio,
        max_pruning_ratio=TP_MAX_RATIO if mode == 'global' else 1.0,
        ignored_layers=[model.head, last_conv])


def tp_ratio(model, method, mode, goal, steps=14):
    """The pruning ratio whose pruned backbone has the FLOPs closest to
    ``goal`` (bisection on copies of ``model``). Returns (ratio, flops)."""
    cache = {}

    def flops(ratio):
        if ratio not in cache:
            trial = copy.deepcopy(model)
            tp_pruner(trial, method, mode, ratio).step()
            cache[ratio] = backbone_flops(trial.backbone)
        return cache[ratio]

    low, high = 0.0, 0.99
    for _ in range(steps):
        mid = (low + high) / 2
        if flops(mid) > goal:
            low = mid
        else:
            high = mid
    ratio = min((abs(flops(r) - goal), r) for r in (low, high))[1]
    return ratio, flops(ratio)


class TorchPruningHook(Hook):
    """Prune ``runner.model`` at iteration ``at`` (after that iteration's EMA
    update); rebuild the optimizer's state and parameter list (its learning
    rate and schedule go on) and the EMA copy on the pruned model."""

    priority = 'LOW'

    def __init__(self, at, method, mode, goal):
        self.at, self.method, self.mode, self.goal = at, method, mode, goal
        self.info = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 != self.at:
            return
        from mmengine.hooks import EMAHook
        from mmengine.model import is_model_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        before = backbone_flops(model.backbone)
        ratio, predicted = tp_ratio(model, self.method, self.mode, self.goal)
        tp_pruner(model, self.method, self.mode, ratio).step()
        after = backbone_flops(model.backbone)
        assert after == predicted, (after, predicted)
        optimizer = runner.optim_wrapper.optimizer
        if len(optimizer.param_groups) != 1:
            raise NotImplementedError('TorchPruningHook: one param group')
        optimizer.param_groups[0]['params'] = [
            p for p in model.parameters() if p.requires_grad]
        optimizer.state = defaultdict(dict)
        for hook in runner.hooks:
            if isinstance(hook, EMAHook):
                hook.before_run(runner)  # a new EMA copy of the pruned model
        for hook in runner.hooks:
            if type(hook).__name__ == 'MemoryFormatHook':
                hook.apply(runner)
        self.info = dict(prune_iter=self.at, ratio=ratio,
                         flops_before=before, flops_pruned=after)
        print(f'  {self.method}/{self.mode} at iter {self.at}: ratio '
              f'{ratio:.4f}, backbone {before / 1e6:.3f}M -> '
              f'{after / 1e6:.3f}M FLOPs', flush=True)


# -- runs ---------------------------------------------------------------------
def recipe_cfg(args, path, work_dir, seed):
    """The config at ``path``, shortened (see the module docstring)."""
    return short_recipe(path, work_dir, seed, args.epochs, args.images,
                        args.val_images, args.workers)[0]


def train(cfg, extra_hooks=()):
    """Train; return top-1, backbone FLOPs, wall seconds and iterations."""
    runner, top1, seconds = train_recipe(cfg, extra_hooks)
    model = runner.model.module if hasattr(runner.model, 'module') \
        else runner.model
    result = dict(top1=top1, flops=backbone_flops(model.backbone),
                  seconds=seconds, iters=runner.max_iters,
                  load=os.getloadavg()[0])
    del runner
    return result


def search_config(base):
    stem, ext = osp.splitext(base)
    return f'{stem}_search{ext}'


def plan(args, full_flops):
    """The runs to do, as dicts (method, mode, fraction, seed)."""
    runs = []
    if 'full' in args.methods:
        runs.append(dict(method='full', mode='-', fraction=1.0,
                         seed=args.seeds[0]))
    for fraction in args.fractions:
        for method in args.methods:
            if method == 'scaled':
                runs += [dict(method=method, mode=rule, fraction=fraction,
                              seed=s) for rule in args.scaled_rules
                         for s in args.seeds]
            elif method == 'search':
                runs += [dict(method=method, mode='-', fraction=fraction,
                              seed=s) for s in args.seeds]
            elif method.startswith('tp_'):
                for i, seed in enumerate(args.seeds):
                    modes = args.tp_modes if (
                        args.tp_select == 'all' or i == 0) else ['best']
                    runs += [dict(method=method, mode=m, fraction=fraction,
                                  seed=seed) for m in modes]
    return runs


def best_mode(done, method, fraction, modes, variant=None):
    """The TP mode with the best top-1 on the first seed it ran."""
    scored = [(r['top1'], r['mode']) for r in done
              if r['method'] == method and r['fraction'] == fraction
              and r['mode'] in modes and r.get('variant') == variant]
    return max(scored)[1] if scored else modes[0]


def key(r):
    return (r['config'], r['method'], r['mode'], r.get('variant'),
            r['fraction'], r['seed'])


def run_all(args, tmp, done, save):
    base = CONFIGS.get(args.config, args.config)
    name = osp.basename(base)
    cfg0 = Config.fromfile(base)
    full_flops = backbone_flops(build_backbone(cfg0.model.backbone))
    iters = recipe_iterations(args.epochs, args.images,
                              cfg0.train_dataloader.batch_size)
    print(f'{name}: full backbone {full_flops / 1e6:.3f}M multiply-adds at '
          f'1x{in_channels(build_backbone(cfg0.model.backbone))}x{SIZE}x'
          f'{SIZE}; {iters} iterations', flush=True)
    search_path = search_config(base)
    start = time.perf_counter()
    for job in plan(args, full_flops):
        method, mode, fraction, seed = (job['method'], job['mode'],
                                        job['fraction'], job['seed'])
        if mode == 'best':
            mode = best_mode(done, method, fraction, args.tp_modes,
                             args.label)
        if method == 'search' and args.round_to > 1:
            mode = f'round_to={args.round_to}'
        goal = fraction * full_flops
        record = dict(config=name, method=method, mode=mode,
                      fraction=fraction, seed=seed, target=goal,
                      full_flops=full_flops)
        if args.label:
            record['variant'] = args.label
        if any(key(r) == key(record) for r in done):
            continue
        work_dir = osp.join(tmp, f'{method}_{mode}_{fraction}_{seed}')
        extra = ()
        if method == 'search':
            if not osp.isfile(search_path):
                print(f'search: skipped, {osp.relpath(search_path, ROOT)} '
                      'does not exist yet', flush=True)
                continue
            cfg = recipe_cfg(args, search_path, work_dir, seed)
            shrink = [h for h in cfg.custom_hooks
                      if h.type.endswith('AtomShrinkHook')]
            if not shrink:
                raise ValueError(f'{search_path}: no AtomShrinkHook')
            shrink[0].target = dict(flops=goal)
            shrink[0].round_to = args.round_to
        else:
            cfg = recipe_cfg(args, base, work_dir, seed)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options, allow_list_keys=True)
        if method == 'scaled':
            cfg.model, record['width'], flops = scaled_model(cfg.model, goal,
                                                             mode)
        elif method.startswith('tp_'):
            hook = TorchPruningHook(iters // 2, method, mode, goal)
            extra = (hook, )
        result = train(cfg, extra)
        arch = osp.join(work_dir, 'searched_arch.json')
        if args.save_searched and osp.isfile(arch):
            os.makedirs(args.save_searched, exist_ok=True)
            shutil.copy(arch, osp.join(args.save_searched, f'{name}_{mode}_'
                                       f'{fraction}_{seed}.json'))
        if method == 'scaled':
            assert result['flops'] == flops, (result['flops'], flops)
        if extra:
            result.update(extra[0].info)
        record.update(result)
        done.append(record)
        save(done)
        print(f'{method:7s} {mode:6s} {fraction:.0%} seed {seed}: '
              f'{record["flops"] / 1e6:.3f}M FLOPs '
              f'({(record["flops"] - goal) / goal * 100:+.2f}% vs target), '
              f'top-1 {record["top1"]:.2f}, {record["seconds"]:.0f} s '
              f'(t={time.perf_counter() - start:.0f} s, load '
              f'{record["load"]:.1f})'
              + (f'; {record["width"]}' if 'width' in record else ''),
              flush=True)
    return done


# -- report -------------------------------------------------------------------
def table(runs):
    """Markdown table: one row per config, method, setting and fraction."""
    order = {m: i for i, m in enumerate(METHODS)}
    groups = defaultdict(list)
    for r in runs:
        mode = r['mode'] if 'variant' not in r else (
            r['variant'] if r['mode'] == '-' else
            f'{r["mode"]}, {r["variant"]}')
        groups[r['config'], r['fraction'], r['method'], mode].append(r)
    lines = ['| net | method | target | backbone MFLOPs (per seed) | vs '
             'target % | top-1 mean +- half range | top-1 per seed (seeds) | '
             's/run |', '|---|---|---|---|---|---|---|---|']
    for (config, fraction, method, mode), group in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                            order[kv[0][2]], kv[0][3])):
        group.sort(key=lambda r: r['seed'])
        top1 = [r['top1'] for r in group]
        label = method if mode == '-' else f'{method} ({mode})'
        if 'width' in group[0]:
            label += f', {group[0]["width"]}'
        lines.append(
            f'| {config.split("_")[0]} | {label} | '
            f'{group[0]["target"] / 1e6:.3f}M ({fraction:.0%}) | '
            + '/'.join(f'{r["flops"] / 1e6:.3f}' for r in group) + ' | '
            + '/'.join(f'{(r["flops"] - r["target"]) / r["target"] * 100:+.1f}'
                       for r in group) + ' | '
            f'{statistics.mean(top1):.2f} +- '
            f'{(max(top1) - min(top1)) / 2:.2f} | '
            + '/'.join(f'{t:.2f}' for t in top1)
            + f' ({",".join(str(r["seed"]) for r in group)}) | '
            f'{statistics.mean(r["seconds"] for r in group):.0f} |')
    return '\n'.join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='mbv2',
                        help='mbv2, r18 or a base config path')
    parser.add_argument('--fractions', type=float, nargs='+',
                        default=[0.15, 0.3],
                        help='FLOPs targets, fractions of the full backbone')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--methods', nargs='+', default=list(METHODS),
                        choices=METHODS)
    parser.add_argument('--tp-modes', nargs='+', default=['local', 'global'],
                        choices=['local', 'global'])
    parser.add_argument('--tp-select', default='first-seed',
                        choices=['first-seed', 'all'],
                        help='first-seed: every TP mode on the first seed, '
                        'the better one on the other seeds; all: every mode '
                        'on every seed')
    parser.add_argument('--scaled-rules', nargs='+', default=['closest'],
                        choices=['closest', 'below'],
                        help='scaled: the width whose FLOPs are the closest '
                        'to the target, and/or the largest at most it (the '
                        'stock width rounding is coarse: MobileNetV2 has no '
                        'widen_factor between 0.665M and 1.012M at 15%%)')
    parser.add_argument('--round-to', type=int, default=1,
                        help='the search\'s AtomShrinkHook round_to (its '
                        'runs are labelled round_to=N when N > 1)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of every run\'s config, as in '
                        'tools/train.py (e.g. custom_hooks.1.rho=1e-3 for '
                        'a search, model.backbone.zero_init_residual=False)')
    parser.add_argument('--label', help='a variant\'s name, recorded with '
                        'its runs and shown in the table (with --cfg-options, '
                        'so --json tells them from the default runs)')
    parser.add_argument('--save-searched', metavar='DIR',
                        help='copy each search\'s searched_arch.json (its '
                        'widths) to DIR')
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--images', type=int, default=15360,
                        help='first N Fashion-MNIST training images')
    parser.add_argument('--val-images', type=int, default=10000)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads')
    parser.add_argument('--json', help='runs are read from and written to '
                        'this file (after every run)')
    parser.add_argument('--from-json', nargs='+',
                        help='print the table of these files (merged)')
    return parser.parse_args()


def main():
    args = parse_args()
    if args.from_json:
        runs = {}
        for path in args.from_json:
            with open(path) as f:
                for r in json.load(f)['runs']:
                    runs[key(r)] = r
        print(table(list(runs.values())))
        return
    torch.set_num_threads(args.threads)
    os.environ['OMP_NUM_THREADS'] = str(args.threads)
    done = []
    if args.json and osp.isfile(args.json):
        with open(args.json) as f:
            done = json.load(f)['runs']
        print(f'{len(done)} runs read from {args.json}')

    def save(runs):
        if args.json:
            os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
            with open(args.json + '.tmp', 'w') as f:
                json.dump(dict(runs=runs), f, indent=1)
            os.replace(args.json + '.tmp', args.json)

    start = time.perf_counter()
    print(f'recipe: {args.epochs} epochs x {args.images} images, batch 128; '
          f'fractions {args.fractions}, seeds {args.seeds}, methods '
          f'{args.methods}, TP modes {args.tp_modes} ({args.tp_select}); '
          f'torch {torch.__version__}, {args.threads} thread(s); {uptime()}',
          flush=True)
    with tempfile.TemporaryDirectory(prefix='bench_units_') as tmp:
        done = run_all(args, tmp, done, save)
    print()
    print(table(done))
    print(f'\ntotal {time.perf_counter() - start:.0f} s; {uptime()}')


if __name__ == '__main__':
    main()
