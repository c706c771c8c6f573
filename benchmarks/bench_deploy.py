"""Deployed throughput: AtomNAS nets as exported vs MobileNetV2s (issue 21).

Every net is an mmpretrain ``ImageClassifier`` (backbone, global average
pool, linear head), random weights with non-trivial BN statistics, timed
interleaved at batch 1 and 32 in two runtimes, each with a fixed number of
threads (``--threads``, default 2):

* ONNX Runtime (CPU execution provider, graph optimisation ALL, sequential,
  denormals as zero, no spinning of idle threads: every net has its own
  session and thread pool, which would otherwise steal the cores from the
  one being timed): the graph ``atomnas_mm.export.export_onnx`` writes,
  i.e. what ``tools/deployment/pytorch2onnx.py`` produces. AtomNAS nets in
  the shipped form (``--deploy-form merged``, align 16) and, for the form
  choice, in the other forms of ``--forms`` (``modules``: the modules as
  built, the export before issue 21; ``merged:1``: ``deploy_model``'s merged
  depthwise; ``split:16``, ``auto:16``, ``merged:8``...).
* PyTorch (eval, ``inference_mode``, channels_last): AtomNAS as built (its
  cached inference form), MobileNetV2 with BN folded.

References: mmpretrain MobileNetV2 at widen factor 1.0 and width-scaled
(``--widths``); for every searched net (``--searched CONFIG CHECKPOINT``,
repeatable) the MobileNetV2 width whose FLOPs at the net's input are
closest, built for the same input channels, size and classes.

Goals: AtomNAS-A >= 1.0x MobileNetV2 1.0 in ONNX Runtime at batch 1 and 32;
a searched net with ``round_to`` >= 1.0x its equal-FLOPs MobileNetV2.

    .venv/bin/python benchmarks/bench_deploy.py [--reps 9] \
        [--searched export/demo/x.py export/demo/x.pth]
"""
import argparse
import copy
import os.path as osp
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _timing import interleaved, print_table, to_format  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
import atomnas_mm  # noqa: E402,F401
from atomnas_mm.export import (build_from_checkpoint, export_onnx,  # noqa
                               input_channels, input_size)
from atomnas_mm.models import count_flops_params  # noqa: E402

ZOO = ('atomnas_a', 'atomnas_b', 'atomnas_c')
DEFAULT_FORMS = ('modules', 'merged:1', 'split:16', 'auto:16', 'merged:8')
SHIPPED = 'merged:16'


def classifier(backbone, channels, num_classes=1000):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(dict(
        type='ImageClassifier', backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes,
                  in_channels=channels)))


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics (random init leaves them at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def zoo_net(name):
    torch.manual_seed(0)
    return randomise_bn(classifier(dict(type='atomnas_mm.AtomNAS', arch=name),
                                   1280))


def mobilenet_v2(widen, in_channels=3, num_classes=1000):
    torch.manual_seed(0)
    model = classifier(dict(type='MobileNetV2', widen_factor=widen),
                       1280 if widen <= 1.0 else int(1280 * widen),
                       num_classes)
    if in_channels != 3:
        old = model.backbone.conv1.conv
        model.backbone.conv1.conv = torch.nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride,
            old.padding, bias=False)
    return randomise_bn(model)


def flops(model, channels, size):
    return count_flops_params(model, (1, channels, *size))[0]


def equal_flops_mobilenet(target, channels, size, num_classes):
    """``(widen, model)``: the MobileNetV2 of FLOPs closest to ``target``."""
    best = None
    for widen in np.arange(0.1, 1.41, 0.05):
        model = mobilenet_v2(round(float(widen), 2), channels, num_classes)
        gap = abs(flops(model, channels, size) - target)
        if best is None or gap < best[0]:
            best = (gap, round(float(widen), 2), model)
    return best[1], best[2]


#: ONNX Runtime execution providers per ``--device``, most preferred first.
PROVIDERS = dict(cpu=['CPUExecutionProvider'],
                 cuda=['TensorrtExecutionProvider', 'CUDAExecutionProvider'])


def ort_providers(dev):
    """The providers of ``dev`` this onnxruntime has (empty: none)."""
    import onnxruntime as ort
    have = ort.get_available_providers()
    wanted = [p for p in PROVIDERS[dev] if p in have]
    return wanted + ['CPUExecutionProvider'] if wanted else []


