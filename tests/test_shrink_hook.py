"""AtomShrinkHook through a real mmengine Runner: shrink, resume, reload."""
import copy
import json
import os.path as osp
import shutil

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import DATASETS
from mmengine.runner import Runner
from mmpretrain.structures import DataSample
from torch.utils.data import Dataset

import atomnas_mm  # noqa: F401
from atomnas_mm.engine.hooks import AtomShrinkHook

ROWS = [[8, 1, 1, [3], [8], False], [12, 1, 2, [3, 5, 7], [6, 6, 6], True],
        [12, 1, 1, [3, 5, 7], [6, 6, 6], True],
        [16, 1, 2, [3, 5], [8, 8], True], [16, 1, 1, [3, 5, 7], [4, 4, 4], True]]


@DATASETS.register_module(force=True)
class ToyData(Dataset):
    """Random 32x32 images, 4 classes."""
    metainfo = dict(classes=('a', 'b', 'c', 'd'))

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 255, (n, 3, 32, 32), generator=g,
                               dtype=torch.uint8)
        self.y = torch.randint(0, 4, (n, ), generator=g)

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


def test_search_resume_and_reload(tmp_path):
    full_dir = str(tmp_path / 'full')
    record = RecordHook()
    runner = build(make_cfg(full_dir), [KillAtomsHook(SCHEDULE), record])
    runner.train()
    backbone = runner.model.backbone
    rows = backbone.arch_rows()
    assert rows[1][3:5] == [[3, 7], [6, 6]]      # k5 removed at epoch 0
    assert rows[2][3:5] == [[], []]              # emptied residual block
    assert rows[3][3:5] == [[5], [8]]            # k3 removed at epoch 1
    # The optimizer holds exactly the model's (new) parameters.
    assert runner.optim_wrapper.optimizer.param_groups[0]['params'] == \
        list(runner.model.parameters())
    ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    assert ema.ema_model.module.backbone.arch_rows() == rows
    # Bookkeeping: json in work_dir, arch in checkpoint meta.
    with open(osp.join(full_dir, 'searched_arch.json')) as f:
        assert json.load(f)['backbone']['rows'] == rows
    ckpt = torch.load(osp.join(full_dir, 'epoch_1.pth'), weights_only=True)
    assert ckpt['meta']['atomnas_arch']['backbone']['rows'][1][3] == [3, 7]
    final_state = {k: v.clone() for k, v in runner.model.state_dict().items()}

    # Resume from epoch 1 (after the first shrink): same losses, same weights.
    resume_dir = str(tmp_path / 'resume')
    shutil.copytree(full_dir, resume_dir)
    resumed_record = RecordHook()
    runner2 = build(make_cfg(resume_dir, resume=True,
                             load_from=osp.join(resume_dir, 'epoch_1.pth')),
                    [KillAtomsHook(SCHEDULE), resumed_record])
    runner2.train()
    n = len(resumed_record.losses)
    assert n == 8
    assert resumed_record.losses == pytest.approx(record.losses[-n:],
                                                  rel=1e-5, abs=1e-6)
    # The shrink history (flops.png) survives the resume.
    def shrinks(r):
        hook = [h for h in r.hooks if isinstance(h, AtomShrinkHook)][0]
        return [(e['iter'], e['flops']) for e in hook.history
                if e['removed_atoms'] is not None]
    assert len(shrinks(runner)) == 2 and shrinks(runner2) == shrinks(runner)
    state2 = runner2.model.state_dict()
    assert state2.keys() == final_state.keys()
    for k, v in final_state.items():
        assert torch.allclose(v.float(), state2[k].float(), atol=1e-5), k

    # Test-time loading with the unedited search config reshapes the model.
    runner3 = build(make_cfg(str(tmp_path / 'test'),
                             load_from=osp.join(full_dir, 'epoch_3.pth'),
                             test_dataloader=make_cfg('')['val_dataloader'],
                             test_evaluator=dict(type='Accuracy'),
                             test_cfg=dict()))
    metrics = runner3.test()
    assert 'accuracy/top1' in metrics
    assert runner3.model.backbone.arch_rows() == rows


def test_mismatched_checkpoint_raises(tmp_path):
    runner = build(make_cfg(str(tmp_path / 'a'), max_epochs=1))
    runner.train()
    narrow = copy.deepcopy(ROWS)
    narrow[1] = [12, 1, 2, [3, 5, 7], [2, 2, 2], True]
    runner2 = build(make_cfg(str(tmp_path / 'b'), max_epochs=1, rows=narrow,
                             load_from=osp.join(str(tmp_path / 'a'),
                                                'epoch_1.pth')))
    with pytest.raises(ValueError, match='kernel 3 needs 6 atoms'):
        runner2.train()


def test_narrowing_on_load_without_the_hook_is_refused(tmp_path):
    """load_from a shrunk checkpoint into the supernet of a config without
    AtomShrinkHook: the optimizer would keep the old tensors, so training
    refuses to start and says what to do."""
    runner = build(make_cfg(str(tmp_path / 'a'), max_epochs=1),
                   [KillAtomsHook(SCHEDULE)])
    runner.train()
    cfg = make_cfg(str(tmp_path / 'b'), max_epochs=1,
                   load_from=osp.join(str(tmp_path / 'a'), 'epoch_1.pth'))
    cfg['custom_hooks'] = [dict(type='atomnas_mm.BNL1PenaltyHook', rho=0,
                                weight_decay=1e-4)]
    record = RecordHook()
    with pytest.raises(ValueError, match='narrowed itself to the loaded '
                       'checkpoint .* add atomnas_mm.AtomShrinkHook'):
        build(cfg, [record]).train()
    assert record.losses == []
