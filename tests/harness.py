"""The shared test harness, in the manner of mmengine's ``RunnerTestCase``
but for pytest functions.

- Toys: :class:`ToyData` (seeded images), the toy architecture family
  (:func:`toy_arch`), a toy classifier (:func:`toy_classifier`) and a tiny
  search config (:func:`make_cfg`, :func:`budget_cfg`).
- Runners: :func:`build` gives every Runner a unique ``experiment_name``;
  ``conftest.py`` registers the toys for one test module at a time
  (:func:`toys_registered`) and clears mmengine's global instances after
  every test (:func:`clear_global_instances`).
- Processes: :func:`spawn_cpu_ddp` runs a worker on 2 CPU ranks (gloo);
  :func:`demo_cmd` is ``tools/train.py`` on a shortened demo search.

Tests import it (``from harness import ...``); test modules never import
each other.
"""
import contextlib
import copy
import logging
import os
import os.path as osp
import re
import socket
import subprocess
import sys
import uuid
import warnings

import torch
import torch.multiprocessing as mp
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.registry import DATASETS
from mmengine.runner import Runner
from mmengine.utils import ManagerMixin
from mmpretrain.structures import DataSample
from torch.utils.data import Dataset

import atomnas_mm  # noqa: F401
from atomnas_mm.models import AtomNAS, count_flops_params
from atomnas_mm.search.shrink import apply_plan
from atomnas_mm.utils import cpu_ddp_workaround

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')

# -- the toy architecture family ---------------------------------------------
# 32 px nets with an 8-channel stem and a 32-channel head; rows are
# [channels, depth, stride, kernel sizes, atoms per kernel, has expand].
TOY_ROWS = dict(
    # A fixed first block, then searchable ones with 3 and 2 kernel groups,
    # stride 2 twice, residual blocks after each: the tiny search's net.
    search=[[8, 1, 1, [3], [8], False],
            [12, 1, 2, [3, 5, 7], [6, 6, 6], True],
            [12, 1, 1, [3, 5, 7], [6, 6, 6], True],
            [16, 1, 2, [3, 5], [8, 8], True],
            [16, 1, 1, [3, 5, 7], [4, 4, 4], True]],
    # Three stages (16, 24, 32 channels), a branch per kernel size, a
    # stride-2 block and a residual one.
    tiny=[[16, 1, 1, [3], [8], False],
          [24, 1, 2, [3, 5], [8, 4], True],
          [24, 1, 1, [3, 5, 7], [6, 4, 2], True],
          [32, 1, 2, [3], [12], True]],
    # Two searchable blocks and an emptied residual block (no atoms left).
    emptied=[[8, 1, 1, [3], [8], False],
             [16, 1, 2, [3, 5], [8, 8], True],
             [16, 1, 1, [3, 5, 7], [4, 4, 4], True],
             [16, 1, 1, [3, 5], [0, 0], True]],
    # Two / three kernel groups (stride 2, residual), a kernel group of one
    # atom, a residual block with an absent kernel size.
    uneven=[[16, 1, 1, [3], [8], False],
            [24, 1, 2, [3, 5], [8, 4], True],
            [24, 1, 1, [3, 5, 7], [6, 1, 2], True],
            [24, 1, 1, [3, 5, 7], [5, 0, 3], True],
            [32, 1, 2, [3], [12], True]],
    # A dropped kernel, an emptied residual block, a stage of depth 2.
    dropped=[[8, 1, 1, [3], [8], False],
             [16, 1, 2, [3, 5, 7], [12, 0, 6], True],
             [16, 1, 1, [3, 5, 7], [0, 0, 0], True],
             [16, 2, 1, [3, 5], [5, 7], True],
             [24, 1, 2, [7], [10], True]],
)


def toy_rows(name='search'):
    """A fresh copy of the rows of the toy arch ``name``."""
    return copy.deepcopy(TOY_ROWS[name])


def toy_arch(name='search', **kwargs):
    """The toy arch ``name`` as an ``arch`` dict (a fresh copy); ``kwargs``
    override or add keys."""
    return dict(dict(rows=toy_rows(name), stem_channels=8, last_channels=32),
                **kwargs)


ROWS = TOY_ROWS['search']
SUPERNET = toy_arch('search')


def toy_classifier(arch=None, num_classes=4, **backbone):
    """An mmpretrain ImageClassifier config around a toy AtomNAS backbone."""
    return dict(
        type='ImageClassifier',
        data_preprocessor=dict(type='ClsDataPreprocessor',
                               num_classes=num_classes,
                               mean=[127.5] * 3, std=[127.5] * 3),
        backbone=dict(type='atomnas_mm.AtomNAS',
                      arch=toy_arch() if arch is None else arch, **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes,
                  in_channels=32, loss=dict(type='CrossEntropyLoss')))


