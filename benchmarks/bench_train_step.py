"""(a) Supernet training step: fused layout (this project) vs per-branch.

The per-branch supernet is the method's block written literally
(docs/method.md): per kernel size its own 1x1 expand conv + BN + act,
depthwise conv + BN + act and 1x1 projection; the branch projections are
summed, then one shared BN and the identity shortcut. Same parameters and
FLOPs as the fused layout.

Candidates, timed interleaved in each memory format:

* ``fused``: ``AtomicBlock`` as shipped (its ``train_forms`` default for the
  device: the per-kernel form over the fused parameters);
* ``fused (modules)``: ``AtomicBlock`` running its modules as they are (wide
  expand, split, cat) - the form before issue 11;
* ``per-branch``: the reference above.

Goal: fused >= 1.0x per-branch on a CPU, >= 1.5x on a GPU, in channels_last
(the format the shipped configs train in, ``MemoryFormatHook``).

    .venv/bin/python benchmarks/bench_train_step.py           # quick
    .venv/bin/python benchmarks/bench_train_step.py --full    # batch 8-32
    # on a GPU (benchmarks/gpu_check.sh):
    python benchmarks/bench_train_step.py --settings 224 --batches 64 128 \\
        --formats channels_last --amp
"""
import argparse
import copy
import os.path as osp
import sys

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import device, environment, interleaved, print_table  # noqa
from common import (DEMO, Classifier, atomnas_classifier,  # noqa
                    imagenet_setting, prepare, set_forms)

BN = dict(momentum=0.01, eps=1e-3)
FORMATS = ('contiguous', 'channels_last')
SETTINGS = {'224': ('224 px supernet', imagenet_setting),
            '28': ('28 px demo supernet', lambda: DEMO)}


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


CANDIDATES = {
    'fused': atomnas_classifier,
    'fused (modules)': lambda s: set_forms(atomnas_classifier(s), 'modules'),
    'per-branch': per_branch_classifier,
}


def measure(setting, batch, reps, dev, formats, amp=False):
    """``{(candidate, format): median seconds per step}``, interleaved."""
    fns = {}
    for name, build in CANDIDATES.items():
        torch.manual_seed(0)
        model = build(setting)
        for fmt in formats:
            fns[(name, fmt)] = prepare(copy.deepcopy(model), dev, fmt, batch,
                                       setting, amp=amp)
    return interleaved(fns, reps=reps, warmup=2 if dev == 'cuda' else 1,
                       dev=dev)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--full', action='store_true',
                        help='batch 8, 16, 32 at 224 px and on the demo')
    parser.add_argument('--settings', nargs='+', default=['224', '28'],
                        choices=sorted(SETTINGS))
    parser.add_argument('--batches', type=int, nargs='+',
                        help='override the batch sizes (all settings)')
    parser.add_argument('--formats', nargs='+', default=list(FORMATS),
                        choices=FORMATS)
    parser.add_argument('--amp', action='store_true',
                        help='CUDA autocast fp16 + GradScaler')
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--threads', type=int,
                        help='torch.set_num_threads (CPU)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device()
    if args.amp and dev != 'cuda':
        parser.error('--amp needs CUDA')
    default = {'224': [8], '28': [32]}
    if args.full or dev == 'cuda':
        default = {'224': [8, 16, 32], '28': [8, 16, 32]}
    rows = []
    for key in args.settings:
        name, setting = SETTINGS[key][0], SETTINGS[key][1]()
        for batch in args.batches or default[key]:
            t = measure(setting, batch, args.reps, dev, args.formats,
                        amp=args.amp)
            for fmt in args.formats:
                tf, tm, tb = (t[(c, fmt)] for c in CANDIDATES)
                rows.append([name, batch, fmt, f'{tf * 1e3:.1f}',
                             f'{tm * 1e3:.1f}', f'{tb * 1e3:.1f}',
                             f'{tb / tf:.2f}x', f'{tb / tm:.2f}x'])
                print(*rows[-1], flush=True)
    amp = ', AMP fp16' if args.amp else ''
    goal = '1.5x' if dev == 'cuda' else '1.0x'
    print_table(['setting', 'batch', 'format', 'fused ms',
                 'fused (modules) ms', 'per-branch ms',
                 f'fused vs per-branch (goal >= {goal})',
                 'modules vs per-branch'],
                rows, title=f'(a) supernet training step{amp}, '
                f'{environment()}')


if __name__ == '__main__':
    main()
