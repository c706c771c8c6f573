"""The demo recipe shortened for benchmarks (bench_pareto, bench_units).

A demo config runs ``epochs`` epochs of the first ``images`` Fashion-MNIST
training images; iteration counts of the config (the LR warm-up, a
search's AtomShrinkHook ``interval`` when iteration-based) are scaled by
the run's length over the demo's; validation at the end only, logs and
checkpoints off.
"""
import time

from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

DEMO_ITERS = 4 * 469  # the demo's length, for scaling iteration counts


def iterations(epochs, images, batch_size):
    """Iterations of ``epochs`` over ``images`` at ``batch_size``."""
    return epochs * -(-images // batch_size)


def short_recipe(path, work_dir, seed, epochs, images, val_images=10000,
                 workers=0):
    """The config at ``path``, shortened; returns it and the length scale
    (the run's iterations over the demo's)."""
    cfg = Config.fromfile(path)
    scale = iterations(epochs, images,
                       cfg.train_dataloader.batch_size) / DEMO_ITERS
    cfg.work_dir = work_dir
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=seed, deterministic=False)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs,
                         val_interval=epochs)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=max(1, round(100 * scale))),
        dict(type='CosineAnnealingLR', by_epoch=True, begin=0,
             T_max=epochs, convert_to_iter_based=True)]
    for name in ('train_dataloader', 'val_dataloader'):
        cfg[name].num_workers = workers
        cfg[name].persistent_workers = workers > 0
    if images < 60000:
        cfg.train_dataloader.dataset.indices = images
    if val_images < 10000:
        cfg.val_dataloader.dataset.indices = val_images
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10**6)
    cfg.default_hooks.checkpoint = None
    for hook in cfg.get('custom_hooks', []):
        if hook.type.endswith('AtomShrinkHook') and not hook.get(
                'by_epoch', True):
            hook.interval = max(1, round(hook.interval * scale))
    return cfg, scale


class _LastMetrics(Hook):
    """Keeps the metrics of the last validation."""

    priority = 'LOWEST'

    def __init__(self):
        self.metrics = {}

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})


def train(cfg, extra_hooks=()):
    """Train ``cfg`` with ``extra_hooks``; returns the runner, the final
    top-1 and the wall seconds of training."""
    runner = Runner.from_cfg(cfg)
    record = _LastMetrics()
    for hook in (record, ) + tuple(extra_hooks):
        runner.register_hook(hook)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    return runner, float(record.metrics['accuracy/top1']), seconds
