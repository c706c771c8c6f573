"""(c) Hook overhead: BNL1PenaltyHook + AtomShrinkHook vs plain training.

A real mmengine Runner trains the demo supernet (28x28 grey, batch 32) on a
tiny in-memory dataset, iteration-based; ``--backbone mbv2``: mmpretrain's
MobileNetV2 1.0 as the stock-model demo trains it (28x28, 3 channels), its
channel units searched. Variants, interleaved run by run:
  * plain: no AtomNAS hooks,
  * penalty: BNL1PenaltyHook (rho as in the demo, weight decay off),
  * penalty + shrink: also AtomShrinkHook checking every ``--interval``
    iterations, with ``min_removed_flops=1e30`` and ``final_shrink=False`` so
    that no shrink fires (the check itself, plan and FLOPs, is timed).
The time per iteration is measured inside ``runner.train()`` between the
``--warmup``-th and the last iteration; the median over ``--reps`` runs of
each variant is reported. Goal: overhead <= 2%.

    .venv/bin/python benchmarks/bench_hook_overhead.py [--iters 120 --reps 3]
"""
import argparse
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmengine.dataset import pseudo_collate
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import device, environment, print_table, sync  # noqa
from common import DEMO  # noqa

import atomnas_mm  # noqa: F401,E402  (registers the modules)
from mmpretrain.structures import DataSample  # noqa: E402


class TinyDataset(Dataset):
    """Random 28x28 grey images with labels, in memory (uint8)."""

    def __init__(self, n, size=28, num_classes=10, channels=1):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, size, size),
                                    generator=g,
                                    dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (n, ), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return dict(inputs=self.images[i],
                    data_samples=DataSample().set_gt_label(
                        int(self.labels[i])))


class IterTimer(Hook):
    priority = 'LOWEST'

    def __init__(self, warmup):
        self.warmup, self.start, self.end, self.count = warmup, None, None, 0

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == self.warmup:
            sync(device())
            self.start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 > self.warmup:
            self.count += 1
        if self.is_last_train_iter(runner):
            sync(device())
            self.end = time.perf_counter()

    @property
    def per_iter(self):
        return (self.end - self.start) / self.count


def run_once(hooks, args, work_dir):
    timer = IterTimer(args.warmup)
    # One epoch covers the run: mmengine's iteration loop sleeps 2 s at every
    # restart of a finite dataloader.
    stock = args.backbone == 'mbv2'
    loader = DataLoader(TinyDataset(args.batch * (args.iters + 1),
                                    channels=3 if stock else 1),
                        batch_size=args.batch, shuffle=True,
                        collate_fn=pseudo_collate, num_workers=0)
    model = dict(
        type='ImageClassifier',
        data_preprocessor=dict(num_classes=10, mean=[72.94] * (3 if stock
                                                               else 1),
                               std=[90.02] * (3 if stock else 1)),
        backbone=dict(type='MobileNetV2', widen_factor=1.0) if stock else
        dict(type='atomnas_mm.AtomNAS', arch=DEMO['arch'], in_channels=1),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10,
                  in_channels=1280 if stock else 256,
                  loss=dict(type='CrossEntropyLoss')))
    runner = Runner(
        model=model, work_dir=work_dir, train_dataloader=loader,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05,
                                          momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=args.iters),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=10000),
                           checkpoint=None),
        custom_hooks=[*hooks, timer], default_scope='mmpretrain',
        log_level='WARNING', randomness=dict(seed=0),
        env_cfg=dict(cudnn_benchmark=False))
    runner.train()
    return timer.per_iter


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=120)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--interval', type=int, default=50,
                        help='AtomShrinkHook check interval (iterations); '
                             'the demo config uses 100')
    parser.add_argument('--backbone', default='atomnas',
                        choices=['atomnas', 'mbv2'])
    args = parser.parse_args()
    penalty = dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3,
                   warmup_iters=50)
    shrink = dict(type='atomnas_mm.AtomShrinkHook', threshold=1e-3,
                  min_removed_flops=1e30, interval=args.interval,
                  by_epoch=False, input_size=28, final_shrink=False)
    variants = {'plain': [], 'penalty': [penalty],
                'penalty + shrink': [penalty, shrink]}
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, hooks in variants.items():
                times[name].append(run_once(
                    [dict(h) for h in hooks], args,
                    osp.join(tmp, f'{rep}_{name.replace(" ", "")}')))
                print(name, f'{times[name][-1] * 1e3:.2f} ms/iter',
                      flush=True)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = [[n, f'{med[n] * 1e3:.2f}',
             ' '.join(f'{t * 1e3:.1f}' for t in times[n]),
             f'{(med[n] / med["plain"] - 1) * 100:+.1f}%']
            for n in variants]
    print_table(['variant', 'ms/iter (median)', 'runs', 'overhead vs plain'],
                rows, title='(c) hook overhead, ' + (
                    'mmpretrain MobileNetV2 1.0' if args.backbone == 'mbv2'
                    else 'demo supernet') + f', batch '
                            f'{args.batch}, {args.iters - args.warmup} timed '
                            f'iters/run, {environment()}')
    over = med['penalty + shrink'] / med['plain'] - 1
    print(f'\noverhead {over * 100:+.1f}%; goal <= 2% -> '
          f'{"met" if over <= 0.02 else "NOT met"}')


if __name__ == '__main__':
    main()
