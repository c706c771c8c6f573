"""(a) Supernet training step: fused layout (this project) vs per-branch.

The per-branch supernet is ATOMNAS.md section 2 written literally: per
kernel size its own 1x1 expand conv + BN + act, depthwise conv + BN + act and
1x1 projection; the branch projections are summed, then one shared BN and
the identity shortcut. Same parameters and FLOPs as the fused layout.

Each implementation is timed in contiguous and channels_last memory format,
interleaved, and its faster format is reported. Goal: fused >= 1.5x faster.

    .venv/bin/python benchmarks/bench_train_step.py           # quick
    .venv/bin/python benchmarks/bench_train_step.py --full    # batch 8-32
"""
import argparse
import os.path as osp
import sys

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import device, environment, interleaved, print_table  # noqa
from common import (DEMO, Classifier, atomnas_classifier,  # noqa
                    imagenet_setting, prepare)

BN = dict(momentum=0.01, eps=1e-3)


def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(cout, **BN)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PerBranchBlock(nn.Module):
    def __init__(self, cin, cout, stride, kernels, hidden, has_expand):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        self.branches = nn.ModuleList()
        for k, h in zip(kernels, hidden):
            layers = [conv_bn(cin, h, 1)] if has_expand else []
            layers += [conv_bn(h, h, k, stride, groups=h),
                       nn.Conv2d(h, cout, 1, bias=False)]
            self.branches.append(nn.Sequential(*layers))
        self.norm = nn.BatchNorm2d(cout, **BN)

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        out = self.norm(out)
        return x + out if self.use_res else out


class PerBranchBackbone(nn.Module):
    def __init__(self, arch, in_channels):
        super().__init__()
        stem = arch.get('stem_channels', 32)
        self.last_channels = arch.get('last_channels', 1280)
        layers = [conv_bn(in_channels, stem, 3, 2)]
        cin = stem
        for out, n, s, kernels, hidden, has_expand in arch['rows']:
            for i in range(n):
                layers.append(PerBranchBlock(cin, out, s if i == 0 else 1,
                                             kernels, hidden, has_expand))
                cin = out
        layers.append(conv_bn(cin, self.last_channels, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return (self.body(x), )


def per_branch_classifier(setting):
    bb = PerBranchBackbone(setting['arch'], setting['in_channels'])
    return Classifier(bb, bb.last_channels, setting['num_classes'])


def measure(setting, batch, reps, dev):
    fns = {}
    for impl, build in (('fused', atomnas_classifier),
                        ('per-branch', per_branch_classifier)):
        torch.manual_seed(0)
        model = build(setting)
        for fmt in ('contiguous', 'channels_last'):
            fns[(impl, fmt)] = prepare(
                __import__('copy').deepcopy(model), dev, fmt, batch, setting)
    t = interleaved(fns, reps=reps, warmup=1, dev=dev)
    best = {}
    for impl in ('fused', 'per-branch'):
        fmt = min(('contiguous', 'channels_last'), key=lambda f: t[(impl, f)])
        best[impl] = (t[(impl, fmt)], fmt)
    return t, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--full', action='store_true',
                        help='batch 8, 16, 32 at 224 px and on the demo')
    parser.add_argument('--reps', type=int, default=3)
    args = parser.parse_args()
    dev = device()
    cases = [('224 px supernet', imagenet_setting(), [8])]
    cases.append(('28 px demo supernet', DEMO, [32]))
    if args.full or dev == 'cuda':
        cases = [(n, s, [8, 16, 32]) for n, s, _ in cases]
    rows = []
    for name, setting, batches in cases:
        for batch in batches:
            t, best = measure(setting, batch, args.reps, dev)
            (tf, ff), (tb, fb) = best['fused'], best['per-branch']
            rows.append([name, batch, f'{tf * 1e3:.1f} ({ff})',
                         f'{tb * 1e3:.1f} ({fb})',
                         f'{t[("fused", "contiguous")] * 1e3:.1f} / '
                         f'{t[("fused", "channels_last")] * 1e3:.1f}',
                         f'{t[("per-branch", "contiguous")] * 1e3:.1f} / '
                         f'{t[("per-branch", "channels_last")] * 1e3:.1f}',
                         f'{tb / tf:.2f}x'])
            print(*rows[-1], flush=True)
    print_table(['setting', 'batch', 'fused ms (format)',
                 'per-branch ms (format)', 'fused ms cont / CL',
                 'per-branch ms cont / CL', 'speed-up (goal >= 1.5x)'],
                rows, title=f'(a) supernet training step, {environment()}')


if __name__ == '__main__':
    main()