# -- toy data, registered for one test module at a time -----------------------
class ToyData(Dataset):
    """``n`` seeded random ``size`` px images of ``num_classes`` classes."""

    def __init__(self, n=16, num_classes=4, channels=3, size=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 255, (n, channels, size, size),
                               generator=g, dtype=torch.uint8)
        self.y = torch.randint(0, num_classes, (n, ), generator=g)
        self.metainfo = dict(classes=tuple(f'c{i}' for i in
                                           range(num_classes)))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i],
                    data_samples=DataSample().set_gt_label(int(self.y[i])))


TOYS = ((DATASETS, ToyData), )


@contextlib.contextmanager
def toys_registered():
    """The toys in their registries (``type='ToyData'``), removed on exit.

    Registering an existing name is refused (no ``force``): a second toy of
    the same name would be a bug. Nested use (a forked DDP worker) keeps
    the outer registration.
    """
    added = []
    for registry, cls in TOYS:
        if registry.get(cls.__name__) is cls:
            continue
        registry.register_module(module=cls)
        added.append((registry, cls.__name__))
    try:
        yield
    finally:
        for registry, name in added:
            registry.module_dict.pop(name, None)


def clear_global_instances():
    """Forget mmengine's global instances (message hubs, loggers, their open
    log files, visualizers, default scopes), as after a fresh start."""
    for logger in MMLogger._instance_dict.values():
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()
    # every managed class keeps its own dict (mmdet's and mmpretrain's
    # visualizers too)
    todo = [ManagerMixin]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not ManagerMixin:
            cls._instance_dict.clear()


