"""(b) Shrink payoff: does removing atoms buy the time its FLOPs promise?

Training-step time (forward + backward + SGD step, 224 px) of
  * the supernet (stem 16, as in the AtomNAS-A search),
  * the same supernet shrunk in place to AtomNAS-A's widths
    (``reshape_to_arch``), converted to the memory format after the shrink,
  * the same, shrunk after the conversion (what AtomShrinkHook does to a
    model already in channels_last),
  * AtomNAS-A built fresh,
all timed interleaved. Goals: shrunk-in-place / fresh <= 1.05 and the step
time falls supernet -> A by at least 0.7x the FLOPs fall (about 5.9x).

    .venv/bin/python benchmarks/bench_shrink_payoff.py [--batch 16] [--format contiguous]
"""
import argparse
import copy
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import (device, environment, interleaved, print_table,  # noqa
                     to_format)
from common import atomnas_classifier, imagenet_setting, prepare  # noqa

from atomnas_mm.models import count_flops_params  # noqa
from atomnas_mm.models.archs import get_arch, supernet_rows  # noqa
from atomnas_mm.search.shrink import reshape_to_arch  # noqa


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--format', default='channels_last',
                        choices=['contiguous', 'channels_last'])
    args = parser.parse_args()
    dev = device()
    setting = imagenet_setting()
    arch_a = get_arch('atomnas_a')
    arch_a.setdefault('last_channels', 1280)
    super_arch = dict(rows=supernet_rows(16), stem_channels=16,
                      last_channels=1280)

    torch.manual_seed(0)
    supernet = atomnas_classifier(setting, super_arch)
    shrunk = copy.deepcopy(supernet)
    reshape_to_arch(shrunk, {'backbone': arch_a})
    # Shrunk after the model was put in the memory format (the hook case).
    shrunk_late = to_format(copy.deepcopy(supernet).to(dev), args.format)
    reshape_to_arch(shrunk_late, {'backbone': arch_a})
    fresh = atomnas_classifier(setting, arch_a)
    assert shrunk.backbone.arch_rows() == fresh.backbone.arch_rows()

    models = {'supernet': supernet, 'shrunk in place': shrunk,
              'shrunk in place (after format)': shrunk_late,
              'AtomNAS-A fresh': fresh}
    flops = {n: count_flops_params(m, (1, 3, 224, 224))[0]
             for n, m in models.items()}
    fns = {}
    for name, model in models.items():
        if name == 'shrunk in place (after format)':
            fns[name] = _prepare_keep(model, dev, args, setting)
        else:
            fns[name] = prepare(model, dev, args.format, args.batch, setting)
    t = interleaved(fns, reps=args.reps, warmup=1, dev=dev)

    rows = []
    for name in models:
        rows.append([name, f'{flops[name] / 1e6:.0f}', f'{t[name] * 1e3:.1f}',
                     f'{t["supernet"] / t[name]:.2f}x',
                     f'{flops["supernet"] / flops[name]:.2f}x'])
    print_table(['model', 'MFLOPs', 'step ms', 'time fall vs supernet',
                 'FLOPs fall vs supernet'], rows,
                title=f'(b) shrink payoff, 224 px, batch {args.batch}, '
                      f'{args.format}, {environment()}')
    fall_t = t['supernet'] / t['AtomNAS-A fresh']
    fall_f = flops['supernet'] / flops['AtomNAS-A fresh']
    r1 = t['shrunk in place'] / t['AtomNAS-A fresh']
    r2 = t['shrunk in place (after format)'] / t['AtomNAS-A fresh']
    print(f'\nshrunk-in-place / fresh: {r1:.3f} (after format: {r2:.3f}); '
          f'goal <= 1.05 -> {"met" if max(r1, r2) <= 1.05 else "NOT met"}')
    print(f'time fall / FLOPs fall: {fall_t:.2f} / {fall_f:.2f} = '
          f'{fall_t / fall_f:.2f}; goal >= 0.7 -> '
          f'{"met" if fall_t / fall_f >= 0.7 else "NOT met"}')


def _prepare_keep(model, dev, args, setting):
    """Like ``prepare`` but without converting the (already converted)
    model again, so its shrunk parameters keep the layout the surgery gave."""
    from common import train_step
    model.train()
    x = to_format(torch.randn(args.batch, 3, 224, 224, device=dev),
                  args.format)
    y = torch.randint(0, 1000, (args.batch, ), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train_step(model, opt, x, y)


if __name__ == '__main__':
    main()
