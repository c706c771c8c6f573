"""Shipped configs, the AtomNAS recipe at 8 and 32 GPUs, command-line tools."""
import copy
import glob
import json
import math
import os
import os.path as osp
import pickle
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import DefaultSampler
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import (HOOKS, MODELS, VISUALIZERS,
                               init_default_scope)
from mmengine.runner import Runner

import atomnas_mm  # noqa: F401
import atomnas_mm.engine.ema as ema_module
from atomnas_mm.models import supernet_rows
from atomnas_mm.utils import cpu_ddp_workaround
from harness import free_port, run_dist_train, write_images

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/_base_/models/*.py')))
RETRAIN_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/retrain/*.py')))
SEARCH_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs/*.py')))
ALL_CONFIGS = sorted(
    set(glob.glob(osp.join(ROOT, 'configs/**/*.py'), recursive=True)))
PYTHON = sys.executable
ENV = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
ENV.pop('LOCAL_RANK', None)
IMAGENET_TRAIN = 1281167

# config: (arch, images per GPU)
RETRAIN = {
    'atomnas-a_in1k.py': ('atomnas_a', 64),
    'atomnas-b_in1k.py': ('atomnas_b', 64),
    'atomnas-c_in1k.py': ('atomnas_c', 64),
    'atomnas-a_plus_in1k.py': ('atomnas_a_plus', 128),
    'atomnas-b_plus_in1k.py': ('atomnas_b_plus', 128),
    'atomnas-c_plus_in1k.py': ('atomnas_c_plus', 128),
}
# search config: (stem channels, rho) -- docs/method.md, "Penalty"
SEARCH = {
    'atomnas_a.py': (16, 1.8e-4),
    'atomnas_b.py': (32, 1.2e-4),
    'atomnas_c.py': (32, 1.0e-4),
    'atomnas_target.py': (32, 1.0e-4),  # rho: the controller's start
}


def _build_model(cfg):
    init_default_scope('mmpretrain')
    return MODELS.build(cfg.model)


def _config(rel):
    return Config.fromfile(osp.join(ROOT, 'configs', rel))


def _build_hook(hook_cfg):
    """Build a hook as Runner.register_hook does (it pops ``priority``)."""
    runner = SimpleNamespace(_hooks=[])
    Runner.register_hook(runner, copy.deepcopy(hook_cfg))
    return runner._hooks[0]


def test_all_configs_present():
    names = {osp.basename(p) for p in MODEL_CONFIGS}
    for arch in ['supernet', 'a', 'b', 'c', 'a_plus', 'b_plus', 'c_plus']:
        assert f'atomnas-{arch}.py' in names
    assert {osp.basename(p) for p in RETRAIN_CONFIGS} == set(RETRAIN)
    assert {osp.basename(p) for p in SEARCH_CONFIGS} == set(SEARCH)


@pytest.mark.parametrize('path', ALL_CONFIGS,
                         ids=lambda p: osp.relpath(p, ROOT))
def test_every_config_builds(path):
    """Every config loads; model, optim wrapper and custom hooks build."""
    cfg = Config.fromfile(path)
    if 'model' not in cfg:  # the dataset / schedule / runtime bases
        return
    assert cfg.custom_imports.imports == ['atomnas_mm']
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    try:
        model = MODELS.build(cfg.model)
    finally:
        init_default_scope('mmpretrain')
    assert type(model.backbone).__name__ == \
        cfg.model.backbone.type.split('.')[-1]
    if cfg.model.type == 'ImageClassifier' and \
            cfg.model.backbone.type.endswith('AtomNAS'):
        assert type(model.head).__name__ == 'DropoutLinearClsHead'
    if 'optim_wrapper' in cfg:
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        assert optim_wrapper.optimizer.param_groups
    for hook_cfg in cfg.get('custom_hooks', []):
        hook = _build_hook(hook_cfg)
        assert type(hook).__name__ == hook_cfg['type'].split('.')[-1]