def calibrated(model, seed=0, size=32):
    """Random BN scales and shifts, running statistics from two batches,
    a classifier's head random too: the eval output depends on the input
    through the whole net (random running statistics would saturate ReLU6
    layers), so a wrong fold or slice shows. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + .5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * .3)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    classifier = hasattr(model, 'head')
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(8, 3, size, size, generator=gen)
            model(x, mode='tensor') if classifier else model(x)
        if classifier:
            model.head.fc.weight.normal_(generator=gen)
            model.head.fc.bias.normal_(generator=gen)
    model.eval()  # some backbones' train() returns None
    return model


def train_logging(runner, level=0):
    """Train ``runner``; the messages of its logger at ``level`` or above
    (whatever the config's ``log_level``)."""
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(min(old, level) if level else 0)
    try:
        runner.train()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return [r.getMessage() for r in records]


def write_images(root, num_per_class):
    """Random 40x48 PNG images of two classes (``cat``, ``dog``) under
    ``root``, for mmpretrain's ``CustomDataset``."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    for cls in ('cat', 'dog'):
        os.makedirs(osp.join(root, cls), exist_ok=True)
        for i in range(num_per_class):
            img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            cv2.imwrite(osp.join(root, cls, f'{i}.png'), img)


def kill_every_other(units):
    """Zero the even channels' scales in every gate of every unit (a
    residual stream's in all its writers); the plan removing them."""
    plan = {}
    for name, unit in units.items():
        with torch.no_grad():
            for gamma, start in unit.gamma_slices():
                gamma[start % 2::2] = 0
        plan[name] = torch.arange(1, unit.num_channels, 2)
    return plan


def exact_shrink_logits(model, units, plan, x):
    """``model``'s eval logits on ``x`` before and after ``plan`` is applied
    to it; every unit of the plan folds exactly and the logits depend on
    the input (else the comparison would prove nothing)."""
    with torch.no_grad():
        before = model(x, mode='tensor')
        assert all(units[n].error_bound(k) == 0 for n, k in plan.items())
        apply_plan(model, plan)
        after = model(x, mode='tensor')
    assert (before[0] - before[1]).abs().max() > 0.1
    return before, after


def remove_at_random(widths, seed=1):
    """Remove a random number of every unit's channels from ``widths`` (a
    :class:`~atomnas_mm.search.costs.WidthCost`), at least one kept, one
    channel at a time; returns the plan keeping the first channels."""
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for name, unit in widths.units.items():
        keep = int(torch.randint(1, unit.num_channels + 1, (),
                                 generator=gen))
        for _ in range(unit.num_channels - keep):
            widths.remove(name, 0)
        plan[name] = torch.arange(keep)
    return plan


def unique_name(prefix='toy'):
    """An experiment name no other Runner of this session has."""
    return f'{prefix}-{uuid.uuid4().hex[:12]}'


class KillAtomsHook(Hook):
    """Stands in for the L1 penalty: zeroes chosen gammas (live and EMA)
    at the end of given epochs, before AtomShrinkHook looks."""
    priority = 'VERY_HIGH'

    def __init__(self, schedule):
        self.schedule = schedule  # {epoch: {block name: [kernel keys]}}

    def after_train_epoch(self, runner):
        from mmengine.hooks import EMAHook
        from mmengine.model import is_model_wrapper
        model = runner.model
        models = [model.module if is_model_wrapper(model) else model]
        models += [h.ema_model.module for h in runner.hooks
                   if isinstance(h, EMAHook)]
        for model in models:
            mods = dict(model.named_modules())
            for name, keys in self.schedule.get(runner.epoch, {}).items():
                for key in keys:
                    mods[name].dw[key].norm.weight.data.zero_()


class RecordHook(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses.append(outputs['loss'].item())


SCHEDULE = {0: {'backbone.layer2.0': ['k5']},
            1: {'backbone.layer2.1': ['k3', 'k5', 'k7'],
                'backbone.layer3.0': ['k3']}}


def toy_loader(n=16, num_classes=4, batch_size=4, shuffle=True):
    """A dataloader config of :class:`ToyData` (registered by name)."""
    return dict(dataset=dict(type='ToyData', n=n, num_classes=num_classes),
                batch_size=batch_size, num_workers=0,
                sampler=dict(type='DefaultSampler', shuffle=shuffle),
                collate_fn=dict(type='pseudo_collate'))


def make_cfg(work_dir, max_epochs=3, rows=ROWS, **kwargs):
    """The tiny search: the toy supernet on :class:`ToyData`, EMA, shrink
    at every epoch's end (no penalty: tests zero gammas themselves) and BN
    re-calibration; ``kwargs`` replace top-level keys."""
    loader = toy_loader()
    cfg = dict(
        model=toy_classifier(toy_arch(rows=copy.deepcopy(rows))),
        work_dir=work_dir,
        train_dataloader=loader,
        val_dataloader=copy.deepcopy(loader),
        val_evaluator=dict(type='Accuracy', topk=(1, )),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='RMSprop', lr=0.01,
                                          momentum=0.9, eps=1e-3)),
        param_scheduler=dict(type='StepLR', step_size=1, gamma=0.5,
                             by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1),
        custom_hooks=[
            dict(type='EMAHook', momentum=0.1, update_buffers=True),
            dict(type='atomnas_mm.AtomShrinkHook', min_removed_flops=0,
                 input_size=32),
            dict(type='atomnas_mm.BNRecalibrationHook', num_batches=2),
        ],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        default_scope='mmpretrain',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        log_level='WARNING')
    cfg.update(kwargs)
    return cfg


def build(cfg, extra_hooks=()):
    """``Runner.from_cfg`` on a copy of ``cfg`` (a unique experiment_name
    where it has none), then ``extra_hooks`` registered."""
    cfg = copy.deepcopy(cfg)
    cfg.setdefault('experiment_name', unique_name())
    runner = Runner.from_cfg(cfg)
    for hook in extra_hooks:
        runner.register_hook(hook)
    return runner


def supernet_flops():
    return count_flops_params(AtomNAS(arch=SUPERNET), (1, 3, 32, 32))[0]


def budget_cfg(work_dir, target, max_epochs=3, **kwargs):
    cfg = make_cfg(work_dir, max_epochs=max_epochs, **kwargs)
    cfg['optim_wrapper'] = dict(optimizer=dict(type='RMSprop', lr=0.05,
                                               momentum=0.9, eps=1e-3))
    cfg['custom_hooks'] = [
        dict(type='EMAHook', momentum=0.5, update_buffers=True),
        dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-2, warmup_iters=0),
        dict(type='atomnas_mm.AtomShrinkHook', min_removed_flops=0,
             input_size=32, by_epoch=False, interval=2, target=target,
             deadline=0.5, tolerance=0.02),
    ]
    return cfg


def shrink_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'AtomShrinkHook')


