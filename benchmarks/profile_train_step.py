"""torch.profiler breakdown of one supernet training step: fused (as
shipped), fused running its modules, per-branch (the evidence behind the
product changes; see docs/benchmarks.md).

    .venv/bin/python benchmarks/profile_train_step.py [--size 224 --batch 8]
"""
import argparse
import os.path as osp
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import device, environment  # noqa
from bench_train_step import CANDIDATES  # noqa
from common import DEMO, imagenet_setting, prepare  # noqa


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=224, choices=[224, 28])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--format', default='channels_last')
    parser.add_argument('--rows', type=int, default=12)
    args = parser.parse_args()
    dev = device()
    setting = imagenet_setting() if args.size == 224 else DEMO
    acts = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if dev == 'cuda' else [])
    print(environment())
    for name, build in CANDIDATES.items():
        torch.manual_seed(0)
        step = prepare(build(setting), dev, args.format, args.batch, setting)
        step()
        step()
        with profile(activities=acts) as prof:
            step()
        key = 'self_cuda_time_total' if dev == 'cuda' else \
            'self_cpu_time_total'
        print(f'\n## {name}, {args.size} px, batch {args.batch}, '
              f'{args.format}')
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == '__main__':
    main()