@pytest.mark.parametrize('path', MODEL_CONFIGS, ids=osp.basename)
def test_model_config_builds(path):
    """The recipe's head (types are checked by test_every_config_builds)."""
    cfg = Config.fromfile(path)
    model = _build_model(cfg)
    plus = osp.basename(path).endswith('_plus.py')
    assert model.head.dropout.p == (0.28 if plus else 0.2)
    assert model.head.fc.in_features == 1280
    assert model.head.fc.out_features == 1000
    assert cfg.model.head.loss.label_smooth_val == 0.1
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def _check_recipe(cfg, batch_per_gpu):
    """What the retraining and the search configs share (section 6)."""
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.custom_imports.imports == ['atomnas_mm']
    assert cfg.train_dataloader.batch_size == batch_per_gpu
    assert cfg.val_dataloader.batch_size == batch_per_gpu
    assert cfg.train_cfg.max_epochs == 350
    assert cfg.randomness.seed == 1995
    assert cfg.default_hooks.logger.interval == 100
    assert cfg.default_hooks.checkpoint.interval == 1
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == 'data/imagenet'
    crop = cfg.train_dataloader.dataset.pipeline[1]
    assert crop.type == 'EfficientNetRandomCrop'
    assert crop.interpolation == 'bicubic' and crop.crop_padding == 32
    center = cfg.val_dataloader.dataset.pipeline[1]
    assert center.type == 'EfficientNetCenterCrop'
    assert center.interpolation == 'bicubic' and center.crop_padding == 32
    # lr 0.016 per 256 images, scaled to the real batch at Runner start
    assert cfg.auto_scale_lr == dict(base_batch_size=256, enable=True)
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'atomnas_mm.TFRMSprop'
    assert optimizer.lr == 0.016 and optimizer.weight_decay == 0
    assert 'paramwise_cfg' not in cfg.optim_wrapper
    assert [s.type for s in cfg.param_scheduler] == [
        'LinearLR', 'atomnas_mm.FractionalStepLR']

    model = _build_model(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    optimizer = optim_wrapper.optimizer
    assert type(optimizer).__name__ == 'TFRMSprop'
    assert len(optimizer.param_groups) == 1  # the shrink hook needs one
    group = optimizer.param_groups[0]
    assert group['lr'] == 0.016 and group['weight_decay'] == 0
    assert len(group['params']) == len(list(model.parameters()))

    hooks = [_build_hook(h) for h in cfg.custom_hooks]
    ema_cfg = cfg.custom_hooks[0]
    assert type(hooks[0]).__name__ == 'EMAHook'
    assert hooks[0].priority == 'ABOVE_NORMAL'
    assert ema_cfg.ema_type == 'atomnas_mm.BatchScaledEMA'
    # the EMA decay per image follows the batch the config really uses
    assert ema_cfg.batch_size == batch_per_gpu
    assert ema_cfg.decay == 0.9999 and ema_cfg.images_per_decay == 4096
    assert ema_cfg.update_buffers  # EMA of the BN statistics too
    assert type(hooks[1]).__name__ == 'BNL1PenaltyHook'
    assert hooks[1].weight_decay == 1e-5  # weight decay as a loss term
    assert type(hooks[-1]).__name__ == 'BNRecalibrationHook'
    # the default hooks build (VisualizationHook needs a visualizer first)
    VISUALIZERS.build(dict(cfg.visualizer,
                           name=f'test_{id(cfg)}_{batch_per_gpu}'))
    for hook in cfg.default_hooks.values():
        HOOKS.build(hook)
    return model, hooks


@pytest.mark.parametrize('path', RETRAIN_CONFIGS, ids=osp.basename)
def test_retrain_config_builds(path):
    arch, batch = RETRAIN[osp.basename(path)]
    cfg = Config.fromfile(path)
    assert cfg.model.backbone.arch == arch
    model, hooks = _check_recipe(cfg, batch)
    assert model.backbone.arch_rows()  # the backbone of the named arch
    assert model.head.dropout.p == (0.28 if 'plus' in arch else 0.2)
    assert [type(h).__name__ for h in hooks] == [
        'EMAHook', 'BNL1PenaltyHook', 'BNRecalibrationHook']
    assert hooks[1].rho == 0  # no search when retraining


@pytest.mark.parametrize('name', sorted(SEARCH))
def test_search_config_builds(name):
    stem, rho = SEARCH[name]
    cfg = _config(name)
    assert cfg.model.backbone.arch == 'supernet'
    model, hooks = _check_recipe(cfg, 64)
    assert model.backbone.stem_channels == stem
    assert model.backbone.arch_rows() == supernet_rows(stem)
    assert model.head.dropout.p == 0.2
    assert [type(h).__name__ for h in hooks] == [
        'EMAHook', 'BNL1PenaltyHook', 'AtomShrinkHook',
        'BNRecalibrationHook']
    penalty, shrink = hooks[1], hooks[2]
    assert penalty.rho == pytest.approx(rho)
    assert penalty.warmup_epochs == 25 and penalty.warmup_iters is None
    assert shrink.planner.criterion.threshold == 1e-3
    assert shrink.planner.trigger.min_removed_flops == 1e6
    assert shrink.planner.cost.input_size == 224
    assert shrink.interval == 1 and shrink.by_epoch
    if name == 'atomnas_target.py':
        assert shrink.planner.controller.target == 300e6
        assert shrink.planner.controller.key == 'flops'
    else:
        assert shrink.planner.controller is None


def _fake_runner(cfg, world_size, epoch_length=None):
    """The attributes Runner.scale_lr / _build_param_scheduler read."""
    return SimpleNamespace(
        world_size=world_size,
        _train_dataloader=cfg.train_dataloader,
        train_dataloader=range(epoch_length or 0),
        param_schedulers=cfg.param_scheduler,
        _train_loop=None,
        logger=MMLogger.get_instance('test_recipe_lr'))


def _epoch_length(batch_per_gpu, world_size, monkeypatch):
    """Iterations per epoch of rank 0 with mmengine's DefaultSampler."""
    import mmengine.dataset.sampler as sampler_module
    monkeypatch.setattr(sampler_module, 'get_dist_info',
                        lambda: (0, world_size))
    sampler = DefaultSampler(range(IMAGENET_TRAIN), shuffle=False)
    loader = torch.utils.data.DataLoader(
        range(IMAGENET_TRAIN), batch_size=batch_per_gpu, sampler=sampler)
    return len(loader)


# (config, GPUs): (iterations per epoch)
LR_CASES = {
    ('retrain/atomnas-a_in1k.py', 8): 2503,
    ('retrain/atomnas-a_in1k.py', 32): 626,
    ('atomnas_a.py', 8): 2503,
    ('atomnas_c.py', 32): 626,
    ('retrain/atomnas-a_plus_in1k.py', 32): 313,
}


@pytest.mark.parametrize('rel,gpus', sorted(LR_CASES),
                         ids=lambda x: str(x))
@pytest.mark.slow
def test_lr_curve(rel, gpus, monkeypatch):
    cfg = _config(rel)
    batch = cfg.train_dataloader.batch_size
    total = gpus * batch
    # ceil(ceil(1281167 / gpus) / batch), as mmengine's sampler splits it
    epoch = _epoch_length(batch, gpus, monkeypatch)
    assert epoch == LR_CASES[(rel, gpus)]
    assert epoch == math.ceil(math.ceil(IMAGENET_TRAIN / gpus) / batch)

    # what the Runner does: build the optimizer, scale_lr, the schedulers
    model = torch.nn.Linear(1, 1)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    runner = _fake_runner(cfg, gpus, epoch)
    Runner.scale_lr(runner, optim_wrapper, cfg.auto_scale_lr)
    peak = 0.016 * total / 256
    assert optim_wrapper.get_lr()['lr'][0] == pytest.approx(peak)
    schedulers = Runner._build_param_scheduler(
        runner, cfg.param_scheduler, optim_wrapper)
    assert [type(s).__name__ for s in schedulers] == [
        'LinearLR', 'FractionalStepLR']

    num_iters = 6 * epoch + 1
    lrs = []
    for _ in range(num_iters):
        lrs.append(optim_wrapper.optimizer.param_groups[0]['lr'])
        for s in schedulers:
            s.step()
    lrs = np.array(lrs)
    t = np.arange(num_iters)
    # linear warm-up from lr / 8 over 5 epochs (mmengine's LinearLR reaches
    # the peak at the last warm-up iteration), times the staircase
    # 0.97 ** floor(t / (2.4 epochs)) counted from iteration 0.
    warm_iters = 5 * epoch - 1
    warm = 1 / 8 + 7 / 8 * np.minimum(t, warm_iters) / warm_iters
    stairs = np.floor(t / (2.4 * epoch))
    expected = peak * warm * 0.97**stairs
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[0] == pytest.approx(peak / 8)
    # two decays by the end of the warm-up, the 3rd after 7.2 epochs
    assert lrs[5 * epoch] == pytest.approx(peak * 0.97**2)
    assert lrs[6 * epoch] == pytest.approx(peak * 0.97**2)
    step = 2.4 * epoch
    first = math.ceil(step)  # first iteration at the lower lr
    assert lrs[first] / lrs[first - 1] < 0.98
    assert lrs[first + 1] / lrs[first] > 1  # the warm-up still climbs


@pytest.mark.parametrize('gpus', [8, 32])
@pytest.mark.parametrize('rel', ['retrain/atomnas-a_in1k.py',
                                 'retrain/atomnas-a_plus_in1k.py',
                                 'atomnas_b.py'])
@pytest.mark.slow
def test_ema_momentum(rel, gpus, monkeypatch):
    cfg = _config(rel)
    batch = cfg.train_dataloader.batch_size
    total = gpus * batch
    monkeypatch.setattr(ema_module, 'get_world_size', lambda: gpus)
    hook = _build_hook(cfg.custom_hooks[0])
    model = torch.nn.Linear(1, 1, bias=False)
    hook.before_run(SimpleNamespace(model=model))
    ema = hook.ema_model
    assert type(ema).__name__ == 'BatchScaledEMA'
    assert ema.total_batch == total
    decay = 0.9999**(total / 4096)
    # mmengine momentum = 1 - decay
    assert ema.momentum == pytest.approx(1 - decay, rel=1e-9)
    assert ema.update_buffers

    with torch.no_grad():
        model.weight.fill_(0.)
    ema.update_parameters(model)  # step 0: copy
    avg = 0.
    for t in range(30):
        with torch.no_grad():
            model.weight.fill_(float(t + 1))
        ema.update_parameters(model)
        d = min(decay, (1 + t) / (10 + t))  # reference EMA warm-up
        avg = d * avg + (1 - d) * (t + 1)
        assert ema.module.weight.item() == pytest.approx(avg, rel=1e-5)
    # long after the warm-up the decay per iteration is the scaled one
    ema.steps.fill_(10**6)
    with torch.no_grad():
        ema.module.weight.fill_(0.)
        model.weight.fill_(1e6)
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(1e6 * (1 - decay),
                                                     rel=1e-4)


def test_cpu_ddp_workaround(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'set_device', torch.cuda.set_device)
    cfg = Config(dict(launcher='none',
                      env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert not cpu_ddp_workaround(cfg)
    assert 'model_wrapper_cfg' not in cfg
    cfg.launcher = 'pytorch'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert not cpu_ddp_workaround(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert 'model_wrapper_cfg' not in cfg
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert cpu_ddp_workaround(cfg)
    assert cfg.model_wrapper_cfg == dict(
        type='MMDistributedDataParallel', device_ids=None,
        broadcast_buffers=False)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    torch.cuda.set_device(3)  # a no-op now
    # a config's own wrapper and a non-nccl backend are kept
    own = Config(dict(launcher='mpi', model_wrapper_cfg=dict(type='Mine'),
                      env_cfg=dict(dist_cfg=dict(backend='mpi'))))
    assert cpu_ddp_workaround(own)
    assert own.model_wrapper_cfg == dict(type='Mine')
    assert own.env_cfg.dist_cfg.backend == 'mpi'
    # no env_cfg at all: gloo is set in the stored config
    bare = Config(dict(launcher='slurm'))
    assert cpu_ddp_workaround(bare)
    assert bare.env_cfg.dist_cfg.backend == 'gloo'
    # the shipped runtime asks for nccl: switched
    shipped = _config('retrain/atomnas-a_in1k.py')
    assert shipped.env_cfg.dist_cfg.backend == 'nccl'
    shipped.launcher = 'pytorch'
    assert cpu_ddp_workaround(shipped)
    assert shipped.env_cfg.dist_cfg.backend == 'gloo'


@pytest.mark.slow
def test_get_flops_atomnas_a(tmp_path):
    out = subprocess.run(
        [PYTHON, osp.join(ROOT, 'tools/analysis_tools/get_flops.py'),
         osp.join(ROOT, 'configs/_base_/models/atomnas-a.py'),
         '--shape', '224'],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = re.search(r'^AtomNAS.*?([\d.]+)\s+([\d.]+)\s*$', out.stdout, re.M)
    mm = re.search(r'^mmengine.*?([\d.]+)\s+([\d.]+)\s*$', out.stdout, re.M)
    assert ours and mm, out.stdout
    flops, params = float(ours.group(1)), float(ours.group(2))
    assert 257.5 < flops < 259.0  # published: 258M
    assert 3.8 < params < 4.0  # published: 3.9M
    # mmengine also counts BN (eval: one op per element) and BN params.
    assert float(mm.group(1)) > flops and float(mm.group(2)) > params
    assert 'quoted in README' in ours.group(0)
    # The tracer's known WARNINGs and pkg_resources' deprecation are dropped.
    assert 'WARNING' not in out.stdout + out.stderr
    assert 'pkg_resources' not in out.stderr


# The retrain recipe unchanged (optimizer, schedules, auto_scale_lr, EMA,
# weight decay and BN recalibration hooks) on 4 tiny images of 2 classes.
TINY_CONFIG = """
_base_ = [{base!r}]
model = dict(head=dict(num_classes=2, topk=(1, )))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='EfficientNetRandomCrop', scale=32, backend='pillow',
         interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='EfficientNetCenterCrop', crop_size=32, backend='pillow',
         interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data!r},
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data!r},
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(save_best=None))
"""


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('tiny')
    write_images(str(tmp / 'images'), num_per_class=2)
    path = tmp / 'tiny_atomnas_a.py'
    path.write_text(TINY_CONFIG.format(
        base=osp.join(ROOT, 'configs/retrain/atomnas-a_in1k.py'),
        data=str(tmp / 'images')))
    return str(path)


def _run(args, cwd, timeout=300, env=ENV):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out


def _train_records(work_dir):
    """The per-iteration training records of scalars.json, by iteration."""
    scalars = glob.glob(osp.join(work_dir, '*/vis_data/scalars.json'))
    records = []
    for path in scalars:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if 'loss' in record:
                    assert np.isfinite(record['loss'])
                    records.append(record)
    return sorted(records, key=lambda r: r['iter'])


def _logged_iters(work_dir):
    return [r['iter'] for r in _train_records(work_dir)]


def _check_recipe_in_run(work_dir, total_batch, epoch_length):
    """The retrain recipe as the Runner applied it (first log of work_dir)."""
    log = open(sorted(glob.glob(osp.join(work_dir, '*/*.log')))[0]).read()
    # auto_scale_lr against the real total batch (ranks x batch per rank)
    assert (f'LR is set based on batch size of 256 and the current batch '
            f'size is {total_batch}.') in log
    for hook in ('EMAHook', 'BNL1PenaltyHook', 'BNRecalibrationHook'):
        assert hook in log
    assert (f'BNRecalibrationHook: BN statistics re-estimated on '
            f'{epoch_length} training batches') in log
    first, second = _train_records(work_dir)[:2]
    # warm-up from lr / 8, linear over 5 epochs (LinearLR: 5 * len - 1
    # steps), with lr = 0.016 * total / 256
    peak = 0.016 * total_batch / 256
    warm_iters = 5 * epoch_length - 1
    assert first['lr'] == pytest.approx(peak / 8)
    assert second['lr'] == pytest.approx(
        peak * (1 / 8 + 7 / 8 / warm_iters))
    # weight decay as a loss term (BNL1PenaltyHook, rho 0)
    assert first['loss_wd'] > 0 and first['penalty_rho'] == 0


@pytest.mark.slow
def test_train_test_resume(tiny_config, tmp_path):
    work_dir = str(tmp_path / 'work')
    # from another directory, 2 iterations (4 images, batch 2, 1 epoch)
    _run([PYTHON, osp.join(ROOT, 'tools/train.py'), tiny_config,
          '--work-dir', work_dir], cwd=tmp_path)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    assert _logged_iters(work_dir) == [1, 2]
    _check_recipe_in_run(work_dir, total_batch=2, epoch_length=2)
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert 'ema_state_dict' in state  # EMAHook of the retrain recipe

    # test.py reloads the checkpoint and evaluates it
    metrics = str(tmp_path / 'metrics.pkl')
    _run([PYTHON, osp.join(ROOT, 'tools/test.py'), tiny_config, ckpt,
          '--work-dir', str(tmp_path / 'test'), '--out', metrics,
          '--out-item', 'metrics'], cwd=tmp_path)
    with open(metrics, 'rb') as f:
        result = pickle.load(f)
    assert 0 <= result['accuracy/top1'] <= 100

    # --resume (auto) continues from epoch 1 to epoch 2
    _run([PYTHON, osp.join(ROOT, 'tools/train.py'), tiny_config,
          '--work-dir', work_dir, '--resume',
          '--cfg-options', 'train_cfg.max_epochs=2'], cwd=tmp_path)
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert _logged_iters(work_dir) == [1, 2, 3, 4]



@pytest.mark.slow
def test_dist_train_two_cpu_processes(tiny_config, tmp_path):
    work_dir = str(tmp_path / 'work')
    env = dict(ENV, PYTHON=PYTHON, PORT=str(free_port()))
    # 4 images on 2 ranks with batch 2: 1 iteration per epoch, 2 epochs.
    run_dist_train(['bash', osp.join(ROOT, 'tools/dist_train.sh'),
                    tiny_config, '2', '--work-dir', work_dir,
                    '--cfg-options', 'train_cfg.max_epochs=2'],
                   cwd=tmp_path, env=env, timeout=300)
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert _logged_iters(work_dir) == [1, 2]
    # The CPU workaround of tools/train.py: gloo, DDP without device_ids.
    log = open(glob.glob(osp.join(work_dir, '*/*.log'))[0]).read()
    assert 'Distributed training: True' in log and 'GPU number: 2' in log
    assert "dist_cfg=dict(backend='gloo')" in log
    assert 'device_ids=None' in log
    # 2 ranks x 2 images: the lr follows the total batch
    _check_recipe_in_run(work_dir, total_batch=4, epoch_length=1)


@pytest.mark.parametrize('environ, cores, load, threads', [
    ({}, 2, 2.0, 1),                       # busy: one thread
    ({}, 2, 7.3, 1),
    ({}, 2, 1.2, None),                    # idle enough: torch's default
    ({'OMP_NUM_THREADS': '2'}, 2, 7.3, None),  # the user's choice wins
    ({}, 1, 5.0, None),                    # one core: one thread anyway
])
def test_train_py_picks_one_thread_on_a_busy_machine(environ, cores, load,
                                                     threads):
    from atomnas_mm.utils import busy_machine_threads
    assert busy_machine_threads(environ, cores, load) == threads
