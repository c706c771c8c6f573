"""(e) Search cost at demo scale: one-pass search+train vs the final
architecture trained alone for the same iterations.

Runs configs/demo/atomnas_fashion_mnist.py through the mmengine Runner,
iteration-based and shortened (``--iters``; penalty ramp and shrink interval
scaled with it; no validation, no checkpoints):
  * search: the supernet with BNL1PenaltyHook + AtomShrinkHook (+ EMA), the
    network shrinking while it trains,
  * final: the architecture that search ended with, built directly and
    trained with the same recipe without the two search hooks.
Repetitions alternate search, final, search, final; the same seed gives the
same final architecture each time. Wall time of ``runner.train()`` each;
goal: search / final <= 1.3.

    .venv/bin/python benchmarks/bench_search_cost.py [--iters 300 --reps 2]
"""
import argparse
import copy
import json
import os.path as osp
import statistics
import sys
import tempfile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import device, environment, print_table, time_once  # noqa

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')


def make_cfg(args, work_dir, arch=None):
    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = work_dir
    cfg.log_level = 'WARNING'
    cfg.train_cfg = dict(by_epoch=False, max_iters=args.iters)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=args.iters // 8),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=0,
             T_max=args.iters)]
    loader = cfg.train_dataloader
    loader.num_workers = args.workers
    loader.persistent_workers = args.workers > 0
    loader.batch_size = args.batch
    # One epoch covers the run: mmengine's iteration loop sleeps 2 s at every
    # restart of a finite dataloader.
    loader.dataset.indices = args.images or min(
        60000, args.batch * (args.iters + 1))
    cfg.default_hooks = dict(logger=dict(type='LoggerHook', interval=10**6),
                             checkpoint=None)
    hooks = []
    for hook in cfg.custom_hooks:
        if hook.type == 'atomnas_mm.BNL1PenaltyHook':
            hook = dict(hook, rho=args.rho, warmup_epochs=0,
                        warmup_iters=args.iters // 8)
        elif hook.type == 'atomnas_mm.AtomShrinkHook':
            hook = dict(hook, interval=max(1, args.iters // 6))
        elif hook.type == 'atomnas_mm.BNRecalibrationHook':
            continue  # epoch-based; there are no epochs here
        if arch is not None and hook['type'] in (
                'atomnas_mm.BNL1PenaltyHook', 'atomnas_mm.AtomShrinkHook'):
            continue
        hooks.append(hook)
    cfg.custom_hooks = hooks
    if arch is not None:
        cfg.model.backbone.arch = arch
    return cfg


def run(cfg):
    runner = Runner.from_cfg(cfg)
    seconds = time_once(runner.train, device())
    from atomnas_mm.models import count_flops_params
    from atomnas_mm.search.shrink import find_backbones
    model = runner.model
    backbone = next(iter(find_backbones(model).values()))
    flops = count_flops_params(model, (1, 1, 28, 28))[0]
    history = [(h['iter'], h['flops']) for hook in runner.hooks
               for h in getattr(hook, 'history', [])
               if isinstance(h, dict) and 'flops' in h]
    return seconds, backbone.arch_dict(), flops, history


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--reps', type=int, default=2)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--images', type=int, default=None,
                        help='training subset of Fashion-MNIST (default: '
                             'enough for one epoch)')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--rho', type=float, default=3e-3,
                        help='penalty strength (demo: 3e-3)')
    args = parser.parse_args()
    times = dict(search=[], final=[])
    arch = flops = None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            t, found, f_end, history = run(
                make_cfg(args, osp.join(tmp, f's{rep}')))
            times['search'].append(t)
            if arch is None:
                arch, flops = found, f_end
            elif found != arch:
                print('warning: the search ended with another architecture')
            t, _, _, _ = run(make_cfg(args, osp.join(tmp, f'f{rep}'),
                                   copy.deepcopy(arch)))
            times['final'].append(t)
            print(f"rep {rep}: search {times['search'][-1]:.1f} s, final "
                  f"{times['final'][-1]:.1f} s", flush=True)
    from atomnas_mm.models import count_flops_params
    from mmpretrain.registry import MODELS
    import atomnas_mm  # noqa
    cfg = make_cfg(args, '/tmp')
    super_flops = count_flops_params(MODELS.build(cfg.model),
                                     (1, 1, 28, 28))[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [['search + train (supernet, shrinking)', f'{super_flops / 1e6:.2f}'
             f' -> {flops / 1e6:.2f}', f'{med["search"]:.1f}',
             f'{med["search"] / med["final"]:.2f}x'],
            ['final architecture alone', f'{flops / 1e6:.2f}',
             f'{med["final"]:.1f}', '1.00x']]
    print_table(['run', 'MFLOPs', 'seconds (median)', 'vs final'], rows,
                title=f'(e) search cost, demo, {args.iters} iters x batch '
                      f'{args.batch}, rho {args.rho}, {environment()}')
    print('final rows:', json.dumps(arch['rows']))
    print('search FLOPs (iter, MFLOPs): ' + ', '.join(
        f'({i}, {f / 1e6:.2f})' for i, f in history))
    # Time the supernet and the final net would take per iteration if the
    # cost followed FLOPs: the share of the search spent before shrinking.
    if len(history) > 1:
        area = sum((history[k + 1][0] - history[k][0]) * history[k][1]
                   for k in range(len(history) - 1))
        area += (args.iters - history[-1][0]) * history[-1][1]
        print(f'FLOPs-time integral of the search / final: '
              f'{area / (args.iters * flops):.2f}')
    r = med['search'] / med['final']
    print(f'\nsearch / final = {r:.2f}; goal <= 1.3 -> '
          f'{"met" if r <= 1.3 else "NOT met"}')


if __name__ == '__main__':
    main()