# -- processes ---------------------------------------------------------------
def free_port():
    """A free TCP port on localhost (for a gloo process group)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _failure_lines(text):
    """The lines of a failed launch that say why (errors, native aborts)."""
    keys = ('Error', 'Exception', 'terminate called', 'what()', 'Signal',
            'exitcode', 'Traceback')
    return '\n'.join(line for line in text.splitlines()
                     if any(key in line for key in keys))


def run_dist_train(args, cwd, env, timeout):
    """``tools/dist_train.sh`` with ``args``; its output.

    A launch whose worker a native signal ended (torchrun's "Signal N") is
    run once more: gloo's TCP transport on a loaded machine has aborted a
    worker this way in CI (SIGABRT). The first try's failure lines become
    a warning, so a rerun shows in the test summary; a second failure, or
    any failure with an ordinary exit code, fails the test with them.
    """
    for attempt in (1, 2):
        out = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode == 0:
            return out
        text = out.stdout + out.stderr
        if attempt == 1 and re.search(r'Signal \d+ \(SIG', text):
            warnings.warn('dist_train.sh: a worker was killed by a signal; '
                          'run again. Its failure lines:\n' +
                          _failure_lines(text))
            continue
        raise AssertionError(f'dist_train.sh failed ({out.returncode}):\n'
                             f'{_failure_lines(text)}\n--- stdout tail:\n'
                             f'{out.stdout[-3000:]}\n--- stderr tail:\n'
                             f'{out.stderr[-5000:]}')


def ddp_cfg(cfg):
    """``cfg`` (changed in place) launched by torch on CPU ranks: launcher
    ``pytorch`` and atomnas_mm's CPU DDP workaround."""
    cfg['launcher'] = 'pytorch'
    cpu_ddp_workaround(cfg)
    return cfg


def _ddp_rank(rank, worker, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with toys_registered():
        worker(rank, *args)


def spawn_cpu_ddp(worker, *args, nprocs=2, start_method='spawn'):
    """Run ``worker(rank, *args)`` on ``nprocs`` CPU ranks (the env://
    variables of a torch launcher, one thread each, the toys registered).

    ``worker`` is a module-level function; ``'fork'`` saves the re-import
    of a spawned process (~30 s) where the parent holds no threads.
    """
    mp.start_processes(_ddp_rank, args=(worker, nprocs, free_port(), args),
                       nprocs=nprocs, join=True, start_method=start_method)


def demo_cmd(work_dir, cache, *extra, epochs=2, batch_size=32,
             iters_per_epoch=2, val_images=32, workers=0, warmup_iters=2,
             options=(), injector=None, config=DEMO):
    """``tools/train.py`` on the demo search, shortened: ``epochs`` of
    ``iters_per_epoch`` iterations on a Fashion-MNIST cache in ``cache``,
    the LR schedule fitted to the length.

    Args:
        extra: Arguments before ``--cfg-options`` (e.g. ``'--resume'``).
        workers: Training dataloader workers (persistent when > 0);
            validation has none.
        warmup_iters: Iterations of the LR warm-up.
        config: The demo config (the plain search by default).
        options: More ``--cfg-options`` (later ones win).
        injector: A script that runs ``tools/train.py`` itself (fault
            injection), put before it on the command line.
    """
    head = [sys.executable] + ([injector] if injector else [])
    return head + [
        osp.join(ROOT, 'tools/train.py'), config, '--work-dir', str(work_dir),
        *extra, '--cfg-options', f'train_cfg.max_epochs={epochs}',
        f'train_dataloader.batch_size={batch_size}',
        f'train_dataloader.dataset.indices={batch_size * iters_per_epoch}',
        f'val_dataloader.dataset.indices={val_images}',
        f'train_dataloader.dataset.cache_dir={cache}',
        f'val_dataloader.dataset.cache_dir={cache}',
        f'train_dataloader.num_workers={workers}',
        'val_dataloader.num_workers=0',
        f'train_dataloader.persistent_workers={workers > 0}',
        'val_dataloader.persistent_workers=False',
        f'param_scheduler.0.end={warmup_iters}',
        f'param_scheduler.1.T_max={epochs}',
        *options]


# A shrink every 2 iterations: a strong penalty without warm-up, a loose
# threshold, an EMA that follows closely, one batch of BN re-calibration.
FAST_SHRINK = ('custom_hooks.0.momentum=0.5', 'custom_hooks.1.rho=0.5',
               'custom_hooks.1.warmup_epochs=0', 'custom_hooks.2.interval=2',
               'custom_hooks.2.threshold=0.5',
               'custom_hooks.2.min_removed_flops=0',
               'custom_hooks.3.num_batches=1')
CHECKPOINT_EVERY_ITER = ('default_hooks.checkpoint.by_epoch=False',
                         'default_hooks.checkpoint.interval=1',
                         'default_hooks.checkpoint.save_best=None')
