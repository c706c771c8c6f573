"""Budget controller: live cost against its path on the shipped target demo.

Runs ``configs/demo/atomnas_fashion_mnist_target.py`` through the mmengine
Runner, in-process (the recipe of ``bench_pareto.py``: ``--images 60000``
is the whole demo, 1876 iterations; the default 15360 is the shortened demo,
480 iterations, with iteration counts in the recipe scaled), and records at
every check of AtomShrinkHook: the controller's path (a linear descent from
the supernet's cost to the target at the deadline), the *live* cost before
the check (the net without the atoms dead in the live weights), the cost
after it, and the *live cut* (FLOPs of atoms alive in the live weights that
the check removed, ``max(0, live - after)``). Prints per run the checks (every
``--every``-th), then one summary row per run: the largest lag of the live
cost behind the path before the deadline, the deadline check's live cut and
the largest live cut of any check (all in % of the target), where it landed
and the final top-1. ``--follow-path`` / ``--interval`` override the config's
AtomShrinkHook settings (to compare the controller's modes).

    .venv/bin/python benchmarks/bench_budget_path.py                 # ~2 min
    .venv/bin/python benchmarks/bench_budget_path.py --images 60000  # ~5 min
    .venv/bin/python benchmarks/bench_budget_path.py --follow-path false \\
        --interval 50 --images 60000        # the controller steering alone
"""
import argparse
import json
import os
import os.path as osp
import sys
import tempfile
import time

import torch
from mmengine.hooks import Hook

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import bench_pareto  # noqa: E402
from atomnas_mm.search.shrink import backbone_cost  # noqa: E402


class PathRecord(Hook):
    """After AtomShrinkHook's checks: path, live cost, cost after."""
    priority = 'LOWEST'

    def __init__(self):
        self.rows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        shrink = next(h for h in runner.hooks
                      if type(h).__name__ == 'AtomShrinkHook')
        if not (shrink.is_last_train_iter(runner) or
                shrink.every_n_train_iters(runner, shrink.interval)):
            return
        controller = shrink.planner.controller
        progress = (runner.iter + 1) / runner.max_iters
        self.rows.append(dict(
            iter=runner.iter + 1, path=controller.path(progress),
            live=runner.message_hub.get_scalar(
                'train/budget_live_cost').current(),
            after=backbone_cost(shrink._model(runner), controller.cost),
            progress=progress, deadline=progress >= controller.deadline,
            deadline_at=controller.deadline))


def summary(run, target):
    rows = run['rows']
    before = [r for r in rows if not r['deadline']]
    late = [r for r in before if r['progress'] >= r['deadline_at'] / 2]
    due = next(r for r in rows if r['deadline'])
    cut = [max(0.0, r['live'] - r['after']) / target * 100 for r in rows]
    return dict(
        lag=max((r['live'] - r['path']) / target * 100 for r in before),
        late_lag=max((r['live'] - r['path']) / target * 100 for r in late),
        deadline_cut=max(0.0, due['live'] - due['after']) / target * 100,
        max_cut=max(cut), landed=run['flops'] / target * 100 - 100,
        reached=run['reached'], top1=run['top1'])


def print_summary(runs, target):
    print(f'\ntarget {target / 1e6:.3f}M; lags and cuts in % of the target '
          '(late: the second half of the path)')
    print('| images/epoch | seed | follow_path | interval | largest lag | '
          'largest late lag | live cut at the deadline | largest live cut | '
          'landed | on target at iter | top-1 |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for run in runs:
        s = summary(run, target)
        print(f'| {run["images"]} | {run["seed"]} | {run["follow_path"]} | '
              f'{run["interval"]} | {s["lag"]:+.1f}% | {s["late_lag"]:+.1f}% '
              f'| {s["deadline_cut"]:.1f}% | {s["max_cut"]:.1f}% | '
              f'{s["landed"]:+.2f}% | {s["reached"]} | {s["top1"]:.2f} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=15360)
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--target', type=float, default=1.2e6,
                        help='backbone FLOPs target (the config\'s 1.2M)')
    parser.add_argument('--follow-path', choices=['true', 'false'])
    parser.add_argument('--interval', type=int,
                        help='check interval in iterations of the whole '
                        'demo (scaled with the run length)')
    parser.add_argument('--every', type=int, default=5,
                        help='print every N-th check')
    parser.add_argument('--json', help='write the runs here')
    parser.add_argument('--from-json', nargs='+', help='only the summary of '
                        'the runs in these --json files')
    args = parser.parse_args()
    if args.from_json:
        runs = []
        for path in args.from_json:
            with open(path) as f:
                saved = json.load(f)
            images = saved['args']['images']
            runs += [dict(r, images=r.get('images', images))
                     for r in saved['runs']]
        print_summary(runs, args.target)
        return
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'
    recipe = argparse.Namespace(
        epochs=args.epochs, images=args.images, val_images=10000, workers=0,
        rho=None, threshold=None)
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix='bench_budget_path_') as tmp:
            cfg = bench_pareto.search_cfg(recipe, tmp, seed,
                                          dict(flops=args.target))
            hook = next(h for h in cfg.custom_hooks
                        if h.type.endswith('AtomShrinkHook'))
            if args.follow_path is not None:
                hook.planner.follow_path = args.follow_path == 'true'
            if args.interval is not None:
                hook.interval = max(1, round(
                    args.interval * args.epochs * -(-args.images // 128)
                    / bench_pareto.DEMO_ITERS))
            record, start = PathRecord(), time.perf_counter()
            result, _ = bench_pareto.train(cfg, [record])
        run = dict(seed=seed, follow_path=hook.get('follow_path', False),
                   interval=hook.interval, top1=result['top1'],
                   flops=result['flops'], reached=result['reached_iter'],
                   seconds=time.perf_counter() - start, rows=record.rows)
        runs.append(run)
        print(f'\nseed {seed}, follow_path={run["follow_path"]}, interval '
              f'{run["interval"]}: iter | path | live | after (MFLOPs)')
        for i, r in enumerate(record.rows):
            if i % args.every == 0 or r['deadline'] and not \
                    record.rows[i - 1]['deadline']:
                print(f'{r["iter"]:5d} | {r["path"] / 1e6:.3f} | '
                      f'{r["live"] / 1e6:.3f} | {r["after"] / 1e6:.3f}')
    print_summary([dict(r, images=args.images) for r in runs], args.target)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), runs=runs), f)


if __name__ == '__main__':
    main()
