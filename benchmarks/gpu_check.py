"""The GPU check of docs/benchmarks.md in one run, one table (issue 11).

1. Training step, fused (as shipped: ``AtomicBlock.train_forms``), fused
   running its modules, and per-branch: 224 px supernet, batch 64 and 128,
   AMP fp16 (autocast + GradScaler), channels_last and contiguous.
2. A search through the real Runner: ``configs/atomnas_a.py`` (supernet,
   channels_last by ``MemoryFormatHook``) with AmpOptimWrapper (fp16,
   dynamic loss scale), EMA and the penalty on synthetic 224 px images; a
   forced shrink (half of every searchable block's atoms) through
   ``AtomShrinkHook.apply``, with ``torch.cuda.memory_allocated`` before and
   after, the training continuing after it.
3. Inference images/s, AtomNAS-A as built and deployed vs MobileNetV2 as
   built and BN-folded, fp32 and AMP fp16, batch 1, 32, 256.

    bash benchmarks/gpu_check.sh            # on a GPU, < 8 minutes
    bash benchmarks/gpu_check.sh --cpu-smoke  # the same code, tiny, on CPU
"""
import argparse
import gc
import math
import os.path as osp
import sys
import tempfile
import time

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import bench_inference  # noqa: E402
import bench_train_step  # noqa: E402
from _timing import environment, print_table  # noqa: E402
from common import DEMO, imagenet_setting  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def gib(n):
    return f'{n / 2**30:.2f} GiB'


# -- 1. training step ---------------------------------------------------------
def train_step_rows(smoke, dev):
    setting = DEMO if smoke else imagenet_setting()
    batches = [4] if smoke else [64, 128]
    formats = ('channels_last', 'contiguous')
    rows = []
    for batch in batches:
        t = bench_train_step.measure(setting, batch, 2 if smoke else 10, dev,
                                     formats, amp=not smoke)
        for fmt in formats:
            tf, tm, tb = (t[(c, fmt)] for c in bench_train_step.CANDIDATES)
            rows.append([
                'train step', f'{"28" if smoke else "224"} px b{batch} {fmt}'
                f'{"" if smoke else " AMP fp16"}',
                f'fused {tf * 1e3:.1f} / modules {tm * 1e3:.1f} / '
                f'per-branch {tb * 1e3:.1f} ms',
                f'fused vs per-branch {tb / tf:.2f}x (goal >= 1.5x); '
                f'modules vs per-branch {tb / tm:.2f}x'])
            print(*rows[-1], sep=' | ', flush=True)
    return rows


