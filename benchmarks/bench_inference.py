"""(d) Inference throughput: AtomNAS-A/B/C vs mmpretrain's MobileNetV2.

Eval mode, ``torch.inference_mode``, 224 px, batch 1 and 32, contiguous and
channels_last, all timed interleaved. Every network runs as built and
converted for inference. AtomNAS as built runs ``AtomicBlock``'s cached
inference form (BN folded, kernel groups merged, rebuilt on any weight
change); "(modules)" is the same model with ``cache_inference=False``, the
module form (live BNs, a depthwise conv per kernel group on channel slices,
``cat``) it ran before; "(deploy)" is
``atomnas_mm.models.deploy.deploy_model`` (also the stem and head BNs folded).
MobileNetV2 as built has live BNs; "(BN folded)" is ``mmcv.cnn.fuse_conv_bn``.
Goals, each in its faster format: AtomNAS-A (258M FLOPs) as built >=
MobileNetV2 (300M) as built; AtomNAS-A deployed >= BN-folded MobileNetV2.

    .venv/bin/python benchmarks/bench_inference.py [--batches 1 32] [--reps 5]
"""
import argparse
import copy
import os.path as osp
import sys

import torch
from mmcv.cnn import fuse_conv_bn

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import (device, environment, interleaved, print_table,  # noqa
                     to_format)
from common import (Classifier, atomnas_classifier,  # noqa
                    imagenet_setting, set_forms)

from atomnas_mm.models import count_flops_params  # noqa
from atomnas_mm.models.archs import get_arch  # noqa
from atomnas_mm.models.deploy import deploy_model  # noqa

FORMATS = ('contiguous', 'channels_last')


def mobilenet_v2():
    from mmpretrain.models.backbones import MobileNetV2
    return Classifier(MobileNetV2(widen_factor=1.0), 1280, 1000)


def build_models(names):
    setting = imagenet_setting()
    models = {}
    for name in names:
        torch.manual_seed(0)
        if name == 'MobileNetV2':
            m = mobilenet_v2().eval()
            models[name] = m
            models[name + ' (BN folded)'] = fuse_conv_bn(copy.deepcopy(m))
        else:
            m = atomnas_classifier(setting, get_arch(name)).eval()
            models[name] = m
            models[name + ' (modules)'] = set_forms(
                copy.deepcopy(m), cache_inference=False)
            models[name + ' (deploy)'] = deploy_model(m)
    return models


def measure(models, batch, formats, reps, dev, amp=False, size=224):
    """``{(model, format): images/s}``, all timed interleaved."""
    fns = {}
    for name, model in models.items():
        for fmt in formats:
            m = to_format(copy.deepcopy(model).to(dev), fmt)
            x = to_format(torch.randn(batch, 3, size, size, device=dev), fmt)

            def fn(m=m, x=x):
                with torch.inference_mode(), torch.autocast(
                        'cuda', dtype=torch.float16, enabled=amp):
                    m(x)
            fns[(name, fmt)] = fn
    inner = max(1, 8 // batch) if dev == 'cpu' else 10
    t = interleaved(fns, reps=reps, warmup=2, dev=dev, inner=inner)
    return {key: batch / sec for key, sec in t.items()}


def best_format(ips, name, formats):
    """``(images/s, format)`` of a model's faster format."""
    fmt = max(formats, key=lambda f: ips[(name, f)])
    return ips[(name, fmt)], fmt


# (candidate, reference) pairs of the goals; '(modules)' is information
PAIRS = (('atomnas_a', 'MobileNetV2'),
         ('atomnas_a (modules)', 'MobileNetV2'),
         ('atomnas_a (deploy)', 'MobileNetV2 (BN folded)'))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--models', nargs='+',
                        default=['atomnas_a', 'atomnas_b', 'atomnas_c',
                                 'MobileNetV2'])
    parser.add_argument('--formats', nargs='+', default=list(FORMATS),
                        choices=FORMATS)
    parser.add_argument('--amp', action='store_true',
                        help='CUDA autocast fp16')
    parser.add_argument('--threads', type=int,
                        help='torch.set_num_threads (CPU)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device()
    if args.amp and dev != 'cuda':
        parser.error('--amp needs CUDA')
    models = build_models(args.models)
    flops = {n: count_flops_params(m, (1, 3, 224, 224))[0]
             for n, m in models.items()}
    rows, summary = [], []
    for batch in args.batches:
        ips = measure(models, batch, args.formats, args.reps, dev, args.amp)
        best = {}
        for name in models:
            best[name], fmt = best_format(ips, name, args.formats)
            rows.append([name, f'{flops[name] / 1e6:.0f}', batch] +
                        [f'{ips[(name, f)]:.1f}' if f in args.formats
                         else '-' for f in FORMATS] + [fmt])
        for a, b in PAIRS:
            if a in best and b in best:
                summary.append((f'batch {batch}: {a} / {b}',
                                best[a] / best[b]))
    amp = ', AMP fp16' if args.amp else ''
    print_table(['model', 'MFLOPs', 'batch', 'img/s contiguous',
                 'img/s channels_last', 'faster format'], rows,
                title=f'(d) inference, 224 px{amp}, {environment()}')
    print()
    for line, ratio in summary:
        goal = '' if '(modules)' in line else \
            ('  (goal >= 1.0: met)' if ratio >= 1.0 else
             '  (goal >= 1.0: NOT met)')
        print(f'{line} = {ratio:.2f}x{goal}')


if __name__ == '__main__':
    main()
