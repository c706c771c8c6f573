"""The shared test harness: a toy dataset, a tiny search config and Runner,
hooks that stand in for the penalty or record losses, a free port for DDP.

Tests import it (``from harness import ...``); test modules never import
each other.
"""
import copy
import socket

import torch
from mmengine.hooks import Hook
from mmengine.registry import DATASETS
from mmengine.runner import Runner
from mmpretrain.structures import DataSample
from torch.utils.data import Dataset

import atomnas_mm  # noqa: F401
from atomnas_mm.models import AtomNAS, count_flops_params

ROWS = [[8, 1, 1, [3], [8], False], [12, 1, 2, [3, 5, 7], [6, 6, 6], True],
        [12, 1, 1, [3, 5, 7], [6, 6, 6], True],
        [16, 1, 2, [3, 5], [8, 8], True], [16, 1, 1, [3, 5, 7], [4, 4, 4], True]]


@DATASETS.register_module(force=True)
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


def make_cfg(work_dir, max_epochs=3, rows=ROWS, **kwargs):
    loader = dict(dataset=dict(type='ToyData'), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=True),
                  collate_fn=dict(type='pseudo_collate'))
    cfg = dict(
        model=dict(
            type='ImageClassifier',
            data_preprocessor=dict(type='ClsDataPreprocessor',
                                   mean=[127.5] * 3, std=[127.5] * 3),
            backbone=dict(type='atomnas_mm.AtomNAS',
                          arch=dict(rows=rows, stem_channels=8,
                                    last_channels=32)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=4, in_channels=32,
                      loss=dict(type='CrossEntropyLoss'))),
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
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    for hook in extra_hooks:
        runner.register_hook(hook)
    return runner




def free_port():
    """A free TCP port on localhost (for a gloo process group)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


SUPERNET = dict(rows=ROWS, stem_channels=8, last_channels=32)


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
