"""(d) Inference throughput: AtomNAS-A/B/C vs mmpretrain's MobileNetV2.

Eval mode, ``torch.inference_mode``, 224 px, batch 1 and 32, contiguous and
channels_last, all timed interleaved. Every network runs as built (BN layers
live) and converted for inference: AtomNAS with
``atomnas_mm.models.deploy.deploy_model`` (BN folded, kernel groups merged
into one depthwise conv), MobileNetV2 with ``mmcv.cnn.fuse_conv_bn`` (BN
folded; it has one kernel size). Goal: AtomNAS-A (258M FLOPs) at least as
fast as MobileNetV2 (300M), each in its faster format.

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
from common import Classifier, atomnas_classifier, imagenet_setting  # noqa

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
            models[name + ' (deploy)'] = deploy_model(m)
    return models


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--models', nargs='+',
                        default=['atomnas_a', 'atomnas_b', 'atomnas_c',
                                 'MobileNetV2'])
    args = parser.parse_args()
    dev = device()
    models = build_models(args.models)
    flops = {n: count_flops_params(m, (1, 3, 224, 224))[0]
             for n, m in models.items()}
    rows, summary = [], []
    for batch in args.batches:
        fns = {}
        for name, model in models.items():
            for fmt in FORMATS:
                m = to_format(copy.deepcopy(model).to(dev), fmt)
                x = to_format(torch.randn(batch, 3, 224, 224, device=dev),
                              fmt)

                def fn(m=m, x=x):
                    with torch.inference_mode():
                        m(x)
                fns[(name, fmt)] = fn
        inner = max(1, 8 // batch) if dev == 'cpu' else 10
        t = interleaved(fns, reps=args.reps, warmup=2, dev=dev, inner=inner)
        best = {}
        for name in models:
            ips = {f: batch / t[(name, f)] for f in FORMATS}
            fmt = max(FORMATS, key=ips.get)
            best[name] = ips[fmt]
            rows.append([name, f'{flops[name] / 1e6:.0f}', batch,
                         f'{ips["contiguous"]:.1f}',
                         f'{ips["channels_last"]:.1f}', fmt])
        ref = max(best['MobileNetV2'], best['MobileNetV2 (BN folded)'])
        for name in ('atomnas_a', 'atomnas_a (deploy)'):
            if name in best:
                summary.append(f'batch {batch}: {name} / best MobileNetV2 = '
                               f'{best[name] / ref:.2f}x')
    print_table(['model', 'MFLOPs', 'batch', 'img/s contiguous',
                 'img/s channels_last', 'faster format'], rows,
                title=f'(d) inference, 224 px, {environment()}')
    print()
    for line in summary:
        print(line + ('  (goal >= 1.0: met)' if float(line.split('= ')[1][:-1])
                      >= 1.0 else '  (goal >= 1.0: NOT met)'))


if __name__ == '__main__':
    main()