# -- 2. search with AMP, EMA and a forced shrink ------------------------------
def search_rows(smoke, dev):
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import DATASETS
    from mmengine.runner import Runner
    from mmpretrain.structures import DataSample
    from torch.utils.data import Dataset

    from atomnas_mm.engine.hooks import AtomShrinkHook
    from atomnas_mm.engine.hooks.memory_format_hook import format_strides
    from atomnas_mm.models.blocks import AtomicBlock

    size, channels = (28, 1) if smoke else (224, 3)

    @DATASETS.register_module(force=True)
    class SyntheticImages(Dataset):
        """A fixed pool of random uint8 images, cycled."""
        metainfo = dict(classes=tuple(str(i) for i in range(1000)))

        def __init__(self, n=4096, pool=256):
            g = torch.Generator().manual_seed(0)
            self.n = n
            self.x = torch.randint(0, 255, (pool, channels, size, size),
                                   generator=g, dtype=torch.uint8)
            self.y = torch.randint(0, 10 if smoke else 1000, (pool, ),
                                   generator=g)

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            i %= len(self.x)
            return dict(inputs=self.x[i], data_samples=DataSample()
                        .set_gt_label(int(self.y[i])))

    def channels_last(model):
        return all(t.stride() == format_strides(t.shape, 'channels_last')
                   for t in model.parameters() if t.dim() == 4)

    class ForceShrink(Hook):
        """Halve every searchable block at iteration ``at``; measure."""
        priority = 'VERY_LOW'

        def __init__(self, at):
            self.at, self.result, self.losses = at, {}, []

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            self.losses.append(float(outputs['loss']))
            if runner.iter + 1 != self.at:
                return
            model = runner.model
            ema = next(h for h in runner.hooks
                       if type(h).__name__ == 'EMAHook').ema_model.module
            plan = {name: torch.arange(0, m.num_atoms, 2)
                    for name, m in model.named_modules()
                    if isinstance(m, AtomicBlock) and m.searchable
                    and m.num_atoms > 1}
            numel = sum(p.numel() for p in model.parameters())
            gc.collect()
            if dev == 'cuda':
                torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() if dev == 'cuda' else 0
            shrink = next(h for h in runner.hooks
                          if isinstance(h, AtomShrinkHook))
            start = time.perf_counter()
            shrink.apply(runner, plan)
            seconds = time.perf_counter() - start
            gc.collect()
            if dev == 'cuda':
                torch.cuda.synchronize()
            after = torch.cuda.memory_allocated() if dev == 'cuda' else 0
            removed = numel - sum(p.numel() for p in model.parameters())
            states = runner.optim_wrapper.optimizer.state
            per_param = 2 + max((sum(torch.is_tensor(v) and v.dim() > 0
                                     for v in s.values())
                                 for s in states.values()), default=0)
            self.result = dict(
                before=before, after=after, seconds=seconds,
                removed=removed, per_param=per_param,
                params=(numel, numel - removed), ema_cl=channels_last(ema),
                cl=channels_last(model))

    if smoke:
        cfg = Config.fromfile(osp.join(ROOT, 'configs/demo/'
                                       'atomnas_fashion_mnist.py'))
        batch, iters, at = 8, 6, 3
    else:
        cfg = Config.fromfile(osp.join(ROOT, 'configs/atomnas_a.py'))
        batch, iters, at = 64, 50, 25
    cfg.train_dataloader = dict(
        batch_size=batch, num_workers=0, persistent_workers=False,
        dataset=dict(type='SyntheticImages'),
        sampler=dict(type='DefaultSampler', shuffle=True),
        collate_fn=dict(type='pseudo_collate'))
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator',
                'test_dataloader', 'test_cfg', 'test_evaluator'):
        cfg[key] = None
    cfg.train_cfg = dict(by_epoch=False, max_iters=iters)
    cfg.param_scheduler = None
    cfg.auto_scale_lr = None
    hooks = []
    for h in cfg.custom_hooks:
        if h['type'] == 'atomnas_mm.BNRecalibrationHook':
            continue
        if h['type'] == 'atomnas_mm.AtomShrinkHook':  # only the forced one
            h = dict(h, by_epoch=False, interval=10**9, final_shrink=False)
        if h['type'] == 'EMAHook' and 'batch_size' in h:
            h = dict(h, batch_size=batch)
        hooks.append(h)
    cfg.custom_hooks = hooks
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10)
    if not smoke:
        cfg.optim_wrapper = dict(cfg.optim_wrapper, type='AmpOptimWrapper',
                                 dtype='float16', loss_scale='dynamic')
    cfg.work_dir = tempfile.mkdtemp(prefix='gpu_check_')
    cfg.log_level = 'WARNING'
    runner = Runner.from_cfg(cfg)
    force = ForceShrink(at)
    runner.register_hook(force)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    r = force.result
    amp = type(runner.optim_wrapper).__name__
    after_losses = force.losses[at:]
    finite = all(math.isfinite(v) for v in force.losses)
    expected = r['removed'] * 4 * r['per_param']
    rows = [
        ['search', f'{"demo 28 px" if smoke else "atomnas_a 224 px"} b{batch}'
         f', {amp}, EMA, {iters} iters',
         f'{seconds:.1f} s; params {r["params"][0] / 1e6:.2f}M -> '
         f'{r["params"][1] / 1e6:.2f}M at iter {at}',
         f'losses finite: {finite}; {len(after_losses)} iters after the '
         f'shrink, loss {after_losses[0]:.3f} -> {after_losses[-1]:.3f}'],
        ['search', 'torch.cuda.memory_allocated around the shrink',
         f'{gib(r["before"])} -> {gib(r["after"])} (freed '
         f'{gib(r["before"] - r["after"])}); shrink took '
         f'{r["seconds"]:.2f} s',
         f'removed params x {r["per_param"]} (param, EMA copy, optimizer '
         f'states) x 4 B = {gib(expected)}'],
        ['search', 'memory format after the shrink',
         f'model channels_last: {r["cl"]}; EMA copy: {r["ema_cl"]}',
         'goal: both True']]
    for row in rows:
        print(*row, sep=' | ', flush=True)
    return rows


# -- 3. inference -------------------------------------------------------------
def inference_rows(smoke, dev):
    models = bench_inference.build_models(['atomnas_a', 'MobileNetV2'])
    formats = ('channels_last', 'contiguous')
    rows = []
    precisions = [False] if smoke else [False, True]
    for amp in precisions:
        for batch in ([1] if smoke else [1, 32, 256]):
            ips = bench_inference.measure(models, batch, formats,
                                          1 if smoke else 5, dev, amp=amp,
                                          size=64 if smoke else 224)
            best = {n: bench_inference.best_format(ips, n, formats)
                    for n in models}
            rows.append([
                'inference', f'b{batch} {"AMP fp16" if amp else "fp32"}',
                '; '.join(f'{n} {v:.0f} ({f})' for n, (v, f) in
                          best.items()),
                '; '.join(f'{a} / {b} {best[a][0] / best[b][0]:.2f}x'
                          for a, b in bench_inference.PAIRS
                          if a in best and b in best)])
            print(*rows[-1], sep=' | ', flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cpu-smoke', action='store_true',
                        help='run every part on the CPU at tiny sizes')
    parser.add_argument('--parts', nargs='+',
                        default=['train', 'search', 'inference'],
                        choices=['train', 'search', 'inference'])
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit('gpu_check.py: error: no CUDA device '
                 '(torch.cuda.is_available() is False); --cpu-smoke runs '
                 'the same code on the CPU at tiny sizes')
    dev = 'cpu' if args.cpu_smoke else 'cuda'
    print(environment() if dev == 'cuda' else 'CPU smoke run', flush=True)
    start = time.perf_counter()
    rows = []
    parts = dict(train=train_step_rows, search=search_rows,
                 inference=inference_rows)
    stopped = ''
    try:
        for part in args.parts:
            t = time.perf_counter()
            rows += parts[part](args.cpu_smoke, dev)
            print(f'# {part}: {time.perf_counter() - t:.0f} s', flush=True)
    except KeyboardInterrupt:  # gpu_check.sh's timeout: show what we have
        stopped = f', STOPPED in part {part!r} (timeout)'
    smoke = 'CPU smoke run, ' if args.cpu_smoke else ''
    print_table(['check', 'setting', 'measured', 'ratio / check'], rows,
                title=f'GPU check, {smoke}{environment()}, '
                f'{time.perf_counter() - start:.0f} s{stopped}')
    if stopped:
        sys.exit(1)


if __name__ == '__main__':
    main()