def ort_session(path, threads, dev='cpu'):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry('session.set_denormal_as_zero', '1')
    # Idle sessions' threads must not spin while another one is timed
    # (2 cores, one thread pool per session).
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, so, providers=ort_providers(dev))


def parse_form(form):
    """``'auto:16'`` -> ``('auto', 16)``; ``'modules'`` -> ``('modules',
    1)``."""
    merge, _, align = form.partition(':')
    return merge, int(align or 1)


def export(model, path, size, form):
    merge, align = parse_form(form)
    export_onnx(model, path, size, merge=merge, align=align)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--reps', type=int, default=9)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'],
                        help='cuda: PyTorch on the GPU, onnxruntime with its '
                        'TensorRT or CUDA provider (onnxruntime-gpu)')
    parser.add_argument('--zoo', nargs='*', default=list(ZOO))
    parser.add_argument('--forms', nargs='*', default=list(DEFAULT_FORMS),
                        help='other export forms of atomnas_a, MERGE[:ALIGN]'
                        ' (MERGE: modules, auto, split, merged)')
    parser.add_argument('--widths', type=float, nargs='*',
                        default=[0.5, 0.75, 1.0])
    parser.add_argument('--searched', nargs=2, action='append', default=[],
                        metavar=('CONFIG', 'CHECKPOINT'),
                        help='a searched net (repeatable)')
    parser.add_argument('--searched-size', type=int,
                        help='time the searched nets (and their references) '
                        'at this image side instead of their config\'s')
    parser.add_argument('--runtimes', nargs='+',
                        default=['onnxruntime', 'pytorch'],
                        choices=['onnxruntime', 'pytorch'])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    if dev == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch.cuda.is_available() is False')
    if 'onnxruntime' in args.runtimes and not ort_providers(dev):
        print(f'onnxruntime: no {" or ".join(PROVIDERS[dev])} in this '
              'onnxruntime (install onnxruntime-gpu): its rows are skipped')
        args.runtimes = [r for r in args.runtimes if r != 'onnxruntime']
    from mmengine.config import Config

    # groups: (input channels, size) -> {name: (model, MFLOPs)}
    groups = {}
    imagenet = groups.setdefault((3, (224, 224)), {})
    for widen in args.widths:
        m = mobilenet_v2(widen)
        imagenet[f'MobileNetV2 {widen}'] = (m, flops(m, 3, (224, 224)))
    for name in args.zoo:
        m = zoo_net(name)
        imagenet[name] = (m, flops(m, 3, (224, 224)))
    pairs = [('atomnas_a', 'MobileNetV2 1.0')]
    shrunk = []  # (searched net, its config's unsearched model)
    for cfg_path, ckpt in args.searched:
        cfg = Config.fromfile(cfg_path)
        model = build_from_checkpoint(cfg, ckpt)
        channels, size = input_channels(model), input_size(cfg)
        if args.searched_size:  # the same widths on larger images
            size = (args.searched_size, args.searched_size)
        group = groups.setdefault((channels, size), {})
        name = osp.splitext(osp.basename(ckpt))[0]
        group[name] = (model, flops(model, channels, size))
        widen, ref = equal_flops_mobilenet(group[name][1], channels, size,
                                           model.head.fc.out_features)
        group[f'MobileNetV2 {widen}'] = (ref, flops(ref, channels, size))
        pairs.append((name, f'MobileNetV2 {widen}'))
        full_name = f'{osp.splitext(osp.basename(cfg_path))[0]} unsearched'
        if full_name not in group:
            from mmengine.registry import init_default_scope
            from mmpretrain.registry import MODELS
            init_default_scope(cfg.get('default_scope', 'mmpretrain'))
            full = MODELS.build(cfg.model)
            full.eval()
            group[full_name] = (randomise_bn(full), flops(full, channels,
                                                          size))
        shrunk.append((name, full_name))

    tmp = tempfile.mkdtemp(prefix='bench_deploy_')
    results = {}   # (runtime, group, batch) -> {name: img/s}
    for (channels, size), nets in groups.items():
        fns = {}
        for name, (model, _) in nets.items():
            atomnas = any(type(m).__name__ == 'AtomicBlock'
                          for m in model.modules())
            forms = [SHIPPED] + (list(args.forms) if name == 'atomnas_a'
                                 and (channels, size) == (3, (224, 224))
                                 else []) if atomnas else [SHIPPED]
            for form in forms:
                label = name if form == SHIPPED else f'{name} [{form}]'
                if 'onnxruntime' in args.runtimes:
                    path = export(model, osp.join(
                        tmp, f'{label}.onnx'.replace(' ', '_')), size, form)
                    fns[('onnxruntime', label)] = (ort_session(
                        path, args.threads, dev), None)
            if 'pytorch' in args.runtimes:
                from mmcv.cnn import fuse_conv_bn
                m = model if atomnas else fuse_conv_bn(copy.deepcopy(model))
                fns[('pytorch', name)] = (to_format(
                    copy.deepcopy(m).to(dev), 'channels_last'), None)
        for batch in args.batches:
            x = torch.randn(batch, channels, *size)
            calls = {}
            for key, (runner, _) in fns.items():
                if key[0] == 'onnxruntime':
                    feed = {'input': x.numpy()}
                    calls[key] = lambda r=runner, f=feed: r.run(None, f)
                else:
                    xc = to_format(x.to(dev), 'channels_last')

                    def call(m=runner, xc=xc):
                        with torch.inference_mode():
                            m(xc, mode='tensor')
                    calls[key] = call
            sec = interleaved(calls, reps=args.reps, warmup=2, dev=dev,
                              inner=max(1, 8 // batch) if dev == 'cpu'
                              else 10)
            for (runtime, label), s in sec.items():
                results.setdefault((runtime, (channels, size), batch),
                                   {})[label] = batch / s

    env = (torch.cuda.get_device_name() if dev == 'cuda' else
           f'CPU, {args.threads} threads') + f', torch {torch.__version__}'
    try:
        import onnxruntime
        env += f', onnxruntime {onnxruntime.__version__}'
    except ImportError:
        pass
    for runtime in args.runtimes:
        for (channels, size), nets in groups.items():
            rows = []
            ref_name = 'MobileNetV2 1.0' if 'MobileNetV2 1.0' in nets else \
                next((n for n in nets if n.startswith('MobileNetV2')), None)
            labels = sorted({label for (rt, g, _), d in results.items()
                             if rt == runtime and g == (channels, size)
                             for label in d}, key=lambda s: (
                                 s.split(' [')[0] not in nets, s))
            for label in labels:
                base = label.split(' [')[0]
                row = [label, f'{nets[base][1] / 1e6:.1f}']
                for batch in args.batches:
                    ips = results[(runtime, (channels, size), batch)]
                    ref = ips.get(ref_name)
                    row += [f'{ips[label]:.1f}',
                            f'{ips[label] / ref:.2f}x' if ref else '-']
                rows.append(row)
            if not rows:  # a group without nets (e.g. --zoo --widths)
                continue
            heads = ['net', 'MFLOPs']
            for batch in args.batches:
                heads += [f'img/s b{batch}', f'vs {ref_name}']
            print_table(heads, rows, title=f'{runtime}, {channels}x{size[0]}'
                        f'x{size[1]}, {env}')
    print()
    for runtime in args.runtimes:
        for batch in args.batches:
            for a, b in pairs:
                for (rt, _, bt), ips in results.items():
                    if rt == runtime and bt == batch and a in ips \
                            and b in ips:
                        ratio = ips[a] / ips[b]
                        goal = 'met' if ratio >= 1.0 else 'NOT met'
                        print(f'{runtime} batch {batch}: {a} / {b} = '
                              f'{ratio:.2f}x (goal >= 1.0: {goal})')
            # a shrunk net's time should fall at least 0.7x as fast as its
            # FLOPs: (1 - t/t_full) >= 0.7 (1 - F/F_full)
            for a, b in shrunk:
                for (rt, g, bt), ips in results.items():
                    if rt == runtime and bt == batch and a in ips \
                            and b in ips:
                        nets = groups[g]
                        fall_t = 1 - ips[b] / ips[a]
                        fall_f = 1 - nets[a][1] / nets[b][1]
                        print(f'{runtime} batch {batch}: {a} vs {b}: time '
                              f'{-fall_t:+.0%}, FLOPs {-fall_f:+.0%}, ratio '
                              f'{fall_t / fall_f:.2f} (goal >= 0.7: '
                              f'{"met" if fall_t >= 0.7 * fall_f else "NOT met"})')


if __name__ == '__main__':
    main()
